"""`omni-ray make-tiny`: a tiny Llama + tokenizer built offline, warm-started by a seeded SFT to a target accuracy.

Why these choices (docs/methods.md sec. 5, measured on the 2-core CPU machine):
- The tokenizer is a byte-level BPE with no merges over the task's alphabet, i.e. one token per character. A BPE
  with merges tokenizes numbers inconsistently and learned addition about 3x slower; digits as tokens is what makes
  preference learning visible in minutes.
- Llama hidden 256 / 4 layers / 8 heads / 4 kv heads (head_dim 32, the minimum vLLM's CPU attention supports).
- The SFT warm start stops early, while accuracy is still rising: a plateaued warm start leaves nothing to learn.
  It stops at the first held-out check at or above a target accuracy (greedy, in-process, on the seed's fixed eval
  prompts) rather than after a fixed step count, because the step at which a seed reaches a given accuracy varies
  from seed to seed: every seed then starts its online rounds from the same accuracy.
Everything is a function of the seed, so `omni-ray train` can rebuild a missing model deterministically (on one
machine: float reductions differ between CPUs, and so may the step at which the target is reached).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from omni_ray.data import Prompt, encode_prompt
from omni_ray.data.arith import ArithTask, is_correct
from omni_ray.tracking import write_json

log = logging.getLogger(__name__)

ALPHABET = list("0123456789+-*=") + [" "]
#: torch threads of a build. A fixed count, so that the result is the same whatever the core count or OMP_NUM_THREADS
#: (a matmul split over threads sums in another order). Two, because an SFT step of batch 64 took 0.25 s on two
#: threads against 0.43 s on one, on an idle 2-core machine (measured). Two threads are faster only while nothing
#: else runs: on a busy 2-core machine they made a step ~7x slower than one (20 steps: 92 s against 12 s, measured),
#: which is why a build is a set-up step that runs before any actor starts.
BUILD_THREADS = 2
SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: one token per character of the arith alphabet."""
    to_unicode = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    for ch in ALPHABET:
        vocab.setdefault(to_unicode[ord(ch)], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIALS["pad"],
        bos_token=SPECIALS["bos"],
        eos_token=SPECIALS["eos"],
        padding_side="left",
    )
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (what the ByteLevel pre-tokenizer applies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    seed: int,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def sft_warm_start(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    task: ArithTask,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    until: Callable[[int], bool] | None = None,
) -> list[float]:
    """Supervised steps on (prompt -> answer + EOS), loss on the answer tokens only. Returns the loss curve.

    At most ``steps`` steps; ``until(n)``, called after the n-th step, ends training early when it returns True.
    ``task`` is anything with ``sft_batch(rng, size) -> [(prompt, answer), ...]``.
    """
    rng = np.random.default_rng([seed, 3])
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    losses = []
    for step in range(1, steps + 1):
        batch = task.sft_batch(rng, batch_size)
        ids, labels = [], []
        for prompt, answer in batch:
            p = encode_prompt(tokenizer, prompt)
            r = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        label_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        attn = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in ids])[:, None]).long()
        out = model(input_ids=input_ids, attention_mask=attn, labels=label_t)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if until is not None and until(step):
            break
    model.eval()
    return losses


def greedy_accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[Prompt], *, max_new_tokens: int
) -> float:
    """Exact-match accuracy of the model's greedy answers to arith prompts (their ``reference`` is the sum).

    The HF backend's batched generate, in this process: on the tiny model, 500 prompts take well under a second,
    where a vLLM engine would take tens of seconds to start. The model's train / eval mode is restored afterwards.
    """
    from transformers import GenerationConfig

    from omni_ray.rollout.hf_backend import generate_batched

    if not prompts:
        raise ValueError("greedy_accuracy needs at least one prompt")
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, num_return_sequences=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    was_training = model.training
    model.eval()
    ids = [encode_prompt(tokenizer, p.text) for p in prompts]
    out = generate_batched(model, ids, config, prompts_per_batch=len(ids), seed=0)
    model.train(was_training)
    texts = tokenizer.batch_decode([streams[0] for streams in out], skip_special_tokens=True)
    return float(np.mean([is_correct(t, int(p.reference)) for t, p in zip(texts, prompts, strict=True)]))


