import json
from types import SimpleNamespace

import numpy as np
import pytest

from omni_ray.pairs import Pair, PairStats, Sample, build_pairs, scored_samples


def _s(pid: str, resp: str, score: float, correct: bool | None = None, version: int = 0) -> Sample:
    return Sample(
        prompt_id=pid,
        prompt=f"prompt {pid}",
        response=resp,
        prompt_token_ids=[1, 2],
        response_token_ids=[ord(c) for c in resp],
        score=score,
        correct=correct,
        policy_version=version,
    )


def _check_accounting(stats: PairStats) -> None:
    assert stats.prompts == (
        stats.prompts_with_pairs
        + stats.dropped_single_sample
        + stats.dropped_all_tied
        + stats.dropped_no_candidate
        + stats.dropped_identical_text
        + stats.dropped_min_gap
    )


def test_best_worst_picks_max_and_min_score():
    samples = [_s("p", "a", 3.0), _s("p", "b", 9.0), _s("p", "c", 1.0), _s("p", "d", 5.0)]
    pairs, stats = build_pairs(samples)
    assert len(pairs) == 1 and stats.pairs == 1 and stats.prompts_with_pairs == 1
    p = pairs[0]
    assert (p.chosen, p.rejected, p.score_chosen, p.score_rejected, p.gap) == ("b", "c", 9.0, 1.0, 8.0)
    assert p.chosen_token_ids == [ord("b")] and p.rejected_token_ids == [ord("c")]
    assert stats.tie_broken_randomly == 0


def test_prompts_keep_first_appearance_order():
    samples = [_s("z", "a", 1.0), _s("a", "x", 1.0), _s("z", "b", 2.0), _s("a", "y", 0.0)]
    pairs, _ = build_pairs(samples)
    assert [p.prompt_id for p in pairs] == ["z", "a"]


def test_all_tied_prompts_are_dropped_and_counted():
    samples = [_s("p", "a", 4.0), _s("p", "b", 4.0), _s("q", "a", 1.0), _s("q", "b", 2.0), _s("r", "x", 7.0)]
    pairs, stats = build_pairs(samples)
    assert [p.prompt_id for p in pairs] == ["q"]
    assert stats.dropped_all_tied == 1 and stats.dropped_single_sample == 1 and stats.prompts == 3
    _check_accounting(stats)


def test_min_gap_drops_and_counts_small_gaps():
    samples = [_s("p", "a", 1.0), _s("p", "b", 1.5), _s("q", "a", 1.0), _s("q", "b", 4.0)]
    pairs, stats = build_pairs(samples, min_gap=1.0)
    assert [p.prompt_id for p in pairs] == ["q"]
    assert stats.dropped_min_gap == 1
    _check_accounting(stats)


def test_min_gap_boundary_keeps_a_gap_equal_to_it_and_drops_one_just_below():
    samples = [_s("eq", "a", 1.0), _s("eq", "b", 1.5), _s("below", "a", 1.0), _s("below", "b", 1.4999)]
    pairs, stats = build_pairs(samples, min_gap=0.5)
    assert [p.prompt_id for p in pairs] == ["eq"] and pairs[0].gap == 0.5
    assert stats.dropped_min_gap == 1
    _check_accounting(stats)


def test_default_min_gap_keeps_every_positive_gap():
    pairs, stats = build_pairs([_s("p", "a", 1.0), _s("p", "b", 1.25)])
    assert len(pairs) == 1 and stats.dropped_min_gap == 0


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_min_gap_must_be_finite_and_not_negative(bad):
    with pytest.raises(ValueError, match="min_gap must be a finite number >= 0"):
        build_pairs([_s("p", "a", 1.0)], min_gap=bad)


def test_nonfinite_scores_are_dropped_and_counted_and_the_run_goes_on():
    samples = [
        _s("p", "a", float("nan")),
        _s("p", "b", 2.0),
        _s("p", "c", float("inf")),
        _s("p", "d", 5.0),
        _s("q", "a", float("-inf")),
        _s("q", "b", 1.0),
    ]
    pairs, stats = build_pairs(samples)
    assert len(pairs) == 1 and (pairs[0].chosen, pairs[0].rejected) == ("d", "b")
    assert stats.dropped_nonfinite_samples == 3
    assert stats.dropped_single_sample == 1  # q has one finite sample left
    _check_accounting(stats)


def test_ties_for_best_are_broken_by_seeded_rng_not_index():
    samples = [_s("p", "first", 9.0), _s("p", "second", 9.0), _s("p", "low", 1.0)]
    chosen = set()
    for seed in range(20):
        pairs, stats = build_pairs(samples, rng=np.random.default_rng(seed))
        chosen.add(pairs[0].chosen)
        assert stats.tie_broken_randomly == 1
    assert chosen == {"first", "second"}
    # same seed -> same choice
    a = build_pairs(samples, rng=np.random.default_rng(5))[0][0].chosen
    b = build_pairs(samples, rng=np.random.default_rng(5))[0][0].chosen
    assert a == b


