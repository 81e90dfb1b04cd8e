"""`omni-ray make-tiny`: a tiny Llama + tokenizer built offline, warm-started by a short seeded SFT.

Why these choices (docs/methods.md sec. 5, measured on the 2-core CPU machine):
- The tokenizer is a byte-level BPE with no merges over the task's alphabet, i.e. one token per character. A BPE
  with merges tokenizes numbers inconsistently and learned addition about 3x slower; digits as tokens is what makes
  preference learning visible in minutes.
- Llama hidden 256 / 4 layers / 8 heads / 4 kv heads (head_dim 32, the minimum vLLM's CPU attention supports).
- The SFT warm start stops early, while accuracy is still rising: a plateaued warm start leaves nothing to learn.
Everything is a function of the seed, so `omni-ray train` can rebuild a missing model deterministically.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from omni_ray.data.arith import ArithTask

ALPHABET = list("0123456789+-*=") + [" "]
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


def encode_prompt(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Prompt token ids as every role sees them: BOS + the text's tokens (no EOS). A text that already starts with the
    BOS token (a chat template's output) keeps its own."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


def sft_warm_start(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    task: ArithTask,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Supervised steps on (prompt -> answer + EOS), loss on the answer tokens only. Returns the loss curve."""
    rng = np.random.default_rng([seed, 3])
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    losses = []
    for _ in range(steps):
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
    model.eval()
    return losses


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
    sft_steps: int = 330,
    sft_lr: float = 1e-3,
    sft_batch_size: int = 64,
) -> Path:
    """Build tokenizer + model, warm-start, save both in HF layout (written to a temp dir, then renamed)."""
    out = Path(out_dir)
    t0 = time.perf_counter()
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
    losses = sft_warm_start(model, tokenizer, task, steps=sft_steps, lr=sft_lr, batch_size=sft_batch_size, seed=seed)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {
        "seed": seed,
        "sft_steps": sft_steps,
        "final_sft_loss": losses[-1] if losses else None,
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": round(time.perf_counter() - t0, 2),
    }
    (tmp / "omni_ray_tiny.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
