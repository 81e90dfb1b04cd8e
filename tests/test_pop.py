"""Tests for omni_ray.pop: PoP tuple sampling, the Bradley-Terry fit and margins, and the estimator's items.

Expected values are worked out by hand (or by an independent root finder / gradient written here), never read off
the code under test.
"""

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import expit

from omni_ray.config import load_config
from omni_ray.pop import (
    PopEstimator,
    PopItems,
    PopStats,
    PopTuple,
    bt_margins,
    fit_bradley_terry,
    sample_pop_tuples,
    tuples_from_labels,
)

M_MIN, M_MAX = 0.5, 4.0


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def _spearman(a, b) -> float:
    return float(np.corrcoef(_ranks(np.asarray(a)), _ranks(np.asarray(b)))[0, 1])


def estimator(**kw: Any) -> PopEstimator:
    args = dict(target="ema", strategy="iterative", k=1, label_noise=0.0, m_min=M_MIN, m_max=M_MAX, seed=3)
    return PopEstimator(**{**args, **kw})


# ---------------------------------------------------------------- tuple sampling


def test_iterative_gives_each_pair_with_weaker_partner_exactly_k_tuples_as_strong():
    gaps = [0.5, 3.0, 0.5, 2.0, 7.0, 1.0, 2.0]
    k = 2
    tuples, stats = sample_pop_tuples(gaps, strategy="iterative", k=k, rng=np.random.default_rng(0))
    counts = Counter(t.strong for t in tuples)
    for i, g in enumerate(gaps):
        expected = 0 if g == min(gaps) else k
        assert counts.get(i, 0) == expected
    assert stats.no_weaker_partner == 2  # both pairs with gap 0.5
    assert stats.tuples == len(tuples) == k * (len(gaps) - 2)
    assert all(gaps[t.weak] < gaps[t.strong] for t in tuples)
    # pair 5 (gap 1.0) has only 2 weaker candidates: both used once, without replacement
    assert sorted(t.weak for t in tuples if t.strong == 5) == [0, 2]
    assert stats.partners_with_replacement == 0
    assert [t.strong for t in tuples] == sorted(t.strong for t in tuples)


def test_iterative_counters_of_a_small_round_are_exact():
    _, stats = sample_pop_tuples([0.5, 3.0, 1.0, 7.0], strategy="iterative", k=1, rng=np.random.default_rng(0))
    assert stats.as_dict() == {
        "tuples": 3,
        "no_weaker_partner": 1,
        "ties": 0,
        "flipped": 0,
        "partners_with_replacement": 0,
    }


def test_pop_stats_start_at_zero():
    assert PopStats().as_dict() == dict.fromkeys(
        ["tuples", "no_weaker_partner", "ties", "flipped", "partners_with_replacement"], 0
    )


def test_iterative_reuses_partners_evenly_when_fewer_than_k_candidates():
    gaps = [0.0, 1.0, 2.0]
    tuples, stats = sample_pop_tuples(gaps, strategy="iterative", k=4, rng=np.random.default_rng(1))
    assert [t.weak for t in tuples if t.strong == 1] == [0, 0, 0, 0]
    assert sorted(Counter(t.weak for t in tuples if t.strong == 2).values()) == [2, 2]
    assert stats.partners_with_replacement == 2


def test_iterative_with_exactly_k_candidates_draws_without_replacement():
    # pair 2 has exactly k = 2 weaker candidates (no reuse); pair 1 has one (reused)
    tuples, stats = sample_pop_tuples([0.0, 1.0, 2.0], strategy="iterative", k=2, rng=np.random.default_rng(0))
    assert sorted(t.weak for t in tuples if t.strong == 2) == [0, 1]
    assert [t.weak for t in tuples if t.strong == 1] == [0, 0]
    assert stats.partners_with_replacement == 1


def test_random_sampling_makes_larger_gaps_strong_more_often():
    gaps = np.arange(10, dtype=float)
    tuples, stats = sample_pop_tuples(gaps, strategy="random", k=2000, rng=np.random.default_rng(0))
    assert stats.ties == 0 and stats.tuples == 20000
    counts = np.bincount([t.strong for t in tuples], minlength=10)
    assert counts[0] == 0
    assert np.all(np.diff(counts) > 0)
    assert _spearman(counts, gaps) == pytest.approx(1.0)
    assert all(gaps[t.strong] > gaps[t.weak] for t in tuples)


