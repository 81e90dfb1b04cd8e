"""Scoring role: (prompt, response) -> score on a declared scale, and the service the scoring Ray actor wraps.

Modules by role: ``base`` (ScoreResult, the Scorer contract, checks, scales, the registry of scorer types),
``verifiers`` (arith / math answer checks), ``reward_model`` (HF sequence classifier), ``remote`` (HTTP endpoint),
``judge`` (LLM rating and PoP judges), ``custom`` (python scorers named ``module:name``) and ``service``
(WeightedScorer, build_scorer, ScoringService). Importing the package registers every scorer type; torch,
transformers, urllib3 and vLLM are imported only when a scorer that needs them is built or called.
"""

from omni_ray.scoring.base import (
    RESCALE_MODES,
    Scorer,
    ScoreResult,
    check_range,
    registered_scorer_types,
    rescale_per_round,
    rescale_scores,
)
from omni_ray.scoring.custom import python_scorer
from omni_ray.scoring.judge import JudgeScorer, PopJudge, judge_comparisons, parse_choice, parse_rating
from omni_ray.scoring.remote import HttpScorer, RemoteScorerError
from omni_ray.scoring.reward_model import RewardModelScorer
from omni_ray.scoring.service import CorrectAtScorer, ScoringService, WeightedScorer, build_scorer
from omni_ray.scoring.verifiers import ArithVerifier, MathVerifier, extract_final_answer, math_answers_match

#: The ``scoring.scorers[i].type`` values a config may use (every type the modules above register).
SCORER_TYPES: tuple[str, ...] = registered_scorer_types()

__all__ = [
    "RESCALE_MODES",
    "SCORER_TYPES",
    "ArithVerifier",
    "CorrectAtScorer",
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
    "check_range",
    "extract_final_answer",
    "judge_comparisons",
    "math_answers_match",
    "parse_choice",
    "parse_rating",
    "python_scorer",
    "rescale_per_round",
    "rescale_scores",
]
