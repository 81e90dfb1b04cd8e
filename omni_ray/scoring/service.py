"""Scorers combined and served: step 2 of an online round (docs/methods.md sec. 2 and 4).

- :func:`build_scorer`: the scorer a ``scoring.scorers`` list describes, each entry built by the factory its
  ``type`` registered (:mod:`omni_ray.scoring.base`); several entries make a :class:`WeightedScorer`.
- :class:`CorrectAtScorer`: a scorer whose answer check is "score >= ``correct_at``" (a spec's ``correct_at``).
- :class:`ScoringService`: what the scoring Ray actor runs: the scorer, the prompts' row data handed to it, the
  configured rescale, checks and accounting. Plain Python, no Ray: the driver wraps it in ``ray.remote``.

Non-finite scores (a reward model overflowing, a custom scorer returning NaN) are passed through, not hidden:
``build_pairs`` drops and counts those samples, and :class:`ScoringService` counts them per call (``nonfinite``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omni_ray.config import ScorerSpec, ScoringConfig
from omni_ray.scoring.base import (
    RESCALE_MODES,
    Scorer,
    ScoreResult,
    call_scorer,
    check_inputs,
    check_range,
    rescale_per_round,
    rescale_scores,
    scorer_factory,
)
from omni_ray.tracking import BusyClock

__all__ = ["CorrectAtScorer", "ScoringService", "WeightedScorer", "build_scorer"]

log = logging.getLogger(__name__)

#: Argument names of ``score`` that an extra column cannot take.
_RESERVED_COLUMNS = frozenset({"prompts", "responses", "references"})


class WeightedScorer(Scorer):
    """Weighted mean of several scorers, each first mapped from its own declared scale to ``target``.

    Mapping before averaging is what makes the weights mean what they say: a verifier on 0-1 and a reward model on
    -5..5 would otherwise be mixed in arbitrary units. The combination's declared scale is ``target``; a NaN from
    any member makes that response's combined score NaN (it is dropped and counted downstream, not averaged away).
    ``correct`` is taken from the first member that reports one. Each member gets the row data its ``score``
    declares; the combination needs references when any member does.
    """

    def __init__(
        self, scorers: Sequence[Scorer], weights: Sequence[float], *, target: tuple[float, float] = (0.0, 10.0)
    ) -> None:
        if not scorers:
            raise ValueError("WeightedScorer needs at least one scorer")
        if len(weights) != len(scorers):
            raise ValueError(f"{len(scorers)} scorers but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"scorer weights must be finite and > 0, got {list(weights)}")
        self.scorers = list(scorers)
        self.weights = w / w.sum()
        self.scale = check_range("WeightedScorer target", target)
        self.needs_references = any(getattr(s, "needs_references", False) for s in self.scorers)
        parts = [f"{s.name}*{float(x):g}" for s, x in zip(self.scorers, w, strict=True)]
        self.name = "weighted(" + ", ".join(parts) + ")"

    def score(self, prompts: list[str], responses: list[str], **row_data: Sequence[Any]) -> ScoreResult:
        """Each member scores, is rescaled to the common target, then the normalised weighted sum is taken."""
        check_inputs(prompts, responses)
        total = np.zeros(len(responses), dtype=np.float64)
        correct: np.ndarray | None = None
        unparseable = 0
        for scorer, w in zip(self.scorers, self.weights, strict=True):
            res = call_scorer(scorer, prompts, responses, row_data)
            total += w * rescale_scores(res.scores, scale=tuple(scorer.scale), target=self.scale)
            unparseable += int(res.unparseable)
            if correct is None and res.correct is not None:
                correct = res.correct
        return ScoreResult(scores=total, correct=correct, scale=self.scale, unparseable=unparseable)


class CorrectAtScorer(Scorer):
    """``scorer`` with its answer check replaced by "score >= ``correct_at``" on its declared scale.

    For scorers that know no ground truth themselves (a reward model, a judge, an endpoint), so evaluation still
    reports an accuracy; a NaN score is not correct. Scores, name and scale are the wrapped scorer's.
    """

    def __init__(self, scorer: Scorer, correct_at: float) -> None:
        if not math.isfinite(correct_at):
            raise ValueError(f"correct_at must be a finite score, got {correct_at!r}")
        self.scorer = scorer
        self.correct_at = float(correct_at)
        self.name, self.scale = scorer.name, scorer.scale
        self.needs_references = bool(getattr(scorer, "needs_references", False))

    def score(self, prompts: list[str], responses: list[str], **row_data: Sequence[Any]) -> ScoreResult:
        """The wrapped scorer's scores; ``correct`` = score >= ``correct_at``."""
        res = call_scorer(self.scorer, prompts, responses, row_data)
        with np.errstate(invalid="ignore"):
            correct = res.scores >= self.correct_at
        return ScoreResult(scores=res.scores, correct=correct, scale=res.scale, unparseable=res.unparseable)


