"""Preference pairs from scored samples (step 3 of an online round, docs/methods.md sec. 2 and 4).

Pure Python / numpy: no Ray, no torch.

A round produces N samples per prompt, each with a raw score from the configured scorers. ``build_pairs`` turns
them into at most one (chosen, rejected) pair per prompt with one of three rules:

- ``best_worst`` (default; the paper's chat recipe and RLHFlow's iterative DPO): chosen = highest score,
  rejected = lowest score.
- ``best_random``: chosen = highest score, rejected = uniform among samples scored strictly lower.
- ``math`` (the paper's math recipe): chosen = best-scored *correct* sample with score > ``good_threshold``;
  rejected = the lowest-scored correct sample scored below it if any, else the lowest-scored wrong one scored
  below it.

Nothing is resolved silently by index order: ties for best / worst are broken uniformly at random with the seeded
``rng`` (and counted), and every prompt that yields no pair is counted under exactly one ``dropped_*`` reason, so
``prompts == prompts_with_pairs + dropped_single_sample + dropped_all_tied + dropped_no_candidate +
dropped_identical_text + dropped_min_gap`` always holds. ``dropped_nonfinite_samples`` counts *samples* (NaN / inf
scores are removed before pairing and the run goes on), not prompts.

Null control (``swap_prob``): each emitted pair has its chosen and rejected *responses* swapped with that probability
(counted in ``swapped``). The *scores stay in place*: ``score_chosen`` is still the higher score and the gap is still
positive, so every score-dependent term of the loss (the Omni-DPO quality weight sigma(eta * gap), the calibrated-NLL
mask S_w >= tau_good, PoP gap labels) sees exactly what it would see without the swap. Swapping the scores along with
the responses would leak the true label: a swapped pair would show a negative gap, sigma(eta * gap) would all but
switch it off, and the preference signal would survive in the weights. With positional scores nothing the learner
sees tells a swapped pair from an unswapped one, so at ``swap_prob = 0.5`` the expected preference signal is zero.
``chosen_correct`` / ``rejected_correct`` travel with their responses (they describe them) and ``Pair.swapped`` is
recorded in ``pairs.jsonl``.

Score scales: ``eta`` (Omni-DPO quality weight) and ``tau_good`` / ``good_threshold`` only mean something on a
known scale. Scorers declare their scale, and the scoring service maps it to a fixed target range
(``omni_ray.scoring.rescale_scores`` / ``rescale_per_round``, docs/methods.md sec. 2: "scorers must report scores on
a declared scale, and the pipeline can rescale per round").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = [
    "STRATEGIES",
    "Pair",
    "PairStats",
    "Sample",
    "build_pairs",
]

STRATEGIES: tuple[str, ...] = ("best_worst", "best_random", "math")


@dataclass
class Sample:
    """One sampled response with its raw score.

    ``score`` is on the scorer's declared scale (rescale before pairing if the strategy needs a fixed scale, e.g.
    ``math`` with ``good_threshold`` on 0-10). ``correct`` is the verifier's answer check when known (``None``
    = unknown). ``policy_version`` is the weights version that generated the response.
    """

    prompt_id: str
    prompt: str
    response: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    score: float
    correct: bool | None = None
    policy_version: int = 0


def scored_samples(
    flat: Sequence[tuple[Any, list[int], Any]],
    scores: Sequence[float],
    correct: Sequence[bool] | None,
    policy_version: int = 0,
) -> list[Sample]:
    """Samples from (prompt, prompt token ids, completion) triples, one per response in scoring order, with their
    scores and verifier results (`correct` None: no verifier). Prompts carry `prompt_id` / `text`, completions
    `text` / `token_ids` (omni_ray.data.Prompt, omni_ray.rollout.Completion)."""
    flags: Sequence[bool | None] = [None] * len(flat) if correct is None else [bool(ok) for ok in correct]
    return [
        Sample(
            prompt_id=p.prompt_id,
            prompt=p.text,
            response=c.text,
            prompt_token_ids=ids,
            response_token_ids=list(c.token_ids),
            score=float(s),
            correct=ok,
            policy_version=policy_version,
        )
        for (p, ids, c), s, ok in zip(flat, scores, flags, strict=True)
    ]


@dataclass
class Pair:
    """A (chosen, rejected) preference pair for one prompt.

    ``policy_version`` is the older of the two samples' versions (the most stale policy involved).
    ``chosen_correct`` / ``rejected_correct`` carry the verifier result of each side when known.
    ``swapped``: the null control exchanged the responses (the scores stay in place; see the module docstring).
    """

    prompt_id: str
    prompt: str
    prompt_token_ids: list[int]
    chosen: str
    rejected: str
    chosen_token_ids: list[int]
    rejected_token_ids: list[int]
    score_chosen: float
    score_rejected: float
    policy_version: int = 0
    chosen_correct: bool | None = None
    rejected_correct: bool | None = None
    swapped: bool = False

    @property
    def gap(self) -> float:
        """Score gap S_w - S_l (positive for every pair ``build_pairs`` emits)."""
        return self.score_chosen - self.score_rejected

    def to_record(self) -> dict:
        """JSON-serialisable dict (one line of ``rounds/round_NNNN/pairs.jsonl``), including ``gap``."""
        return {
            "prompt_id": str(self.prompt_id),
            "prompt": self.prompt,
            "prompt_token_ids": [int(t) for t in self.prompt_token_ids],
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_token_ids": [int(t) for t in self.chosen_token_ids],
            "rejected_token_ids": [int(t) for t in self.rejected_token_ids],
            "score_chosen": float(self.score_chosen),
            "score_rejected": float(self.score_rejected),
            "gap": float(self.gap),
            "policy_version": int(self.policy_version),
            "chosen_correct": None if self.chosen_correct is None else bool(self.chosen_correct),
            "rejected_correct": None if self.rejected_correct is None else bool(self.rejected_correct),
            "swapped": bool(self.swapped),
        }


@dataclass
class PairStats:
    """Counters of one ``build_pairs`` call.

    Per-prompt counters (each prompt lands in exactly one of them or in ``prompts_with_pairs``):

    - ``dropped_single_sample``: fewer than 2 samples with a finite score.
    - ``dropped_all_tied``: all finite scores of the prompt are equal (the paper's "all samples identical").
    - ``dropped_no_candidate``: ``math`` rule found no valid chosen or no valid rejected.
    - ``dropped_identical_text``: chosen and rejected would have the same response text (useless pair).
    - ``dropped_min_gap``: gap below ``min_gap`` (or not positive).

    Other counters:

    - ``dropped_nonfinite_samples``: samples (not prompts) removed for a NaN / inf score before pairing.
    - ``tie_broken_randomly``: prompts where chosen and/or rejected was drawn at random among samples tied for the
      selected score (counted when the draw happens, even if the pair is then dropped for its gap).
    - ``swapped``: emitted pairs whose responses the ``swap_prob`` null control exchanged.
    """

    prompts: int = 0
    prompts_with_pairs: int = 0
    pairs: int = 0
    dropped_single_sample: int = 0
    dropped_all_tied: int = 0
    dropped_min_gap: int = 0
    dropped_nonfinite_samples: int = 0
    dropped_no_candidate: int = 0
    dropped_identical_text: int = 0
    tie_broken_randomly: int = 0
    swapped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


def _pick_tied(indices: list[int], scores: np.ndarray, target: float, rng: np.random.Generator) -> tuple[int, bool]:
    """Uniform random choice among ``indices`` whose score equals ``target``; returns (index, was_tie)."""
    tied = [i for i in indices if scores[i] == target]
    if len(tied) == 1:
        return tied[0], False
    return tied[int(rng.integers(len(tied)))], True


def _select_best_worst(
    group: list[Sample], scores: np.ndarray, rng: np.random.Generator
) -> tuple[int | None, int | None, bool]:
    idx = list(range(len(group)))
    c, tie_c = _pick_tied(idx, scores, float(scores.max()), rng)
    # Prefer a rejected whose text differs from the chosen one (only matters for stochastic scorers).
    worst = float(scores.min())
    candidates = [i for i in idx if scores[i] == worst and group[i].response != group[c].response]
    if not candidates:
        return c, None, tie_c
    r, tie_r = _pick_tied(candidates, scores, worst, rng)
    return c, r, tie_c or tie_r


def _select_best_random(
    group: list[Sample], scores: np.ndarray, rng: np.random.Generator
) -> tuple[int | None, int | None, bool]:
    idx = list(range(len(group)))
    best = float(scores.max())
    c, tie_c = _pick_tied(idx, scores, best, rng)
    candidates = [i for i in idx if scores[i] < best and group[i].response != group[c].response]
    if not candidates:
        return c, None, tie_c
    return c, candidates[int(rng.integers(len(candidates)))], tie_c


def _select_math(
    group: list[Sample], scores: np.ndarray, rng: np.random.Generator, good_threshold: float
) -> tuple[int | None, int | None, bool]:
    good = [i for i, s in enumerate(group) if s.correct is True and scores[i] > good_threshold]
    if not good:
        return None, None, False
    c, tie_c = _pick_tied(good, scores, float(max(scores[i] for i in good)), rng)
    sc = float(scores[c])
    text = group[c].response
    for want in (True, False):  # lower-scored correct answer first, else a lower-scored wrong one
        cands = [i for i, s in enumerate(group) if s.correct is want and scores[i] < sc and s.response != text]
        if cands:
            r, tie_r = _pick_tied(cands, scores, float(min(scores[i] for i in cands)), rng)
            return c, r, tie_c or tie_r
    return c, None, tie_c


def build_pairs(
    samples: Sequence[Sample],
    *,
    strategy: str = "best_worst",
    min_gap: float = 0.0,
    rng: np.random.Generator | None = None,
    good_threshold: float = 6.0,
    swap_prob: float = 0.0,
) -> tuple[list[Pair], PairStats]:
    """Build at most one preference pair per prompt.

    Args:
        samples: scored samples of a round, any order; grouped by ``prompt_id`` in order of first appearance, so
            the output is deterministic for a given input order and ``rng`` seed.
        strategy: ``best_worst`` | ``best_random`` | ``math`` (see module docstring).
        min_gap: pairs with ``score_chosen - score_rejected < min_gap`` are dropped (``dropped_min_gap``); pairs
            with a non-positive gap are never emitted.
        rng: draws for tie-breaking and ``best_random``; defaults to ``numpy.random.default_rng(0)``.
        good_threshold: ``math`` only: chosen must be correct with score strictly above this (0-10 scale).
        swap_prob: null control: probability that a pair's chosen and rejected responses are exchanged (scores
            stay in place, see the module docstring). Drawn from ``rng`` once per emitted pair, and only when
            ``swap_prob > 0``, so 0 leaves every other draw (tie-breaking, ``best_random``) unchanged.

    Samples with a non-finite score are dropped first (``dropped_nonfinite_samples``). A prompt whose finite
    scores are all equal is dropped as all-tied for every strategy. In ``math`` samples with ``correct=None``
    (unknown) are never used: neither as chosen nor as the correct or wrong rejected.

    Returns:
        ``(pairs, stats)``.

    Raises:
        ValueError: unknown ``strategy`` (the message lists the valid ones), a negative / non-finite ``min_gap``,
            or ``swap_prob`` outside [0, 1].
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    if not math.isfinite(min_gap) or min_gap < 0:
        raise ValueError(f"min_gap must be a finite number >= 0, got {min_gap!r}")
    if not 0.0 <= swap_prob <= 1.0:  # also refuses NaN
        raise ValueError(f"swap_prob must be in [0, 1], got {swap_prob!r}")
    if rng is None:
        rng = np.random.default_rng(0)

    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.prompt_id, []).append(s)

    stats = PairStats(prompts=len(groups))
    pairs: list[Pair] = []
    for group_all in groups.values():
        group = [s for s in group_all if math.isfinite(float(s.score))]
        stats.dropped_nonfinite_samples += len(group_all) - len(group)
        if len(group) < 2:
            stats.dropped_single_sample += 1
            continue
        scores = np.array([float(s.score) for s in group], dtype=np.float64)
        if scores.max() == scores.min():
            stats.dropped_all_tied += 1
            continue

        if strategy == "best_worst":
            c, r, tie = _select_best_worst(group, scores, rng)
        elif strategy == "best_random":
            c, r, tie = _select_best_random(group, scores, rng)
        else:
            c, r, tie = _select_math(group, scores, rng, good_threshold)
        stats.tie_broken_randomly += int(tie)

        if c is None or r is None:
            if strategy == "math":
                stats.dropped_no_candidate += 1
            else:  # best != worst, so only identical texts can leave no rejected
                stats.dropped_identical_text += 1
            continue
        gap = float(scores[c] - scores[r])
        if gap <= 0 or gap < min_gap:
            stats.dropped_min_gap += 1
            continue

        score_c, score_r = float(scores[c]), float(scores[r])
        swapped = swap_prob > 0 and bool(rng.random() < swap_prob)
        if swapped:
            c, r = r, c
        stats.swapped += int(swapped)
        sc, sr = group[c], group[r]
        pairs.append(
            Pair(
                prompt_id=sc.prompt_id,
                prompt=sc.prompt,
                prompt_token_ids=list(sc.prompt_token_ids),
                chosen=sc.response,
                rejected=sr.response,
                chosen_token_ids=list(sc.response_token_ids),
                rejected_token_ids=list(sr.response_token_ids),
                score_chosen=score_c,
                score_rejected=score_r,
                policy_version=min(int(sc.policy_version), int(sr.policy_version)),
                chosen_correct=sc.correct,
                rejected_correct=sr.correct,
                swapped=swapped,
            )
        )
    stats.pairs = stats.prompts_with_pairs = len(pairs)
    return pairs, stats