def test_random_sampling_draws_unordered_pairs_uniformly():
    # 20000 draws of {i, j}, i != j, among 10 pairs: each pair takes part in 2/10 of them (4000, sd ~57)
    tuples, _ = sample_pop_tuples(np.arange(10, dtype=float), strategy="random", k=2000, rng=np.random.default_rng(1))
    involved = np.bincount([t.strong for t in tuples] + [t.weak for t in tuples], minlength=10)
    assert np.all(np.abs(involved - 4000) < 300)


def test_random_sampling_skips_and_counts_equal_gaps():
    tuples, stats = sample_pop_tuples([1.0, 1.0, 1.0], strategy="random", k=5, rng=np.random.default_rng(0))
    assert tuples == [] and stats.ties == 15


def test_random_ties_are_counted_and_never_labelled_by_index():
    # pairs 0 and 1 tie; a draw of {0, 1} (1/3 of the draws) is skipped, never labelled either way
    tuples, stats = sample_pop_tuples([1.0, 1.0, 2.0], strategy="random", k=400, rng=np.random.default_rng(0))
    assert stats.ties + stats.tuples == 1200
    assert 300 < stats.ties < 500
    assert all(t.strong == 2 and t.weak in (0, 1) for t in tuples)
    assert {t.weak for t in tuples} == {0, 1}


def test_random_sampling_needs_two_pairs():
    assert sample_pop_tuples([3.0], strategy="random", k=4, rng=np.random.default_rng(0))[0] == []
    two, _ = sample_pop_tuples([3.0, 1.0], strategy="random", k=2, rng=np.random.default_rng(0))
    assert two == [PopTuple(0, 1)] * 4


@pytest.mark.parametrize("strategy", ["iterative", "random"])
def test_label_noise_flip_rates_and_seeded_reproducibility(strategy):
    gaps = np.linspace(0.0, 9.0, 200)
    t0, s0 = sample_pop_tuples(gaps, strategy=strategy, k=3, label_noise=0.0, rng=np.random.default_rng(0))
    assert s0.flipped == 0 and not any(t.label_flipped for t in t0)
    t1, s1 = sample_pop_tuples(gaps, strategy=strategy, k=3, label_noise=1.0, rng=np.random.default_rng(0))
    assert s1.flipped == len(t1) > 0
    assert all(t.label_flipped and gaps[t.strong] < gaps[t.weak] for t in t1)
    t3, s3 = sample_pop_tuples(gaps, strategy=strategy, k=3, label_noise=0.3, rng=np.random.default_rng(7))
    assert 0.25 < s3.flipped / len(t3) < 0.35
    assert s3.flipped == sum(t.label_flipped for t in t3)
    t3b, _ = sample_pop_tuples(gaps, strategy=strategy, k=3, label_noise=0.3, rng=np.random.default_rng(7))
    assert t3 == t3b


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"label_noise": -0.1}, "label_noise"),
        ({"label_noise": 1.5}, "label_noise"),
        ({"label_noise": "0.1"}, "label_noise"),
        ({"k": 0}, "k"),
        ({"k": True}, "k"),
        ({"k": 1.5}, "k"),
        ({"strategy": "bogus"}, "iterative"),
    ],
)
def test_invalid_sampling_parameters_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_pop_tuples([1.0, 2.0], rng=np.random.default_rng(0), **kwargs)


def test_non_finite_gap_raises():
    with pytest.raises(ValueError, match="gaps must all be finite"):
        sample_pop_tuples([1.0, math.inf], rng=np.random.default_rng(0))


def test_tuples_from_judge_labels_put_the_winner_as_strong():
    assert tuples_from_labels([(0, 1, 1), (2, 3, 2)]) == [PopTuple(1, 0), PopTuple(2, 3)]
    with pytest.raises(ValueError, match="winner"):
        tuples_from_labels([(0, 1, 5)])
    with pytest.raises(ValueError, match="two different pairs"):
        tuples_from_labels([(1, 1, 1)])


def test_pop_tuples_and_items_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PopTuple(0, 1).strong = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PopItems.every_pair(1).strong = np.zeros(1, dtype=np.int64)  # type: ignore[misc]


