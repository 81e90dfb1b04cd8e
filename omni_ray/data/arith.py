"""The built-in verifiable task: integer addition `a+b=` with a, b in 0..max_operand.

Quality is partial credit, so it can differ from correctness and the Omni-DPO quality weight has something to see
(docs/methods.md sec. 5): S = 10 * exp(-|pred - true| / 10), 0 when the answer does not parse. Exactly right scores 10.
Prompts are drawn from a seeded stream; the eval prompts are a fixed set that training prompts never repeat.
"""

from __future__ import annotations

import math
import re

import numpy as np

from omni_ray.data import Prompt

SCORE_SCALE = (0.0, 10.0)
_ANSWER = re.compile(r"^\s*(-?\d+)")


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def parse_answer(response: str) -> int | None:
    """The leading integer of a response, or None when there is none."""
    m = _ANSWER.match(response)
    return int(m.group(1)) if m else None


def quality(response: str, answer: int) -> float:
    """S = 10 * exp(-|pred - true| / 10); 0 if unparseable."""
    pred = parse_answer(response)
    if pred is None:
        return 0.0
    return 10.0 * math.exp(-abs(pred - answer) / 10.0)


def is_correct(response: str, answer: int) -> bool:
    return parse_answer(response) == answer


def answer_of(prompt: str) -> int:
    """The true answer of an arith prompt text (the verifier's ground truth, recomputed from the text)."""
    m = re.fullmatch(r"\s*(\d+)\+(\d+)=\s*", prompt)
    if not m:
        raise ValueError(f"not an arith prompt: {prompt!r}")
    return int(m.group(1)) + int(m.group(2))


class ArithTask:
    """Seeded prompt streams. The eval set is fixed by the seed; training prompts exclude it."""

    def __init__(self, max_operand: int = 99, seed: int = 0, eval_size: int = 500):
        self.max_operand = max_operand
        self.seed = seed
        n = (max_operand + 1) ** 2
        if eval_size >= n:
            raise ValueError(f"data.eval_prompts ({eval_size}) must be < the number of distinct problems ({n})")
        order = np.random.default_rng([seed, 7]).permutation(n)
        self._eval_codes = order[:eval_size]
        self._train_codes = order[eval_size:]

    def _prompt(self, code: int, prefix: str) -> Prompt:
        a, b = divmod(int(code), self.max_operand + 1)
        return Prompt(prompt_id=f"{prefix}{a}+{b}", text=prompt_text(a, b), reference=str(a + b))

    def eval_prompts(self) -> list[Prompt]:
        return [self._prompt(c, "eval:") for c in self._eval_codes]

    def train_prompts(self, round_index: int, count: int) -> list[Prompt]:
        """Round r's prompts: a seeded draw from the training problems, a pure function of (seed, round)."""
        rng = np.random.default_rng([self.seed, 11, round_index])
        codes = rng.choice(self._train_codes, size=count, replace=count > len(self._train_codes))
        return [self._prompt(c, f"r{round_index}:{i}:") for i, c in enumerate(codes)]

    def sft_batch(self, rng: np.random.Generator, size: int) -> list[tuple[str, str]]:
        """(prompt, answer text) pairs for the warm-start SFT, from training problems only."""
        codes = rng.choice(self._train_codes, size=size)
        return [(p.text, p.reference) for p in (self._prompt(c, "") for c in codes)]
