"""DPO-PoP (arXiv 2509.22851): preference-over-preference tuples, label noise and Bradley-Terry margins.

Numpy and scipy only: no Ray, no torch. See docs/methods.md sec. 3.

A PoP label compares two preference pairs of the round and says which one is the *stronger* preference. Here the
labels come from the pairs' score gaps (``sample_pop_tuples``, optionally flipped with probability ``label_noise``
to simulate annotator noise, as in the paper) or from a judge (``tuples_from_labels``). Each label is a
``PopTuple(strong=s, weak=u)`` of indices into the round's pair list.

The learner turns a tuple into the margin ``m_s = clip(stopgrad(M_target(u)), m_min, m_max)`` for the ``fixed`` /
``ema`` targets. The ``bt`` target is computed here instead, without the policy: ``fit_bradley_terry`` fits one
scalar strength per pair from the tuples, and ``bt_margins`` maps strengths to margins in ``[m_min, m_max]``.
``PopEstimator`` turns a round's tuples into ``PopItems``; a pair that is the strong side of no tuple still trains
once, against the floor m_min (the uncompared rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from scipy.optimize import minimize

from omni_ray.tracking import BusyClock

__all__ = [
    "POP_STRATEGIES",
    "PopEstimator",
    "PopItems",
    "PopStats",
    "PopTuple",
    "bt_margins",
    "fit_bradley_terry",
    "sample_pop_tuples",
    "tuples_from_labels",
]

POP_STRATEGIES: tuple[str, ...] = ("iterative", "random")


@dataclass(frozen=True)
class PopTuple:
    """One PoP label: pair ``strong`` is labelled the stronger preference, ``weak`` the weaker.

    ``label_flipped`` is True when label noise swapped the gap-implied order (then ``strong`` has the smaller gap).
    """

    strong: int
    weak: int
    label_flipped: bool = False


@dataclass(frozen=True)
class PopItems:
    """A round's training items, one row each: pair ``strong[i]`` trains against the margin of pair ``weak[i]``.

    ``weak[i] == -1``: PoP could not compare the pair (docs/methods.md sec. 3, the uncompared rule); it trains against
    ``margin[i]`` = the floor m_min. ``margin[i]`` is NaN where the learner computes the weak partner's margin from the
    model (ema / fixed targets), and the estimator's margin where it has one (bt).
    """

    strong: np.ndarray
    weak: np.ndarray
    margin: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.strong)
        if len(self.weak) != n or len(self.margin) != n:
            raise ValueError(f"PopItems: {n} strong, {len(self.weak)} weak and {len(self.margin)} margins")

    @classmethod
    def every_pair(cls, n_pairs: int) -> PopItems:
        """Each pair once, with no partner and no margin: what a loss without PoP trains on."""
        return cls(np.arange(n_pairs, dtype=np.int64), np.full(n_pairs, -1, np.int64), np.full(n_pairs, np.nan))

    def __len__(self) -> int:
        return len(self.strong)


@dataclass
class PopStats:
    """Counters of one ``sample_pop_tuples`` call.

    - ``tuples``: tuples emitted.
    - ``no_weaker_partner``: ``iterative`` only: pairs with no strictly smaller gap (they emit nothing as strong).
    - ``ties``: ``random`` only: draws of two pairs with equal gaps (skipped, no label).
    - ``flipped``: tuples whose label was flipped by label noise.
    - ``partners_with_replacement``: ``iterative`` only: pairs with fewer than ``k`` weaker candidates, whose
      partners were therefore reused.
    """

    tuples: int = 0
    no_weaker_partner: int = 0
    ties: int = 0
    flipped: int = 0
    partners_with_replacement: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


def sample_pop_tuples(
    gaps: Sequence[float] | np.ndarray,
    *,
    strategy: str = "iterative",
    k: int = 1,
    label_noise: float = 0.0,
    rng: np.random.Generator,
) -> tuple[list[PopTuple], PopStats]:
    """Sample PoP tuples over a round's pairs, labelled by score gap (docs/methods.md sec. 3).

    Args:
        gaps: score gap ``S_w - S_l`` of each pair; tuple indices refer to positions in this sequence.
        strategy:
            ``iterative``: for every pair ``i`` draw ``k`` partners ``j`` uniformly among the pairs with a strictly
            smaller gap and emit ``(strong=i, weak=j)``; every pair with a weaker partner is ``strong`` exactly
            ``k`` times. Partners are drawn without replacement when there are at least ``k`` candidates;
            otherwise the candidates are reused as evenly as possible (each one ``floor(k/n)`` or ``ceil(k/n)``
            times, a random permutation per cycle) and the pair is counted in ``partners_with_replacement``.
            Pairs with the minimum gap have no weaker partner: they emit nothing and are counted in
            ``no_weaker_partner`` (they still appear as ``weak``).
            ``random``: draw ``len(gaps) * k`` unordered pairs ``{i, j}`` with ``i != j`` uniformly;
            ``strong`` is the one with the larger gap, so pairs with large gaps are ``strong`` more often.
            Draws with equal gaps are skipped and counted in ``ties``.
        k: comparisons per pair (>= 1).
        label_noise: probability in ``[0, 1]`` of flipping each label (strong and weak swapped,
            ``label_flipped=True``), simulating annotator noise. Applied after sampling, independently per tuple.
        rng: seeded generator; same seed and inputs give the same tuples.

    Returns:
        ``(tuples, stats)``; ``iterative`` tuples are ordered by ``strong`` index.

    Raises:
        ValueError: unknown ``strategy`` (lists the valid ones), ``k`` < 1, ``label_noise`` outside ``[0, 1]``, or
            a non-finite gap.
    """
    if strategy not in POP_STRATEGIES:
        raise ValueError(f"unknown PoP strategy {strategy!r}; valid strategies: {', '.join(POP_STRATEGIES)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not (isinstance(label_noise, (int, float, np.floating)) and 0.0 <= float(label_noise) <= 1.0):
        raise ValueError(f"label_noise must be a probability in [0, 1], got {label_noise!r}")
    g = np.asarray(gaps, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(g)):
        raise ValueError("gaps must all be finite")
    k = int(k)
    n = g.size
    stats = PopStats()
    strong: list[int] = []
    weak: list[int] = []

    if strategy == "iterative":
        order = np.argsort(g, kind="stable")
        sorted_g = g[order]
        n_smaller = np.searchsorted(sorted_g, g, side="left")  # pairs with a strictly smaller gap
        for i in range(n):
            m = int(n_smaller[i])
            if m == 0:
                stats.no_weaker_partner += 1
                continue
            cands = order[:m]
            if m >= k:
                picks = cands[rng.choice(m, size=k, replace=False)]
            else:
                stats.partners_with_replacement += 1
                cycles = -(-k // m)
                picks = np.concatenate([cands[rng.permutation(m)] for _ in range(cycles)])[:k]
            strong.extend([i] * k)
            weak.extend(int(j) for j in picks)
    elif n >= 2:  # random
        draws = n * k
        a = rng.integers(0, n, size=draws)
        b = rng.integers(0, n - 1, size=draws)
        b = b + (b >= a)  # uniform over j != i
        tie = g[a] == g[b]
        stats.ties = int(tie.sum())
        a, b = a[~tie], b[~tie]
        a_stronger = g[a] > g[b]
        strong = np.where(a_stronger, a, b).tolist()
        weak = np.where(a_stronger, b, a).tolist()

    flips = rng.random(len(strong)) < float(label_noise)
    tuples = [
        PopTuple(strong=int(w), weak=int(s), label_flipped=True) if f else PopTuple(strong=int(s), weak=int(w))
        for s, w, f in zip(strong, weak, flips, strict=True)
    ]
    stats.tuples = len(tuples)
    stats.flipped = int(flips.sum())
    return tuples, stats


def tuples_from_labels(comparisons: Sequence[tuple[int, int, int]]) -> list[PopTuple]:
    """PoP tuples from external (e.g. judge) labels: ``(i, j, winner)`` with ``winner in {i, j}``, ``i != j``.

    The winner is the pair judged the stronger preference: ``PopTuple(strong=winner, weak=other)``.

    Raises:
        ValueError: if ``i == j`` or ``winner`` is neither ``i`` nor ``j``.
    """
    out: list[PopTuple] = []
    for i, j, winner in comparisons:
        i, j, winner = int(i), int(j), int(winner)
        if i == j:
            raise ValueError(f"a PoP comparison needs two different pairs, got ({i}, {j}, {winner})")
        if winner not in (i, j):
            raise ValueError(f"winner must be one of the compared pairs, got ({i}, {j}, {winner})")
        out.append(PopTuple(strong=winner, weak=j if winner == i else i))
    return out


# scipy's trust-region status "A bad approximation caused failure to predict improvement": the Newton model predicts no
# decrease of the loss, i.e. the step's improvement is lost in the loss's round-off.
_ROUND_OFF_STOP = 2


def fit_bradley_terry(
    n_items: int,
    tuples: Sequence[PopTuple],
    *,
    l2: float = 1e-2,
    max_iter: int = 200,
    tol: float = 1e-8,
) -> np.ndarray:
    """Penalised maximum-likelihood Bradley-Terry strengths from PoP tuples.

    Model: ``P(i stronger than j) = sigmoid(z_i - z_j)``; maximises ``sum log sigmoid(z_strong - z_weak) -
    l2/2 * |z|^2``. The L2 term (``l2 > 0`` required) makes the problem strictly concave, so the optimum is
    unique and finite even when an item never loses (perfectly separable labels, e.g. noiseless gap labels).
    Solved by ``scipy.optimize.minimize`` with the trust-region Newton-CG method on the analytic gradient and
    Hessian-vector products (no dense n x n matrix, so rounds with many pairs are fine). Deterministic.

    Items that appear in no tuple get exactly ``z = 0``. The optimum already has mean 0 (the likelihood gradient
    sums to zero, so ``l2 * sum(z) = 0``); the result is re-centred over the compared items to remove rounding,
    leaving uncompared items at 0 = the mean. Duplicate tuples count as repeated observations.

    Args:
        n_items: number of pairs in the round (length of the result).
        tuples: PoP labels; ``strong`` / ``weak`` must be in ``range(n_items)`` and differ.
        l2: ridge strength (> 0). Smaller values spread strengths further apart on separable data.
        max_iter: Newton iterations at most.
        tol: stop when the gradient's Euclidean norm falls below this, or earlier when the predicted improvement
            of a Newton step is below the floating-point resolution of the loss (on this strictly convex problem
            with the exact Hessian that only happens next to the optimum: measured gradient norms 1e-6 or less on
            rounds of up to 3000 pairs).

    Returns:
        ``z`` of shape ``(n_items,)``, float64.

    Raises:
        ValueError: ``n_items < 0``, ``l2 <= 0``, or a tuple index outside ``range(n_items)`` or with
            ``strong == weak`` (the message names the tuple).
        RuntimeError: the optimiser stopped without reaching ``tol``.
    """
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be > 0 (it keeps the fit finite on separable labels), got {l2!r}")
    z = np.zeros(n_items, dtype=np.float64)
    if len(tuples) == 0:
        return z
    s = np.fromiter((t.strong for t in tuples), dtype=np.int64, count=len(tuples))
    w = np.fromiter((t.weak for t in tuples), dtype=np.int64, count=len(tuples))
    outside = (s < 0) | (w < 0) | (s >= n_items) | (w >= n_items)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"PoP tuple {i} {tuples[i]} has an index outside range(n_items={n_items})")
    if np.any(s == w):
        i = int(np.flatnonzero(s == w)[0])
        raise ValueError(f"PoP tuple {i} {tuples[i]} compares a pair with itself (strong == weak)")

    def to_items(per_tuple: np.ndarray) -> np.ndarray:
        # sum over tuples of per_tuple * (e_strong - e_weak)
        won = np.bincount(s, weights=per_tuple, minlength=n_items)
        return won - np.bincount(w, weights=per_tuple, minlength=n_items)

    def loss(z_: np.ndarray) -> float:
        # Negative penalised log-likelihood: sum log(1 + exp(-(z_s - z_w))) + l2/2 |z|^2.
        return float(np.logaddexp(0.0, -(z_[s] - z_[w])).sum() + 0.5 * l2 * float(z_ @ z_))

    def loser_probability(z_: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 - np.tanh(0.5 * (z_[s] - z_[w])))  # sigmoid(-(z_s - z_w)), overflow-free

    def gradient(z_: np.ndarray) -> np.ndarray:
        return l2 * z_ - to_items(loser_probability(z_))

    def hessian_times(z_: np.ndarray, v: np.ndarray) -> np.ndarray:
        q = loser_probability(z_)
        return l2 * v + to_items(q * (1.0 - q) * (v[s] - v[w]))

    result = minimize(
        loss, z, jac=gradient, hessp=hessian_times, method="trust-ncg", options={"gtol": tol, "maxiter": max_iter}
    )
    if not result.success and result.status != _ROUND_OFF_STOP:
        raise RuntimeError(f"Bradley-Terry fit on {n_items} items did not converge: {result.message}")
    z = result.x
    compared = np.zeros(n_items, dtype=bool)
    compared[s] = True
    compared[w] = True
    z[compared] -= z[compared].mean()
    z[~compared] = 0.0
    return z


def bt_margins(z: np.ndarray | Sequence[float], *, m_min: float, m_max: float) -> np.ndarray:
    """Map Bradley-Terry strengths to margins in ``[m_min, m_max]`` (the inferred mapping of docs/methods.md sec. 3).

    Affine min-max map over the given items: the weakest pair gets ``m_min``, the strongest ``m_max``, order is
    preserved (monotone non-decreasing). If all strengths are equal (or there is one item) every margin is the
    midpoint ``(m_min + m_max) / 2``. ``m_min`` / ``m_max`` are in the units of the loss's log-prob convention
    (e.g. [0, 10] for summed log-probs at beta 0.1 as in the paper).

    Raises:
        ValueError: if the bounds are not finite or ``m_min > m_max``.
    """
    if not (math.isfinite(m_min) and math.isfinite(m_max) and m_min <= m_max):
        raise ValueError(f"need finite m_min <= m_max, got m_min={m_min!r}, m_max={m_max!r}")
    x = np.asarray(z, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return x.copy()
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.full_like(x, 0.5 * (m_min + m_max))
    return np.clip(m_min + (x - lo) * ((m_max - m_min) / (hi - lo)), m_min, m_max)


class PopEstimator:
    """The PoP margin-estimator role: turns a round's pair gaps into training items (plain class; a Ray actor).

    Each item (a row of :class:`PopItems`) is ``(strong, weak, margin)``: the strong pair trains, against the weak
    partner's margin. For the ``ema`` / ``fixed`` targets the learner computes that margin from the model (``margin``
    is NaN here); for ``bt`` it is the weak pair's Bradley-Terry margin, so every target means the same thing: *s must
    beat u's margin*. A pair PoP could not compare (strong in no tuple) trains against the floor m_min (``weak`` -1).

    ``labels`` says who decides which pair of a comparison is the stronger: ``gap`` (the score gaps, optionally
    flipped with ``label_noise``) or ``judge`` (an LLM, :class:`omni_ray.scoring.judge.PopJudge`). With a judge,
    gap sampling (``strategy``, ``k``) still proposes which pairs are compared; the judge then labels each proposed
    comparison, shown in a random order, and comparisons it gives no verdict on are dropped and counted
    (``judge_no_label``). ``judge`` is a PopJudge (or anything with ``compare``) or its constructor kwargs
    (built here, in the estimator's process). ``training_items`` then needs the pairs' texts.
    """

    def __init__(
        self,
        *,
        target: str,
        strategy: str,
        k: int,
        label_noise: float,
        m_min: float,
        m_max: float,
        seed: int,
        labels: str = "gap",
        judge: Any = None,
    ):
        if labels not in ("gap", "judge"):
            raise ValueError(f"unknown PoP label source {labels!r}; valid: gap, judge")
        self.target, self.strategy, self.k, self.label_noise = target, strategy, k, label_noise
        self.m_min, self.m_max, self.seed = m_min, m_max, seed
        self.clock = BusyClock()
        self.labels = labels
        self.judge: Any = None
        if labels == "judge":
            if judge is None:
                raise ValueError("pop.labels=judge needs a judge (a PopJudge or its constructor kwargs)")
            if label_noise:
                raise ValueError("label_noise simulates annotator noise on gap labels; it must be 0 with a judge")
            from omni_ray.scoring.judge import as_pop_judge

            self.judge = as_pop_judge(judge)

    @staticmethod
    def kwargs_from_config(pop: Any, *, seed: int, trust_remote_code: bool = False) -> dict[str, Any]:
        """Constructor kwargs from a ``PopConfig`` (for ``ray.remote(PopEstimator).remote(**kwargs)``); with
        ``labels=judge`` the judge is passed as kwargs and built inside the estimator's process."""
        kwargs: dict[str, Any] = dict(
            target=pop.target,
            strategy=pop.strategy,
            k=pop.k,
            label_noise=pop.label_noise,
            m_min=pop.m_min,
            m_max=pop.m_max,
            seed=seed,
            labels=pop.labels,
        )
        if pop.labels == "judge":
            kwargs["judge"] = dict(
                path=pop.judge_path,
                backend=pop.judge_backend,
                template=pop.judge_template,
                choices=tuple(pop.judge_choices),
                max_new_tokens=pop.judge_max_new_tokens,
                max_model_len=pop.judge_max_model_len,
                batch_size=pop.judge_batch_size,
                both_orders=pop.judge_both_orders,
                trust_remote_code=trust_remote_code,
                seed=seed,
            )
        return kwargs

    def training_items(
        self, gaps: Sequence[float], round_index: int, pairs: Sequence[Any] | None = None
    ) -> tuple[PopItems, dict]:
        """The round's training items and counters.

        Every labelled tuple ``(strong=s, weak=u)`` is an item: ``s`` trains against ``u``'s margin (``bt``: the
        estimator's margin of ``u``; ``ema`` / ``fixed``: NaN, the learner computes it). Every pair that is the strong
        side of no tuple (iterative: no weaker partner, e.g. all gaps equal under a binary verifier; random: it drew
        only ties or the weak role; judge: no verdict) trains once against the floor: ``(strong=i, weak=-1,
        margin=m_min)``, i.e. plain DPO / Omni-DPO with margin m_min (docs/methods.md sec. 3). Items follow the
        tuples' order, then the uncompared pairs in index order; ``uncompared`` in the counters counts the latter.
        So a round with pairs never has zero items.

        ``pairs`` (needed with ``labels=judge``, ignored otherwise): per gap, the pair's ``(prompt, chosen,
        rejected)`` texts or an object with those attributes (``omni_ray.pairs.Pair``).
        """
        with self.clock.timing("pop"):
            n = int(np.asarray(gaps).reshape(-1).size)
            rng = np.random.default_rng([self.seed, 13, round_index])
            if self.labels == "judge":
                tuples, stats = self._judge_tuples(gaps, pairs, rng)
            else:
                sampled, counters = sample_pop_tuples(
                    gaps, strategy=self.strategy, k=self.k, label_noise=self.label_noise, rng=rng
                )
                tuples, stats = sampled, counters.as_dict()
            items = self._items(n, tuples)
            stats["uncompared"] = int(np.count_nonzero(items.weak == -1))
            return items, stats

    def busy(self) -> dict[str, float]:
        """Seconds spent building training items (and judging, with labels=judge) since start-up."""
        return self.clock.totals()

    def _items(self, n: int, tuples: Sequence[PopTuple]) -> PopItems:
        """One item per tuple, then one floor item per pair that is strong in no tuple."""
        strong = np.fromiter((t.strong for t in tuples), dtype=np.int64, count=len(tuples))
        weak = np.fromiter((t.weak for t in tuples), dtype=np.int64, count=len(tuples))
        if self.target == "bt":
            margin = bt_margins(fit_bradley_terry(n, tuples), m_min=self.m_min, m_max=self.m_max)[weak]
        else:
            margin = np.full(len(tuples), np.nan)
        uncompared = np.setdiff1d(np.arange(n, dtype=np.int64), strong)
        return PopItems(
            strong=np.concatenate([strong, uncompared]),
            weak=np.concatenate([weak, np.full(uncompared.size, -1, dtype=np.int64)]),
            margin=np.concatenate([margin, np.full(uncompared.size, float(self.m_min))]),
        )

    def _judge_tuples(
        self, gaps: Sequence[float], pairs: Sequence[Any] | None, rng: np.random.Generator
    ) -> tuple[list[PopTuple], dict]:
        from omni_ray.scoring.judge import judge_comparisons

        n = int(np.asarray(gaps).reshape(-1).size)
        if pairs is None or len(pairs) != n:
            got = "none" if pairs is None else str(len(pairs))
            raise ValueError(f"pop.labels=judge needs the texts of every pair: {n} gaps but {got} pairs")
        candidates, stats = sample_pop_tuples(gaps, strategy=self.strategy, k=self.k, label_noise=0.0, rng=rng)
        comparisons, jstats = judge_comparisons(self.judge, pairs, [(t.strong, t.weak) for t in candidates], rng=rng)
        tuples = tuples_from_labels(comparisons)
        out: dict[str, Any] = stats.as_dict()
        out["tuples"] = len(tuples)
        out.update({f"judge_{k}": v for k, v in jstats.items()})
        out["judge_agree_with_gap"] = jstats["agree_with_first"]
        del out["judge_agree_with_first"]
        return tuples, out