# ---------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_recovers_order_of_known_strengths_from_noiseless_labels():
    rng = np.random.default_rng(3)
    gaps = rng.permutation(np.arange(8, dtype=float)) * 1.3
    tuples, _ = sample_pop_tuples(gaps, strategy="iterative", k=20, rng=np.random.default_rng(0))
    z = fit_bradley_terry(len(gaps), tuples)
    assert np.all(np.isfinite(z))
    assert abs(z.mean()) < 1e-9
    assert _spearman(z, gaps) == pytest.approx(1.0)
    m = bt_margins(z, m_min=0.5, m_max=4.0)
    assert m.min() == pytest.approx(0.5) and m.max() == pytest.approx(4.0)
    assert np.all((m >= 0.5) & (m <= 4.0))
    order = np.argsort(z)
    assert np.all(np.diff(m[order]) >= 0)


def test_bradley_terry_fit_is_deterministic_and_leaves_uncompared_items_at_zero():
    tuples = [PopTuple(0, 1), PopTuple(1, 2), PopTuple(0, 2), PopTuple(2, 1), PopTuple(1, 2)]
    z1 = fit_bradley_terry(5, tuples)
    z2 = fit_bradley_terry(5, tuples)
    assert np.array_equal(z1, z2)
    assert z1[3] == 0.0 and z1[4] == 0.0
    assert z1[0] > z1[1] > z1[2]
    assert fit_bradley_terry(3, []).tolist() == [0.0, 0.0, 0.0]


def test_bradley_terry_matches_known_probabilities_with_tiny_penalty():
    # 0 beats 1 in 3 of 4 comparisons -> MLE z0 - z1 = log(3)
    tuples = [PopTuple(0, 1)] * 3 + [PopTuple(1, 0)]
    z = fit_bradley_terry(2, tuples, l2=1e-9)
    assert z[0] - z[1] == pytest.approx(np.log(3.0), rel=1e-5)


def test_bradley_terry_with_penalty_solves_its_stationarity_equation():
    # 0 beats 1 three times, loses once, l2 = 0.5: z = (d/2, -d/2) with 0.5 * d/2 = 3 sigma(-d) - sigma(d)
    d = brentq(lambda x: 0.25 * x - 3.0 * expit(-x) + expit(x), 0.0, 10.0, xtol=1e-14)
    z = fit_bradley_terry(3, [PopTuple(0, 1)] * 3 + [PopTuple(1, 0)], l2=0.5)
    np.testing.assert_allclose(z, [d / 2, -d / 2, 0.0], rtol=0, atol=1e-8)


def test_bradley_terry_optimum_has_zero_gradient_on_a_noisy_round():
    gaps = np.random.default_rng(4).normal(size=60)
    tuples, _ = sample_pop_tuples(gaps, strategy="random", k=3, label_noise=0.2, rng=np.random.default_rng(2))
    z = fit_bradley_terry(60, tuples, l2=0.05)
    grad = 0.05 * z
    for t in tuples:  # d/dz of -log sigma(z_s - z_w), one tuple at a time
        p_lose = expit(z[t.weak] - z[t.strong])
        grad[t.strong] -= p_lose
        grad[t.weak] += p_lose
    assert np.linalg.norm(grad) < 1e-7


def test_bradley_terry_converges_in_a_few_newton_iterations():
    # Newton's method with the exact Hessian needs a handful of iterations here; a wrong Hessian needs many more
    gaps = np.random.default_rng(5).normal(size=40)
    tuples, _ = sample_pop_tuples(gaps, strategy="iterative", k=3, label_noise=0.1, rng=np.random.default_rng(0))
    z = fit_bradley_terry(40, tuples, max_iter=12)
    assert np.all(np.isfinite(z))
    with pytest.raises(RuntimeError, match="did not converge"):
        fit_bradley_terry(40, tuples, max_iter=1)