def test_identical_chosen_and_rejected_text_is_dropped_and_counted():
    # a stochastic scorer gave the same text two different scores
    samples = [_s("p", "same", 9.0), _s("p", "same", 1.0)]
    pairs, stats = build_pairs(samples)
    assert pairs == [] and stats.dropped_identical_text == 1
    # a distinct-text rejected among the tied worst is preferred
    samples = [_s("q", "same", 9.0), _s("q", "same", 1.0), _s("q", "other", 1.0)]
    pairs, _ = build_pairs(samples)
    assert pairs[0].rejected == "other"


def test_best_random_rejects_only_strictly_lower_scores():
    samples = [_s("p", "a", 9.0), _s("p", "b", 2.0), _s("p", "c", 5.0), _s("p", "d", 9.0)]
    rejected = set()
    for seed in range(30):
        pairs, _ = build_pairs(samples, strategy="best_random", rng=np.random.default_rng(seed))
        assert pairs[0].score_chosen == 9.0
        rejected.add(pairs[0].rejected)
    assert rejected == {"b", "c"}


def test_math_rule_prefers_lower_scored_correct_rejected():
    samples = [
        _s("p", "good", 8.5, correct=True),
        _s("p", "ok", 4.0, correct=True),
        _s("p", "meh", 6.5, correct=True),
        _s("p", "wrong", 1.0, correct=False),
    ]
    pairs, stats = build_pairs(samples, strategy="math")
    assert (pairs[0].chosen, pairs[0].rejected) == ("good", "ok")
    assert pairs[0].chosen_correct is True and pairs[0].rejected_correct is True
    assert stats.dropped_no_candidate == 0


def test_math_rule_falls_back_to_lower_scored_wrong_answer():
    samples = [
        _s("p", "good", 8.0, correct=True),
        _s("p", "wrong_hi", 9.5, correct=False),
        _s("p", "wrong_mid", 5.0, correct=False),
        _s("p", "wrong_lo", 2.0, correct=False),
    ]
    pairs, _ = build_pairs(samples, strategy="math")
    assert (pairs[0].chosen, pairs[0].rejected) == ("good", "wrong_lo")
    assert pairs[0].rejected_correct is False


def test_math_rule_without_valid_chosen_or_rejected_is_dropped_no_candidate():
    no_correct = [_s("a", "x", 9.0, correct=False), _s("a", "y", 3.0, correct=False)]
    below_threshold = [_s("b", "x", 6.0, correct=True), _s("b", "y", 3.0, correct=False)]
    nothing_lower = [_s("c", "x", 9.0, correct=True), _s("c", "y", 9.5, correct=False)]
    unknown = [_s("d", "x", 9.0, correct=True), _s("d", "y", 3.0, correct=None)]
    pairs, stats = build_pairs(no_correct + below_threshold + nothing_lower + unknown, strategy="math")
    assert pairs == [] and stats.dropped_no_candidate == 4
    _check_accounting(stats)


def test_math_rule_with_a_tie_at_the_top_and_no_lower_correct_falls_back_to_the_wrong_answer():
    samples = [_s("p", "good", 9.0, correct=True), _s("p", "good2", 9.0, correct=True), _s("p", "bad", 2.0, False)]
    pairs, stats = build_pairs(samples, strategy="math")
    assert pairs[0].chosen in ("good", "good2") and pairs[0].rejected == "bad"
    assert stats.tie_broken_randomly == 1 and stats.dropped_min_gap == 0


def test_math_rule_without_a_candidate_draws_no_tie():
    _, stats = build_pairs([_s("a", "x", 9.0, correct=False), _s("a", "y", 3.0, correct=False)], strategy="math")
    assert stats.dropped_no_candidate == 1 and stats.tie_broken_randomly == 0


def test_without_rng_pairs_are_drawn_from_seed_zero():
    samples = _many(20)
    assert build_pairs(samples, strategy="best_random") == build_pairs(
        samples, strategy="best_random", rng=np.random.default_rng(0)
    )


def test_swap_prob_zero_draws_nothing_from_the_rng():
    # one draw per prompt: the rejected among the 2 samples below the unique best, in sample order
    samples = []
    for i in range(30):
        samples += [_s(f"p{i}", "b", 10.0), _s(f"p{i}", "m", 5.0), _s(f"p{i}", "w", 1.0)]
    pairs, _ = build_pairs(samples, strategy="best_random", rng=np.random.default_rng(11), swap_prob=0.0)
    draws = np.random.default_rng(11)
    assert [p.rejected for p in pairs] == [("m", "w")[int(draws.integers(2))] for _ in range(30)]


