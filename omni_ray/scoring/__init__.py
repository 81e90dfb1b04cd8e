"""Scoring role: scorers on declared scales and the service the scoring Ray actor wraps (see scorers.py).

Remote HTTP reward endpoints are in remote.py, LLM judges (pointwise ratings and PoP labels) in judge.py.
"""

from omni_ray.scoring.judge import JudgeScorer, PopJudge, judge_comparisons, parse_choice, parse_rating
from omni_ray.scoring.remote import HttpScorer, RemoteScorerError
from omni_ray.scoring.scorers import (
    RESCALE_MODES,
    ArithVerifier,
    MathVerifier,
    RewardModelScorer,
    Scorer,
    ScoreResult,
    ScoringService,
    WeightedScorer,
    build_scorer,
    extract_final_answer,
    math_answers_match,
)

__all__ = [
    "RESCALE_MODES",
    "ArithVerifier",
    "HttpScorer",
    "JudgeScorer",
    "MathVerifier",
    "PopJudge",
    "RemoteScorerError",
    "RewardModelScorer",
    "ScoreResult",
    "Scorer",
    "ScoringService",
    "WeightedScorer",
    "build_scorer",
    "extract_final_answer",
    "judge_comparisons",
    "math_answers_match",
    "parse_choice",
    "parse_rating",
]