@pytest.mark.parametrize(
    ("n_items", "tuples", "message"),
    [
        (-1, [], "n_items must be >= 0, got -1"),
        (3, [PopTuple(0, 3)], r"PoP tuple 0 .* outside range\(n_items=3\)"),
        (3, [PopTuple(3, 0)], r"PoP tuple 0 .* outside range\(n_items=3\)"),
        (3, [PopTuple(0, 1), PopTuple(-1, 0)], r"PoP tuple 1 .* outside range"),
        (3, [PopTuple(0, 1), PopTuple(1, -1)], r"PoP tuple 1 .* outside range"),
        (3, [PopTuple(0, 1), PopTuple(2, 2)], r"PoP tuple 1 .*strong == weak"),
    ],
)
def test_bradley_terry_refuses_bad_tuples_naming_the_tuple(n_items, tuples, message):
    with pytest.raises(ValueError, match=message):
        fit_bradley_terry(n_items, tuples)


@pytest.mark.parametrize("l2", [0.0, -1.0, math.nan])
def test_bradley_terry_needs_a_positive_penalty(l2):
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fit_bradley_terry(2, [PopTuple(0, 1)], l2=l2)


def test_bt_margins_map_strengths_affinely_onto_the_bounds():
    # lo 0, hi 3: m = 1 + z * 4/3
    np.testing.assert_allclose(bt_margins([0.0, 1.0, 3.0], m_min=1.0, m_max=5.0), [1.0, 1.0 + 4.0 / 3.0, 5.0])
    np.testing.assert_allclose(bt_margins([-2.0, 2.0], m_min=3.0, m_max=3.0), [3.0, 3.0])


def test_bt_margins_constant_strengths_map_to_midpoint():
    assert bt_margins(np.zeros(4), m_min=0.0, m_max=10.0).tolist() == [5.0] * 4
    assert bt_margins([7.0], m_min=1.0, m_max=2.0).tolist() == [1.5]
    assert bt_margins([], m_min=1.0, m_max=2.0).shape == (0,)
    with pytest.raises(ValueError, match="m_min <= m_max"):
        bt_margins(np.zeros(2), m_min=2.0, m_max=1.0)
    with pytest.raises(ValueError, match="finite"):
        bt_margins(np.zeros(2), m_min=0.0, m_max=math.inf)


# ---------------------------------------------------------------- items


def test_every_pair_items_train_each_pair_once_without_partner_or_margin():
    items = PopItems.every_pair(3)
    assert len(items) == 3
    assert items.strong.tolist() == [0, 1, 2] and items.strong.dtype == np.int64
    assert items.weak.tolist() == [-1, -1, -1] and items.weak.dtype == np.int64
    assert np.isnan(items.margin).all()
    assert len(PopItems.every_pair(0)) == 0


def test_pop_items_refuse_columns_of_different_lengths():
    ids = np.arange(3, dtype=np.int64)
    with pytest.raises(ValueError, match="3 strong, 2 weak and 3 margins"):
        PopItems(ids, ids[:2], np.zeros(3))
    with pytest.raises(ValueError, match="3 strong, 3 weak and 1 margins"):
        PopItems(ids, ids, np.zeros(1))


def test_estimator_ema_items_are_the_tuples_with_nan_margins_then_the_uncompared_pair():
    items, stats = estimator(target="ema").training_items([0.5, 3.0, 1.0, 7.0], round_index=0)
    assert items.strong.tolist() == [1, 2, 3, 0]
    assert items.weak[1] == 0  # pair 2 (gap 1.0) has one weaker partner
    assert items.weak[0] in (0, 2) and items.weak[2] in (0, 1, 2)
    assert items.weak[3] == -1
    assert np.isnan(items.margin[:3]).all() and items.margin[3] == M_MIN
    assert stats == {
        "tuples": 3,
        "no_weaker_partner": 1,
        "ties": 0,
        "flipped": 0,
        "partners_with_replacement": 0,
        "uncompared": 1,
    }


def test_estimator_bt_items_carry_the_weak_pairs_fitted_margin_where_ema_has_nan():
    # gaps 0 < 1 < 2, k = 1: tuples (1, 0) and (2, u). Pair 0 only loses: lowest strength -> m_min. With u = 1 the
    # chain 2 > 1 > 0 is antisymmetric (z0 = -z2, z1 = 0): pair 1 gets the midpoint (0.5 + 4.0) / 2 = 2.25.
    expected = {0: M_MIN, 1: 2.25}
    partners = set()
    for round_index in range(6):
        bt, _ = estimator(target="bt").training_items([0.0, 1.0, 2.0], round_index)
        ema, _ = estimator(target="ema").training_items([0.0, 1.0, 2.0], round_index)
        assert bt.strong.tolist() == ema.strong.tolist() == [1, 2, 0]
        assert bt.weak.tolist() == ema.weak.tolist()
        assert bt.weak[0] == 0 and bt.weak[2] == -1
        partners.add(int(bt.weak[1]))
        np.testing.assert_allclose(bt.margin, [M_MIN, expected[int(bt.weak[1])], M_MIN], rtol=0, atol=1e-8)
        assert np.isnan(ema.margin[:2]).all() and ema.margin[2] == M_MIN
    assert partners == {0, 1}