def _spec(spec: ScorerSpec | Mapping[str, Any]) -> ScorerSpec:
    return ScorerSpec(**dict(spec)) if isinstance(spec, Mapping) else spec


def build_scorer(
    specs: Sequence[ScorerSpec | Mapping[str, Any]], *, device: str = "cpu", trust_remote_code: bool = False
) -> Scorer:
    """The scorer a ``scoring.scorers`` list describes: one spec gives that scorer, several a WeightedScorer (0-10).

    Each spec is built by the factory its ``type`` registered (an unknown type is a ValueError listing the
    registered ones), on its declared scale (``scale_low`` / ``scale_high``); a spec with ``correct_at`` is wrapped
    in a :class:`CorrectAtScorer`. A spec's ``batch_size`` (when > 0) overrides the scorer's default.
    """
    if not specs:
        raise ValueError("scoring.scorers is empty: at least one scorer is needed")
    scorers: list[Scorer] = []
    weights: list[float] = []
    for i, raw in enumerate(specs):
        spec = _spec(raw)
        where = f"scoring.scorers[{i}]"
        scale = check_range(f"{where} scale", (spec.scale_low, spec.scale_high))
        factory = scorer_factory(spec.type, where)
        scorer = factory(spec, scale=scale, device=device, trust_remote_code=trust_remote_code, where=where)
        if spec.correct_at is not None:
            scorer = CorrectAtScorer(scorer, spec.correct_at)
        scorers.append(scorer)
        weights.append(float(spec.weight))
    if len(scorers) == 1:
        return scorers[0]
    return WeightedScorer(scorers, weights, target=(0.0, 10.0))