@dataclass(frozen=True)
class WarmStart:
    """What a warm start did: ``steps`` taken, greedy held-out ``accuracy`` of the final model, every
    ``(step, accuracy)`` check on the way, the last step's loss."""

    steps: int
    accuracy: float
    checks: list[tuple[int, float]]
    final_loss: float | None


def warm_start_to_target(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    task: ArithTask,
    *,
    target_accuracy: float | None,
    max_steps: int,
    check_every: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> WarmStart:
    """``sft_warm_start`` until the first check (greedy accuracy on ``task``'s eval prompts, every ``check_every``
    steps) at or above ``target_accuracy``, ``max_steps`` at most; ``target_accuracy=None``: exactly ``max_steps``
    steps and no checks. The final model's accuracy is measured either way. Checks draw no random numbers, so the
    first n steps are the same with or without a target."""
    if target_accuracy is not None and not 0.0 <= target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must be in [0, 1] or None, got {target_accuracy!r}")
    if max_steps < 0 or check_every < 1:
        raise ValueError(f"need max_steps >= 0 and check_every >= 1, got {max_steps} and {check_every}")
    eval_set = task.eval_prompts()
    # The answer's digits and one more token: a longer greedy budget cannot change which answers are exact.
    answer_tokens = len(str(2 * task.max_operand)) + 1
    checks: list[tuple[int, float]] = []

    def reached(step: int) -> bool:
        if target_accuracy is None or step % check_every:
            return False
        checks.append((step, greedy_accuracy(model, tokenizer, eval_set, max_new_tokens=answer_tokens)))
        return checks[-1][1] >= target_accuracy

    losses = sft_warm_start(model, tokenizer, task, steps=max_steps, lr=lr, batch_size=batch_size, seed=seed,
                            until=reached)  # fmt: skip
    steps = len(losses)
    if checks and checks[-1][0] == steps:
        accuracy = checks[-1][1]
    else:
        accuracy = greedy_accuracy(model, tokenizer, eval_set, max_new_tokens=answer_tokens)
    if target_accuracy is not None and accuracy < target_accuracy:
        log.warning("tiny model warm start: greedy accuracy %.3f after %d steps (the cap), below the target %.3f",
                    accuracy, steps, target_accuracy)  # fmt: skip
    return WarmStart(steps=steps, accuracy=accuracy, checks=checks, final_loss=losses[-1] if losses else None)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_tiny(
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_operand: int = 99,
    eval_prompts: int = 500,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 64,
    sft_target_accuracy: float | None = 0.30,
    sft_max_steps: int = 1000,
    sft_check_every: int = 10,
    sft_lr: float = 1e-3,
    sft_batch_size: int = 64,
) -> Path:
    """Build tokenizer + model, warm-start, save both in HF layout (written to a temp dir, then renamed).

    The warm start (``warm_start_to_target``) stops at the first held-out check at or above ``sft_target_accuracy``,
    after ``sft_max_steps`` at most (a warning then says the target was not reached); ``sft_target_accuracy=None``
    trains exactly ``sft_max_steps`` steps. ``omni_ray_tiny.json`` records the steps taken, the accuracy reached and
    every check.
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    with _torch_threads(BUILD_THREADS):
        tokenizer = build_tokenizer()
        model = build_model(
            tokenizer,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            seed=seed,
        )
        task = ArithTask(max_operand=max_operand, seed=seed, eval_size=eval_prompts)
        warm = warm_start_to_target(model, tokenizer, task, target_accuracy=sft_target_accuracy,
                                    max_steps=sft_max_steps, check_every=sft_check_every, lr=sft_lr,
                                    batch_size=sft_batch_size, seed=seed)  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {
        "seed": seed,
        "sft_steps": warm.steps,
        "sft_accuracy": warm.accuracy,
        "sft_target_accuracy": sft_target_accuracy,
        "sft_target_reached": None if sft_target_accuracy is None else warm.accuracy >= sft_target_accuracy,
        "sft_max_steps": sft_max_steps,
        "sft_check_every": sft_check_every,
        "sft_checks": [list(c) for c in warm.checks],
        "eval_prompts": eval_prompts,
        "final_sft_loss": warm.final_loss,
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": round(time.perf_counter() - t0, 2),
    }
    write_json(tmp / "omni_ray_tiny.json", info)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
