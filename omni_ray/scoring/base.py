"""What every scorer shares: the result type, the Scorer contract, input / output checks, score scales, the registry.

Why every scorer declares a ``scale``: Omni-DPO's ``eta`` (quality weight) and ``tau_good`` (calibrated NLL gate) and
the ``math`` pair rule's ``good_threshold`` only mean something on a known range (docs/methods.md sec. 2 and 4). A
scorer states the range its scores live on; the scoring service keeps the raw scores (pairs are built and filtered on
what the scorer said) and maps them with :func:`rescale_scores` or :func:`rescale_per_round` to the configured range
for the loss.

What a scorer is handed: ``score(prompts, responses, **kwargs)``, where the keyword arguments are the prompts' row
data: ``references`` (one reference answer or None per item, ``data.answer_column``) and every column that
``data.extra_columns`` names, by its name. :func:`call_scorer` passes only the keyword parameters ``score`` declares
(all of them when it takes ``**kwargs``), so a two-argument ``score(prompts, responses)`` keeps working.

The registry maps a ``scoring.scorers[i].type`` to the factory that builds it (:func:`register_scorer`); each scorer
module registers its types when it is imported, and the package imports them all.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from omni_ray.data.arith import SCORE_SCALE

__all__ = [
    "RESCALE_MODES",
    "ScoreResult",
    "Scorer",
    "ScorerFactory",
    "accepted_kwargs",
    "call_scorer",
    "check_inputs",
    "check_range",
    "check_result",
    "registered_scorer_types",
    "register_scorer",
    "rescale_per_round",
    "rescale_scores",
    "scorer_factory",
]

RESCALE_MODES: tuple[str, ...] = ("none", "declared", "per_round")


@dataclass
class ScoreResult:
    """Scores of one batch of (prompt, response) pairs, aligned with the inputs.

    A scorer fills ``scores`` (on its declared scale), ``correct`` when it knows the answer check (verifiers do;
    ``None`` = unknown) and ``scale``. The scoring service adds the rest: ``raw_scores`` / ``raw_scale`` (what the
    scorer said, kept for pairing and audit), ``scores`` / ``scale`` after the configured rescale, the count of
    non-finite scores and the wall time spent (``busy_s``) so the driver can log per-stage busy time.

    ``unparseable`` is set by scorers that read a score out of generated text (LLM judges): how many responses got
    no score because the judge's output held no number on the scale (or the rating prompt did not fit the judge's
    context). Those responses score NaN, so they are also in ``nonfinite``; the separate count says why.
    """

    scores: np.ndarray
    correct: np.ndarray | None = None
    scale: tuple[float, float] | None = None
    raw_scores: np.ndarray | None = None
    raw_scale: tuple[float, float] | None = None
    nonfinite: int = 0
    busy_s: float = 0.0
    unparseable: int = 0

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.correct is not None:
            self.correct = np.asarray(self.correct, dtype=bool)
        if self.raw_scores is not None:
            self.raw_scores = np.asarray(self.raw_scores, dtype=np.float64)

    def __len__(self) -> int:
        return int(self.scores.shape[0]) if self.scores.ndim else 1


class Scorer(ABC):
    """Base of every scorer: a ``name``, a declared ``scale`` (lo, hi) and ``score(prompts, responses, **kwargs)``.

    Anything with these three attributes works where a scorer is expected (duck typing); subclassing documents the
    contract. ``score`` returns a :class:`ScoreResult` with one score per response, aligned with the inputs. It may
    declare keyword parameters for the row data it reads (``references``, extra column names; module docstring).

    ``needs_references = True`` says the scorer cannot score without a reference per item (a verifier checking
    answers against ground truth): the service reports it, so a caller knows the references must be passed.
    """

    name: str = "scorer"
    scale: tuple[float, float] = SCORE_SCALE
    needs_references: bool = False

    @abstractmethod
    def score(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        """Score each (prompt, response); one entry per response, on ``self.scale``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, scale={self.scale})"


# ---------------------------------------------------------------------------------------------------------------------
# checks and calls


def check_inputs(prompts: Sequence[Any], responses: Sequence[Any]) -> None:
    """Prompts and responses must be aligned one to one (ValueError with both counts)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: they must be aligned one to one")


def check_result(name: str, result: Any, n: int) -> ScoreResult:
    """A scorer's output must be a ScoreResult with exactly one score (and correctness flag) per response."""
    if not isinstance(result, ScoreResult):
        raise ValueError(f"scorer {name!r} returned {type(result).__name__}, expected a ScoreResult")
    if result.scores.ndim != 1 or result.scores.shape[0] != n:
        raise ValueError(
            f"scorer {name!r} returned scores of shape {tuple(result.scores.shape)} for {n} responses; "
            f"expected exactly {n} scores"
        )
    if result.correct is not None and (result.correct.ndim != 1 or result.correct.shape[0] != n):
        raise ValueError(
            f"scorer {name!r} returned {result.correct.size} correctness flags for {n} responses; expected {n}"
        )
    return result