class ScoringService:
    """What the scoring Ray actor runs: a scorer plus the configured rescale, with checks and accounting.

    ``rescale``:
    - ``none``: ``scores`` = raw scores, ``scale`` = the scorer's declared scale;
    - ``declared``: affine map from the declared scale to ``(rescale_low, rescale_high)`` (not clipped);
    - ``per_round``: min-max over this call's finite scores to ``(rescale_low, rescale_high)``, for scorers whose
      range is unknown; call it once per round with the whole round's samples, or gaps change meaning between calls.

    ``specs`` is the ``scoring.scorers`` list, or an already built scorer (custom scorers, tests); ``device`` and
    ``trust_remote_code`` reach the scorers that load models.
    """

    def __init__(
        self,
        specs: Sequence[ScorerSpec | Mapping[str, Any]] | Scorer,
        rescale: str = "declared",
        rescale_low: float = 0.0,
        rescale_high: float = 10.0,
        *,
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> None:
        if rescale not in RESCALE_MODES:
            raise ValueError(f"unknown rescale mode {rescale!r}; valid: {', '.join(RESCALE_MODES)}")
        self.target = check_range("scoring.rescale_low/rescale_high", (rescale_low, rescale_high))
        self.rescale = rescale
        if hasattr(specs, "score"):
            self.scorer: Scorer = specs  # type: ignore[assignment]
        else:
            self.scorer = build_scorer(specs, device=device, trust_remote_code=trust_remote_code)  # type: ignore[arg-type]
        self.declared_scale = check_range(f"scorer {self.scorer.name!r} scale", self.scorer.scale)
        self.clock = BusyClock()

    @classmethod
    def from_config(cls, cfg: ScoringConfig, *, device: str = "cpu", trust_remote_code: bool = False) -> ScoringService:
        """From a ``ScoringConfig`` (``scorers``, ``rescale``, ``rescale_low``, ``rescale_high``)."""
        return cls(
            list(cfg.scorers),
            cfg.rescale,
            cfg.rescale_low,
            cfg.rescale_high,
            device=device,
            trust_remote_code=trust_remote_code,
        )

    @property
    def scale(self) -> tuple[float, float]:
        """The scale of the ``scores`` this service returns (after rescaling)."""
        return self.declared_scale if self.rescale == "none" else self.target

    @property
    def needs_references(self) -> bool:
        """Whether ``score`` must be given a reference answer per item (a ``math_verifier`` is configured)."""
        return bool(getattr(self.scorer, "needs_references", False))

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        references: Sequence[str | None] | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> ScoreResult:
        """Score, validate the count, rescale; raw scores, non-finite count and busy time ride along.

        ``references`` (one reference answer or None per item) and ``columns`` (``data.extra_columns``: column name
        -> one value per item) are aligned with the responses; each scorer gets those its ``score`` declares, so a
        caller may always pass them. A wrong length is a ValueError naming the column.
        """
        with self.clock.timing("score"):
            return self._score(list(prompts), list(responses), references, columns or {})

    def busy(self) -> dict[str, float]:
        """Seconds spent scoring since start-up (`BusyClock.totals`)."""
        return self.clock.totals()

    def _score(
        self,
        prompts: list[str],
        responses: list[str],
        references: Sequence[str | None] | None,
        columns: Mapping[str, Sequence[Any]],
    ) -> ScoreResult:
        t0 = time.perf_counter()
        check_inputs(prompts, responses)
        res = call_scorer(self.scorer, prompts, responses, _row_data(len(responses), references, columns))
        raw = res.scores.copy()
        if self.rescale == "none":
            scores = raw.copy()
        elif self.rescale == "declared":
            scores = rescale_scores(raw, scale=self.declared_scale, target=self.target)
        else:
            scores = rescale_per_round(raw, target=self.target)
        nonfinite = int((~np.isfinite(raw)).sum())
        if nonfinite:
            log.warning(
                "%s: %d of %d scores are NaN/inf (passed through; pairing drops them)",
                self.scorer.name,
                nonfinite,
                len(raw),
            )
        return ScoreResult(
            scores=scores,
            correct=res.correct,
            scale=self.scale,
            raw_scores=raw,
            raw_scale=self.declared_scale,
            nonfinite=nonfinite,
            busy_s=time.perf_counter() - t0,
            unparseable=int(res.unparseable),
        )


def _row_data(
    n: int, references: Sequence[str | None] | None, columns: Mapping[str, Sequence[Any]]
) -> dict[str, list[Any]]:
    """``references`` and the extra columns as keyword arguments for the scorers, each checked to hold n values."""
    out: dict[str, list[Any]] = {}
    if references is not None:
        out["references"] = list(references)
        if len(out["references"]) != n:
            raise ValueError(f"{len(out['references'])} references but {n} responses: they must be aligned")
    for name, values in columns.items():
        if name in _RESERVED_COLUMNS:
            raise ValueError(
                f"extra column {name!r} cannot be handed to scorers by name: {', '.join(sorted(_RESERVED_COLUMNS))} "
                "are the names of score's own arguments"
            )
        out[name] = list(values)
        if len(out[name]) != n:
            raise ValueError(f"extra column {name!r} has {len(out[name])} values for {n} responses")
    return out
