"""Scorers that tests load by name through `scoring.scorers[].type: python`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from omni_ray.scoring import Scorer, ScoreResult

#: What `record_kwargs` was called with, one dict per call (tests clear it first).
RECEIVED: list[dict[str, Any]] = []


def length_score(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def nan_or_constant(prompts: list[str], responses: list[str]) -> list[float]:
    """Every response scores the same, except responses starting with '1' score NaN: no usable pair anywhere."""
    return [math.nan if r.startswith("1") else 5.0 for r in responses]


def level_and_match(prompts: list[str], responses: list[str], references: list[str], level: list[int]):
    """score = the row's `level` column; correct = the response equals the row's reference (a tuple return)."""
    return [float(x) for x in level], [r == ref for r, ref in zip(responses, references)]


def level_as_mapping(prompts: list[str], responses: list[str], *, level: list[int]) -> dict[str, list]:
    """The `level` column as the score, returned as a mapping without correct flags (and no references taken)."""
    return {"scores": [float(x) for x in level]}


def record_kwargs(prompts: list[str], responses: list[str], **kwargs: Any) -> list[float]:
    """Takes **kwargs, so it gets every column; records them and scores 1.0."""
    RECEIVED.append(kwargs)
    return [1.0] * len(responses)


def one_flag_too_few(prompts: list[str], responses: list[str]):
    return [1.0] * len(responses), [True] * (len(responses) - 1)


def flags_that_are_not_bools(prompts: list[str], responses: list[str]) -> dict[str, list]:
    return {"scores": [1.0] * len(responses), "correct": [True, None, 1][: len(responses)]}


def mapping_with_a_typo(prompts: list[str], responses: list[str]) -> dict[str, list]:
    return {"scores": [1.0] * len(responses), "corect": [True] * len(responses)}


class ReferenceLength(Scorer):
    """A Scorer class: score = len(reference) (0-10), correct = the response names the reference's length."""

    name = "reference_length"
    scale = (0.0, 10.0)

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> ScoreResult:
        lengths = [len(ref) for ref in references]
        return ScoreResult(
            scores=np.asarray(lengths, dtype=float),
            correct=[r == str(n) for r, n in zip(responses, lengths)],
            scale=self.scale,
        )