def accepted_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], *, who: str = "scorer") -> dict[str, Any]:
    """The entries of ``kwargs`` that ``fn(prompts, responses, ...)`` declares as parameters after its first two;
    all of them when it takes ``**kwargs``.

    A declared parameter without a default that ``kwargs`` lacks is a ValueError naming ``who`` and the parameter
    (a scorer reading a column the prompts do not carry). A callable whose signature cannot be read gets none.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    declared = [p for p in params[2:] if p.kind in kinds]
    missing = [p.name for p in declared if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ValueError(
            f"{who} needs {', '.join(map(repr, missing))}, which the prompts' row data does not hold (it has "
            f"{sorted(kwargs) or 'nothing'}): references come from data.answer_column, columns from data.extra_columns"
        )
    return {p.name: kwargs[p.name] for p in declared if p.name in kwargs}


def call_scorer(scorer: Any, prompts: list[str], responses: list[str], row_data: Mapping[str, Any]) -> ScoreResult:
    """``scorer.score(prompts, responses, **declared)`` with the row data its ``score`` declares, checked.

    ``row_data`` holds ``references`` and the extra columns, each one value per item (module docstring).
    """
    result = scorer.score(prompts, responses, **accepted_kwargs(scorer.score, row_data, who=f"scorer {scorer.name!r}"))
    return check_result(scorer.name, result, len(responses))


# ---------------------------------------------------------------------------------------------------------------------
# scales


def check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    """``value`` as a finite ``(lo, hi)`` with ``hi > lo``; ValueError naming ``name`` otherwise."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from e
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"{name} must be finite with high > low, got {value!r}")
    return lo, hi


def rescale_scores(
    scores: np.ndarray | Sequence[float],
    *,
    scale: tuple[float, float],
    target: tuple[float, float] = (0.0, 10.0),
) -> np.ndarray:
    """Map scores linearly from a scorer's declared ``scale`` (lo, hi) to ``target`` (default 0-10).

    Use this when a scorer declares its range (e.g. a verifier on 0-1, a judge on 1-10) so that ``eta``,
    ``tau_good`` and ``good_threshold`` keep their meaning. The map is affine and NOT clipped: a score outside
    the declared scale lands outside ``target``. Non-finite scores stay non-finite (NaN stays NaN) and are dropped
    later by ``build_pairs``. Gaps are multiplied by ``(target_hi - target_lo) / (hi - lo)``.

    Raises:
        ValueError: if ``scale`` or ``target`` is not a finite (lo, hi) with hi > lo.
    """
    lo, hi = check_range("scale", scale)
    tlo, thi = check_range("target", target)
    x = np.asarray(scores, dtype=np.float64)
    return tlo + (x - lo) * ((thi - tlo) / (hi - lo))


def rescale_per_round(scores: np.ndarray | Sequence[float], target: tuple[float, float] = (0.0, 10.0)) -> np.ndarray:
    """Min-max normalise one round's scores to ``target`` (default 0-10).

    Min and max are taken over the finite scores only; non-finite entries are returned unchanged. If all finite
    scores are equal every finite score maps to the midpoint of ``target``. Use this when a scorer has no
    declared scale (e.g. an unbounded reward model). It makes gaps relative to the round: the same raw gap means a
    different rescaled gap in another round.

    Raises:
        ValueError: if ``target`` is not a finite (lo, hi) with hi > lo.
    """
    tlo, thi = check_range("target", target)
    x = np.array(scores, dtype=np.float64, copy=True)
    finite = np.isfinite(x)
    if not finite.any():
        return x
    lo, hi = float(x[finite].min()), float(x[finite].max())
    if hi == lo:
        x[finite] = 0.5 * (tlo + thi)
    else:
        x[finite] = tlo + (x[finite] - lo) * ((thi - tlo) / (hi - lo))
    return x


# ---------------------------------------------------------------------------------------------------------------------
# registry

#: ``factory(spec, *, scale, device, trust_remote_code, where) -> Scorer``: ``spec`` is a ``ScorerSpec``, ``scale``
#: its checked declared range, ``where`` the config path for messages (``scoring.scorers[i]``).
ScorerFactory = Callable[..., Scorer]

_FACTORIES: dict[str, ScorerFactory] = {}


def register_scorer(type_name: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Decorator registering the factory of scorer type ``type_name`` (once: a second registration raises)."""

    def register(factory: ScorerFactory) -> ScorerFactory:
        if type_name in _FACTORIES:
            raise ValueError(f"scorer type {type_name!r} is already registered")
        _FACTORIES[type_name] = factory
        return factory

    return register


def scorer_factory(type_name: str, where: str = "scorer") -> ScorerFactory:
    """The factory registered for ``type_name``; ValueError naming ``where`` and the registered types otherwise."""
    try:
        return _FACTORIES[type_name]
    except KeyError:
        raise ValueError(
            f"{where}.type: unknown scorer type {type_name!r}; registered: {', '.join(registered_scorer_types())}"
        ) from None


def registered_scorer_types() -> tuple[str, ...]:
    """The scorer types registered so far, sorted."""
    return tuple(sorted(_FACTORIES))
