"""User scorers written in Python (type ``python``, ``target: module:name``): a scoring function or a Scorer class.

A function is called as ``fn(prompts, responses, **row_data)`` with the keyword parameters it declares out of
``references`` and the ``data.extra_columns`` (all of them when it takes ``**kwargs``), the way TRL's reward
functions get the dataset's columns; a two-argument ``fn(prompts, responses)`` gets none. It returns one of:

- a sequence of scores (one per response, on the declared scale; NaN for none);
- a tuple ``(scores, correct)``: the scores and one True/False answer check per response;
- a mapping ``{"scores": [...], "correct": [...]}`` (``correct`` optional).

A Scorer class is built with no arguments and scored like any scorer: its ``score(prompts, responses, **kwargs)``
gets the row data it declares and returns a :class:`~omni_ray.scoring.base.ScoreResult`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from numbers import Number
from typing import Any

import numpy as np

from omni_ray.scoring.base import Scorer, ScoreResult, accepted_kwargs, check_inputs, register_scorer

__all__ = ["FunctionScorer", "python_scorer"]

_RESULT_KEYS = frozenset({"scores", "correct"})


class FunctionScorer(Scorer):
    """A scoring function (module docstring for its arguments and return values) on a declared scale."""

    def __init__(self, fn: Callable[..., Any], *, name: str, scale: tuple[float, float]) -> None:
        self.fn, self.name, self.scale = fn, name, scale

    def score(self, prompts: list[str], responses: list[str], **row_data: Sequence[Any]) -> ScoreResult:
        """The function's scores (and correct flags, when it returns them) for these responses."""
        check_inputs(prompts, responses)
        out = self.fn(prompts, responses, **accepted_kwargs(self.fn, row_data, who=f"python scorer {self.name!r}"))
        scores, correct = self._unpack(out)
        return ScoreResult(
            scores=np.asarray(scores, dtype=np.float64),
            correct=None if correct is None else self._flags(correct),
            scale=self.scale,
        )

    def _unpack(self, out: Any) -> tuple[Any, Any]:
        """(scores, correct or None) of a return value: a mapping, a (scores, correct) tuple or the scores."""
        if isinstance(out, Mapping):
            unknown = sorted(set(out) - _RESULT_KEYS)
            if "scores" not in out or unknown:
                raise ValueError(
                    f"python scorer {self.name!r} returned a mapping with keys {sorted(out)}; expected 'scores' and "
                    "optionally 'correct'"
                )
            return out["scores"], out.get("correct")
        if isinstance(out, tuple) and len(out) == 2 and not isinstance(out[0], Number):
            return out
        return out, None

    def _flags(self, correct: Any) -> np.ndarray:
        """Correct flags must be True / False, one per response (a None or a number is refused, naming the item)."""
        flags = list(correct)
        for i, v in enumerate(flags):
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"python scorer {self.name!r}: correct[{i}] is {v!r}; expected True or False")
        return np.asarray(flags, dtype=bool)


def python_scorer(target: str, *, scale: tuple[float, float]) -> Scorer:
    """A user scorer named ``module:name``: a Scorer class (built with no arguments) or a scoring function."""
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"python scorer {target!r} cannot be imported: {exc}") from None
    if isinstance(obj, type):
        return obj()
    if not callable(obj):
        raise ValueError(f"python scorer {target!r} is a {type(obj).__name__}, not a function or a Scorer class")
    return FunctionScorer(obj, name=target, scale=scale)


@register_scorer("python")
def _python(spec: Any, *, scale: tuple[float, float], where: str, **_: Any) -> Scorer:
    if ":" not in spec.target:
        raise ValueError(f"{where}.target: a python scorer needs 'module:name', got {spec.target!r}")
    return python_scorer(spec.target, scale=scale)
