from collections import Counter

import numpy as np
import pytest

from omni_ray.pop import (
    PopTuple,
    bt_margins,
    fit_bradley_terry,
    pop_targets_bt,
    sample_pop_tuples,
    tuples_from_labels,
)


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def _spearman(a, b) -> float:
    return float(np.corrcoef(_ranks(np.asarray(a)), _ranks(np.asarray(b)))[0, 1])


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


def test_iterative_reuses_partners_evenly_when_fewer_than_k_candidates():
    gaps = [0.0, 1.0, 2.0]
    tuples, stats = sample_pop_tuples(gaps, strategy="iterative", k=4, rng=np.random.default_rng(1))
    assert [t.weak for t in tuples if t.strong == 1] == [0, 0, 0, 0]
    assert sorted(Counter(t.weak for t in tuples if t.strong == 2).values()) == [2, 2]
    assert stats.partners_with_replacement == 2


def test_random_sampling_makes_larger_gaps_strong_more_often():
    gaps = np.arange(10, dtype=float)
    tuples, stats = sample_pop_tuples(gaps, strategy="random", k=2000, rng=np.random.default_rng(0))
    assert stats.ties == 0 and stats.tuples == 20000
    counts = np.bincount([t.strong for t in tuples], minlength=10)
    assert counts[0] == 0
    assert np.all(np.diff(counts) > 0)
    assert _spearman(counts, gaps) == pytest.approx(1.0)
    assert all(gaps[t.strong] > gaps[t.weak] for t in tuples)


def test_random_sampling_skips_and_counts_equal_gaps():
    tuples, stats = sample_pop_tuples([1.0, 1.0, 1.0], strategy="random", k=5, rng=np.random.default_rng(0))
    assert tuples == [] and stats.ties == 15


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
        ({"k": 0}, "k"),
        ({"strategy": "bogus"}, "iterative"),
    ],
)
def test_invalid_sampling_parameters_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_pop_tuples([1.0, 2.0], rng=np.random.default_rng(0), **kwargs)


def test_tuples_from_judge_labels_put_the_winner_as_strong():
    assert tuples_from_labels([(0, 1, 1), (2, 3, 2)]) == [PopTuple(1, 0), PopTuple(2, 3)]
    with pytest.raises(ValueError, match="winner"):
        tuples_from_labels([(0, 1, 5)])
    with pytest.raises(ValueError):
        tuples_from_labels([(1, 1, 1)])


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


def test_bt_margins_constant_strengths_map_to_midpoint():
    assert bt_margins(np.zeros(4), m_min=0.0, m_max=10.0).tolist() == [5.0] * 4
    with pytest.raises(ValueError):
        bt_margins(np.zeros(2), m_min=2.0, m_max=1.0)


def test_pop_targets_bt_gives_one_margin_per_pair_ordered_by_gap():
    gaps = np.array([0.2, 5.0, 1.0, 3.0, 9.0])
    margins, tuples, stats = pop_targets_bt(
        gaps, strategy="iterative", k=4, label_noise=0.0, rng=np.random.default_rng(0), m_min=0.0, m_max=10.0
    )
    assert margins.shape == gaps.shape
    assert stats.tuples == len(tuples) > 0 and stats.no_weaker_partner == 1
    assert _spearman(margins, gaps) == pytest.approx(1.0)
    assert margins.min() == 0.0 and margins.max() == 10.0