def test_estimator_bt_margins_follow_the_gaps():
    gaps = [0.2, 5.0, 1.0, 3.0, 9.0]
    items, stats = estimator(target="bt", k=4, m_min=0.0, m_max=10.0).training_items(gaps, 0)
    compared = items.weak >= 0
    assert stats["tuples"] == int(compared.sum()) == 16 and stats["uncompared"] == 1
    by_weak = dict(zip(items.weak[compared].tolist(), items.margin[compared].tolist(), strict=True))
    assert by_weak[0] == 0.0  # the smallest gap is the weakest pair
    weaks = sorted(by_weak, key=lambda i: gaps[i])
    assert all(by_weak[a] < by_weak[b] for a, b in zip(weaks, weaks[1:], strict=False))


@pytest.mark.parametrize("target", ["ema", "bt"])
@pytest.mark.parametrize("strategy", ["iterative", "random"])
def test_all_equal_gaps_binary_rewards_train_every_pair_once_at_the_floor(target, strategy):
    items, stats = estimator(target=target, strategy=strategy, k=2).training_items([1.0] * 5, round_index=1)
    assert items.strong.tolist() == [0, 1, 2, 3, 4]
    assert items.weak.tolist() == [-1] * 5
    assert items.margin.tolist() == [M_MIN] * 5
    assert stats["uncompared"] == 5 and stats["tuples"] == 0
    assert stats["ties" if strategy == "random" else "no_weaker_partner"] == 10 if strategy == "random" else 5


@pytest.mark.parametrize("target", ["ema", "bt"])
def test_random_strategy_leaves_no_pair_untrained(target):
    gaps = np.random.default_rng(0).permutation(20).astype(float)
    items, stats = estimator(target=target, strategy="random", k=1).training_items(gaps, round_index=0)
    compared = items.weak >= 0
    strong_in_tuples = set(items.strong[compared].tolist())
    floor = items.strong[~compared].tolist()
    assert sorted(strong_in_tuples | set(floor)) == list(range(20))
    assert not strong_in_tuples & set(floor) and len(floor) == len(set(floor))
    assert int(np.argmin(gaps)) in floor  # the smallest gap is never strong
    assert stats["uncompared"] == len(floor) > 0
    assert np.all(items.margin[~compared] == M_MIN)
    assert floor == sorted(floor)


def test_uncompared_pairs_are_read_from_the_labels_after_noise():
    # every label flipped: the smallest gap becomes strong, the largest (pair 2) strong in no tuple
    items, stats = estimator(label_noise=1.0).training_items([0.0, 1.0, 2.0], round_index=0)
    floor = items.strong[items.weak == -1].tolist()
    assert 2 in floor and 0 not in floor
    assert stats["flipped"] == 2 and stats["uncompared"] == len(floor)


@pytest.mark.parametrize("target", ["ema", "bt"])
def test_a_round_without_pairs_has_no_items(target):
    items, stats = estimator(target=target).training_items([], round_index=0)
    assert len(items) == 0 and stats["uncompared"] == 0 and stats["tuples"] == 0


def test_training_items_are_seeded_by_run_seed_and_round():
    gaps = np.linspace(0.0, 5.0, 30)
    first, _ = estimator(k=2).training_items(gaps, round_index=4)
    again, _ = estimator(k=2).training_items(gaps, round_index=4)
    other, _ = estimator(k=2).training_items(gaps, round_index=5)
    assert first.weak.tolist() == again.weak.tolist() != other.weak.tolist()


# ---------------------------------------------------------------- estimator with a judge


