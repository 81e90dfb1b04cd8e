"""Scorers that tests load by name through `scoring.scorers[].type: python`."""

import math


def length_score(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def nan_or_constant(prompts: list[str], responses: list[str]) -> list[float]:
    """Every response scores the same, except responses starting with '1' score NaN: no usable pair anywhere."""
    return [math.nan if r.startswith("1") else 5.0 for r in responses]