def test_samples_and_pairs_default_to_version_zero_unswapped_and_unknown_correctness():
    sample = Sample("p", "q", "r", [1], [2], 3.0)
    assert (sample.correct, sample.policy_version) == (None, 0)
    pair = Pair("p", "q", [1], "c", "r", [2], [3], 2.0, 1.0)
    assert (pair.policy_version, pair.chosen_correct, pair.rejected_correct, pair.swapped) == (0, None, None, False)
    counters = PairStats().as_dict()
    assert {"prompts", "prompts_with_pairs", "pairs"} <= set(counters) and set(counters.values()) == {0}


def test_scored_samples_carry_prompt_completion_score_and_verifier_result():
    prompt = SimpleNamespace(prompt_id="p7", text="1+1=")
    completions = [SimpleNamespace(text="2", token_ids=(9,)), SimpleNamespace(text="3", token_ids=[8])]
    flat = [(prompt, [5, 6], c) for c in completions]
    unverified = scored_samples(flat, [np.float32(10.0), 0.0], None)
    assert [(s.prompt_id, s.prompt, s.response, s.response_token_ids, s.score) for s in unverified] == [
        ("p7", "1+1=", "2", [9], 10.0),
        ("p7", "1+1=", "3", [8], 0.0),
    ]
    assert [(s.correct, s.policy_version, s.prompt_token_ids) for s in unverified] == [(None, 0, [5, 6])] * 2
    verified = scored_samples(flat, [10.0, 0.0], [1, 0], policy_version=4)
    assert [(s.correct, s.policy_version) for s in verified] == [(True, 4), (False, 4)]
    with pytest.raises(ValueError):
        scored_samples(flat, [10.0], None)


def test_unknown_strategy_raises_naming_valid_ones():
    with pytest.raises(ValueError, match="best_worst.*best_random.*math"):
        build_pairs([_s("p", "a", 1.0)], strategy="nope")


def test_pair_record_is_json_serialisable():
    pairs, stats = build_pairs([_s("p", "a", np.float32(2.0), version=3), _s("p", "b", 7.0, version=2)])
    rec = json.loads(json.dumps(pairs[0].to_record()))
    for key in ("prompt_id", "chosen", "rejected", "score_chosen", "score_rejected"):
        assert key in rec
    assert rec["gap"] == 5.0 and rec["policy_version"] == 2
    assert isinstance(pairs[0], Pair)
    assert json.dumps(stats.as_dict())


def _many(n: int = 40) -> list[Sample]:
    """n prompts, each with a clear best ("b", correct) and worst ("w"), plus a tie at the top for tie-breaking."""
    out = []
    for i in range(n):
        out += [_s(f"p{i}", "b", 10.0, correct=True), _s(f"p{i}", "b2", 10.0, correct=True)]
        out += [_s(f"p{i}", "w", 1.0, correct=False), _s(f"p{i}", "m", 5.0, correct=False)]
    return out


@pytest.mark.parametrize("strategy", ["best_worst", "best_random"])
def test_swap_prob_zero_changes_nothing_not_even_the_rng_stream(strategy):
    default, stats_default = build_pairs(_many(), strategy=strategy, rng=np.random.default_rng(3))
    zero, stats_zero = build_pairs(_many(), strategy=strategy, rng=np.random.default_rng(3), swap_prob=0.0)
    assert zero == default and stats_zero == stats_default and stats_zero.swapped == 0
    assert not any(p.swapped for p in zero)


def test_swap_prob_one_swaps_every_pair_and_keeps_the_scores_in_place():
    pairs, stats = build_pairs(_many(), rng=np.random.default_rng(3), swap_prob=1.0)
    assert stats.swapped == stats.pairs == len(pairs) == 40
    _check_accounting(stats)
    for p in pairs:
        assert p.swapped and p.rejected in ("b", "b2") and p.chosen == "w"
        assert p.chosen_token_ids == [ord("w")] and p.rejected_token_ids == [ord(c) for c in p.rejected]
        assert (p.chosen_correct, p.rejected_correct) == (False, True)  # correctness travels with the response
        assert (p.score_chosen, p.score_rejected, p.gap) == (10.0, 1.0, 9.0)  # the learner sees an unswapped gap
    assert pairs[0].to_record()["swapped"] is True


def test_swap_prob_half_swaps_about_half_counts_them_and_is_seeded():
    pairs, stats = build_pairs(_many(400), rng=np.random.default_rng(5), swap_prob=0.5)
    assert stats.swapped == sum(p.swapped for p in pairs) == sum(p.chosen == "w" for p in pairs)
    assert 150 < stats.swapped < 250
    again, _ = build_pairs(_many(400), rng=np.random.default_rng(5), swap_prob=0.5)
    assert again == pairs


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_swap_prob_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError, match="swap_prob must be in \\[0, 1\\]"):
        build_pairs(_many(1), swap_prob=bad)
