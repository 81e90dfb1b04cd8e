"""Scoring role: scorers on declared scales and the service the scoring Ray actor wraps (see scorers.py)."""

from omni_ray.scoring.scorers import (
    RESCALE_MODES,
    ArithVerifier,
    RewardModelScorer,
    Scorer,
    ScoreResult,
    ScoringService,
    WeightedScorer,
    build_scorer,
)

__all__ = [
    "RESCALE_MODES",
    "ArithVerifier",
    "RewardModelScorer",
    "ScoreResult",
    "Scorer",
    "ScoringService",
    "WeightedScorer",
    "build_scorer",
]
