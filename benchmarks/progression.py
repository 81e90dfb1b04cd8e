"""The generation-heavy workload of benchmarks/peer_trl.py: continue an arithmetic progression for 64 tokens.

Prompt `a+d=` (a in 0..999, d in 1..19); the reference is the progression a+d, a+2d, ... written with single
spaces and cut to exactly RESPONSE_TOKENS characters, e.g. `17+3=` -> `20 23 26 29 32 35 ...`. The tiny task's
tokenizer (one token per character, omni_ray.models.tiny) makes that exactly 64 tokens, so every completion is a
64-token generation, as long generations dominate real runs. Why this task:

- it is verifiable with a dense score, like the arith task's partial credit: score = 10 * (characters equal to
  the reference at the same position) / 64 on a 0-10 scale, correct = all 64 characters right. Per-position credit
  rewards the format (spaces where the reference has them) and every right digit, so two samples of one prompt
  almost always score differently and a 2-sample pair carries a preference. (A correct-prefix score was tried
  first: with the short warm start nearly every sample scored 0 or 0.16, i.e. mostly tied pairs.);
- it reuses the arith alphabet (digits, +, =, space), so the tokenizer and model builder of omni_ray.models.tiny
  serve unchanged;
- a short SFT warm start teaches the format while leaving the arithmetic of later terms to learn. Its targets are
  the 64 characters + EOS, so EOS is learnt as the 65th token, which generation (max_new_tokens=64) never reaches:
  completions are 64 tokens long. A randomly initialised model would sample EOS about once every 17 tokens.

`ProgressionVerifier` is a `python` scorer for omni-ray (`benchmarks.progression:ProgressionVerifier`, built by the
scoring actor with no arguments) and the reward function of the TRL side: both sides score with the same code.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from omni_ray.data.arith import SCORE_SCALE
from omni_ray.scoring import Scorer, ScoreResult

RESPONSE_TOKENS = 64
MAX_START, MAX_STEP = 999, 19
_PROMPT = re.compile(r"\s*(?:<s>)?(\d+)\+(\d+)=\s*")


def reference(a: int, d: int) -> str:
    terms, text = [], ""
    k = 1
    while len(text) < RESPONSE_TOKENS:
        terms.append(str(a + k * d))
        text = " ".join(terms)
        k += 1
    return text[:RESPONSE_TOKENS]


def reference_of(prompt: str) -> str:
    """Ground truth recomputed from the prompt text (a leading `<s>`, as TRL's prompts carry it, is allowed)."""
    m = _PROMPT.fullmatch(prompt)
    if not m:
        raise ValueError(f"not a progression prompt: {prompt!r}")
    return reference(int(m.group(1)), int(m.group(2)))


def quality(response: str, ref: str) -> float:
    """10 * the fraction of the reference's characters that the response has at the same position."""
    return 10.0 * sum(x == y for x, y in zip(response, ref)) / len(ref)


class ProgressionVerifier(Scorer):
    """score = 10 * characters right at their position / 64 (0-10); correct = the whole 64-character continuation."""

    name = "progression_verifier"
    scale = SCORE_SCALE

    def score(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        refs = [reference_of(p) for p in prompts]
        scores = np.array([quality(r, ref) for r, ref in zip(responses, refs)], dtype=np.float64)
        correct = np.array([r[: len(ref)] == ref for r, ref in zip(responses, refs)], dtype=bool)
        return ScoreResult(scores=scores, correct=correct, scale=self.scale)


class ProgressionTask:
    """All (a, d) problems, a seeded permutation: the first `eval_size` are held out (the eval set, never trained on,
    also not by the SFT warm start); `train_rows()` are the rest. `sft_batch` is what omni_ray.models.tiny's
    `sft_warm_start` draws from (64 characters, then EOS: see the module docstring)."""

    def __init__(self, seed: int = 0, eval_size: int = 200):
        n = (MAX_START + 1) * MAX_STEP
        order = np.random.default_rng([seed, 23]).permutation(n)
        self._eval, self._train = order[:eval_size], order[eval_size:]

    @staticmethod
    def _problem(code: int) -> tuple[str, str]:
        a, d = divmod(int(code), MAX_STEP)
        return f"{a}+{d + 1}=", reference(a, d + 1)

    def eval_rows(self) -> list[tuple[str, str]]:
        return [self._problem(c) for c in self._eval]

    def train_rows(self) -> list[tuple[str, str]]:
        return [self._problem(c) for c in self._train]

    def sft_batch(self, rng: np.random.Generator, size: int) -> list[tuple[str, str]]:
        return [self._problem(c) for c in rng.choice(self._train, size=size)]


def write_prompt_dir(path: Path, task: ProgressionTask) -> Path:
    """The omni-ray prompt dataset (`data.source=prompts`, `data.split=train`, `data.eval_split=eval`): a dir with
    train.jsonl and eval.jsonl (`prompt`, `answer` per line). Split files keep the eval rows the ones the SFT warm
    start never saw; the benchmark takes both sides' prompts from a PromptDataset over this dir."""
    path.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", task.train_rows()), ("eval", task.eval_rows())):
        tmp = path / f"{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps({"prompt": p, "answer": r}) + "\n" for p, r in rows))
        tmp.replace(path / f"{split}.jsonl")
    return path


def build_model(out: Path, *, sft_steps: int, sft_batch_size: int = 16, sft_lr: float = 1e-3, seed: int = 0,
                hidden: int = 512, layers: int = 12, heads: int = 8, intermediate: int = 2048) -> dict:  # fmt: skip
    """A ~50M-parameter Llama (hidden 512, 12 layers, head_dim 64) with the tiny task's tokenizer, warm-started by
    `sft_steps` SFT steps on the progression task; cached (rebuilt only when missing). Returns its build info."""
    info_path = out / "omni_ray_bench.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    import torch

    from omni_ray.models.tiny import build_model as build_llama
    from omni_ray.models.tiny import build_tokenizer, sft_warm_start

    t0 = time.perf_counter()
    tok = build_tokenizer()
    model = build_llama(tok, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=96, seed=seed)  # fmt: skip
    task = ProgressionTask(seed=seed)
    losses = sft_warm_start(model, tok, task, steps=sft_steps, lr=sft_lr, batch_size=sft_batch_size, seed=seed)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "sft_steps": sft_steps,
        "sft_batch_size": sft_batch_size,
        "sft_lr": sft_lr,
        "final_sft_loss": losses[-1] if losses else None,
        "build_s": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (tmp / "omni_ray_bench.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return info