class GapJudge:
    """A scripted judge: names the pair with the larger gap (read from its rejected text "gap:<x>"), and gives no
    verdict on a comparison that shows a pair in ``abstain_on``."""

    def __init__(self, abstain_on: tuple[float, ...] = ()) -> None:
        self.abstain_on = abstain_on

    def compare(self, pairs_a: list[Any], pairs_b: list[Any]) -> list[int | None]:
        gap = lambda p: float(p[2].split(":")[1])  # noqa: E731
        return [
            None if gap(a) in self.abstain_on or gap(b) in self.abstain_on else (0 if gap(a) > gap(b) else 1)
            for a, b in zip(pairs_a, pairs_b, strict=True)
        ]


GAPS = [0.5, 3.0, 1.0, 7.0, 2.0, 5.0]
PAIRS = [("1+1=", "2", f"gap:{g}") for g in GAPS]


def test_judge_without_verdict_on_a_pair_leaves_it_to_train_at_the_floor():
    # pair 3 (gap 7.0, the largest) is only ever strong; its comparison gets no verdict. Pair 0 has no weaker one.
    est = estimator(labels="judge", judge=GapJudge(abstain_on=(7.0,)))
    items, stats = est.training_items(GAPS, round_index=0, pairs=PAIRS)
    assert items.strong.tolist() == [1, 2, 4, 5, 0, 3]
    assert items.weak[4:].tolist() == [-1, -1] and items.margin[4:].tolist() == [M_MIN, M_MIN]
    assert all(GAPS[w] < GAPS[s] for s, w in zip(items.strong[:4], items.weak[:4], strict=True))
    assert stats["uncompared"] == 2 and stats["tuples"] == 4 and stats["flipped"] == 0
    assert stats["judge_no_label"] == 1 and stats["judge_labelled"] == stats["judge_agree_with_gap"] == 4
    assert "judge_agree_with_first" not in stats


def test_judge_with_no_verdict_at_all_still_trains_every_pair():
    est = estimator(labels="judge", judge=GapJudge(abstain_on=tuple(GAPS)), target="bt")
    items, stats = est.training_items(GAPS, round_index=0, pairs=PAIRS)
    assert items.strong.tolist() == list(range(6)) and items.weak.tolist() == [-1] * 6
    assert items.margin.tolist() == [M_MIN] * 6 and stats["uncompared"] == 6 and stats["tuples"] == 0


def test_judge_labels_need_a_judge_every_pairs_texts_and_no_label_noise():
    with pytest.raises(ValueError, match="needs a judge"):
        estimator(labels="judge")
    with pytest.raises(ValueError, match="label_noise"):
        estimator(labels="judge", judge=GapJudge(), label_noise=0.1)
    with pytest.raises(ValueError, match="6 gaps but none pairs"):
        estimator(labels="judge", judge=GapJudge()).training_items(GAPS, 0)
    with pytest.raises(ValueError, match="6 gaps but 5 pairs"):
        estimator(labels="judge", judge=GapJudge()).training_items(GAPS, 0, pairs=PAIRS[:5])
    with pytest.raises(ValueError, match="unknown PoP label source"):
        estimator(labels="model")


def test_gap_labels_ignore_the_pairs_texts():
    with_texts, _ = estimator().training_items(GAPS, 0, pairs=PAIRS[:2])
    without, _ = estimator().training_items(GAPS, 0)
    assert with_texts.strong.tolist() == without.strong.tolist() and with_texts.weak.tolist() == without.weak.tolist()


def test_kwargs_from_config_pass_the_pop_settings_and_the_judge_only_with_judge_labels():
    pop = load_config(None, ["pop.target=bt", "pop.k=3", "pop.m_min=1.5"]).pop
    kwargs = PopEstimator.kwargs_from_config(pop, seed=7)
    assert kwargs == dict(
        target="bt", strategy="iterative", k=3, label_noise=0.0, m_min=1.5, m_max=10.0, seed=7, labels="gap"
    )
    judged = load_config(None, ["pop.labels=judge", "pop.judge_path=m", "pop.judge_backend=hf"]).pop
    judge = PopEstimator.kwargs_from_config(judged, seed=2)["judge"]
    assert judge["path"] == "m" and judge["backend"] == "hf" and judge["seed"] == 2
    assert judge["trust_remote_code"] is False and judge["choices"] == ("A", "B")
    assert PopEstimator.kwargs_from_config(judged, seed=2, trust_remote_code=True)["judge"]["trust_remote_code"]
