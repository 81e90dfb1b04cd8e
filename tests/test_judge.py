"""LLM judges: parsing, batching and failure counting, on CPU with a tiny untrained Llama through the HF backend.

The tiny model's opinions are noise; what is checked is that every score / verdict is exactly what the parsing
rules read from the real generated text, that batches and counters add up, and that nothing unreadable is guessed.
Each tiny-model test also asserts that something was scored or labelled, so no check passes on an empty list; the
exact verdicts of the parsing rules are checked with a scripted engine (:class:`ScriptedEngine`).
"""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from omni_ray.config import ConfigError, ScorerSpec, load_config
from omni_ray.pop import PopEstimator, sample_pop_tuples, tuples_from_labels
from omni_ray.rollout.worker import RolloutWorker
from omni_ray.scoring import CorrectAtScorer, JudgeScorer, PopJudge, ScoringService, build_scorer, judge_comparisons
from omni_ray.scoring.judge import parse_choice, parse_rating, verdicts_from_outputs

RATING_TEMPLATE = "{prompt}{response}="  # the tiny tokenizer only knows 0-9 + - * = and space
POP_TEMPLATE = "{chosen_a}-{rejected_a}*{chosen_b}-{rejected_b}="
PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (10, 5), (7, 7), (33, 44), (9, 0), (50, 50), (2, 2)]]
RESPONSES = ["3", "15", "14", "77", "9", "100", "4"]


@pytest.fixture(scope="module")
def judge_model_dir(tmp_path_factory) -> str:
    from omni_ray.models.tiny import make_tiny

    return str(make_tiny(tmp_path_factory.mktemp("judge") / "tiny", seed=0, sft_target_accuracy=None, sft_max_steps=0))


class RecordingEngine:
    """The real HF rollout worker, with the prompt batches it was asked for recorded (delegates everything)."""

    def __init__(self, worker: RolloutWorker) -> None:
        self.worker = worker
        self.tokenizer = worker.tokenizer
        self.max_model_len = 64
        self.batches: list[list[list[int]]] = []

    def generate(self, prompt_token_ids: list[list[int]], **kwargs: Any) -> Any:
        self.batches.append([list(p) for p in prompt_token_ids])
        assert kwargs["temperature"] == 0.0 and kwargs["n"] == 1  # judges decode greedily
        return self.worker.generate(prompt_token_ids, **kwargs)


@pytest.fixture(scope="module")
def worker(judge_model_dir) -> RolloutWorker:
    return RolloutWorker(judge_model_dir, backend="hf", max_model_len=64, num_threads=1)


@pytest.fixture
def engine(worker) -> RecordingEngine:
    return RecordingEngine(worker)


def pair_texts(n: int) -> list[tuple[str, str, str]]:
    return [(PROMPTS[i % len(PROMPTS)], RESPONSES[i % len(RESPONSES)], str(i)) for i in range(n)]


def choices_the_model_says(engine: Any, a: list[Any], b: list[Any]) -> tuple[str, str]:
    """Two answers the untrained model actually gives to these comparisons (so readable verdicts occur next to
    unreadable ones), found by a probe call; the test fails here if the model says fewer than two."""
    probe = PopJudge(engine, template=POP_TEMPLATE, choices=("A", "B"), max_new_tokens=2)
    probe.compare(a, b)
    said = Counter(o.strip() for o in probe.last_outputs if o and o.strip().isdigit())
    engine.batches.clear()
    common = [text for text, _ in said.most_common(2)]
    assert len(common) == 2, f"the tiny judge gave fewer than two numeric answers: {probe.last_outputs}"
    return common[0], common[1]


class ScriptedEngine:
    """A fake engine, not an LLM: the tiny model's outputs cannot be chosen, so the tests that expect exact scores
    and verdicts script them. It answers each prompt with the next scripted text (has ``generate`` / ``tokenizer``
    / ``max_model_len`` like a RolloutWorker) and records the prompts it was shown, decoded."""

    def __init__(self, *texts: str) -> None:
        from omni_ray.models.tiny import build_tokenizer

        self.tokenizer = build_tokenizer()
        self.max_model_len = 64
        self.texts = list(texts)
        self.shown: list[str] = []

    def generate(self, prompt_token_ids: list[list[int]], **kwargs: Any) -> list[list[SimpleNamespace]]:
        self.shown += [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt_token_ids]
        return [[SimpleNamespace(text=self.texts.pop(0))] for _ in prompt_token_ids]


# ---------------------------------------------------------------------------------------------------------------------
# parsing rules (pure)


@pytest.mark.parametrize(
    ("text", "scale", "expected"),
    [
        ("7", (0, 10), 7.0),
        (" 8/10", (0, 10), 8.0),
        ("Rating: 9.5 because", (0, 10), 9.5),
        ("-3 points", (-5, 5), -3.0),
        ("1+2", (0, 10), 1.0),
        ("10", (0, 10), 10.0),
        ("11", (0, 10), None),  # out of range: not clipped
        ("12 5", (0, 10), None),  # the first number decides; a later one is not picked instead
        ("", (0, 10), None),
        ("great answer", (0, 10), None),
    ],
)
def test_rating_is_the_first_number_and_only_if_on_the_scale(text, scale, expected):
    assert parse_rating(text, scale) == expected


@pytest.mark.parametrize(
    ("text", "choices", "expected"),
    [
        ("A", ("A", "B"), 0),
        (" B.", ("A", "B"), 1),
        ("Answer: B", ("A", "B"), 1),  # the A inside "Answer" is not a standalone answer
        ("B, not A", ("A", "B"), 1),
        ("a", ("A", "B"), None),  # case-sensitive: the English article is not an answer
        ("AB", ("A", "B"), None),
        ("2", ("1", "2"), 1),
        ("12", ("1", "2"), None),
        ("", ("A", "B"), None),
    ],
)
def test_pop_choice_is_the_first_standalone_answer(text, choices, expected):
    assert parse_choice(text, choices) == expected


def test_both_orders_keeps_only_agreeing_verdicts_and_counts_each_failure():
    #            as given:    A    B    A     x    None  |  swapped:  B    A    A    A    A
    outputs = ["A", "B", "A", "x", None, "B", "A", "A", "A", "A"]
    verdicts, counts = verdicts_from_outputs(outputs, ("A", "B"), both_orders=True)
    assert verdicts == [0, 1, None, None, None]
    assert counts == {"too_long": 1, "unparseable": 1, "inconsistent": 1}
    verdicts, counts = verdicts_from_outputs(["B", "?", None], ("A", "B"))
    assert verdicts == [1, None, None] and counts == {"too_long": 1, "unparseable": 1, "inconsistent": 0}


# ---------------------------------------------------------------------------------------------------------------------
# pointwise judge on the tiny model


def test_judge_scores_are_what_the_generated_text_says_in_batches_with_unparseable_counted(engine):
    judge = JudgeScorer(engine, template=RATING_TEMPLATE, scale=(0, 99), max_new_tokens=2, batch_size=3)
    res = judge.score(PROMPTS, RESPONSES)
    assert [len(b) for b in engine.batches] == [3, 3, 1]
    tok = engine.tokenizer
    shown = [tok.decode(ids, skip_special_tokens=True) for batch in engine.batches for ids in batch]
    assert shown == [p + r + "=" for p, r in zip(PROMPTS, RESPONSES)]
    assert all(ids[0] == tok.bos_token_id for batch in engine.batches for ids in batch)
    assert len(res) == len(PROMPTS) and res.scale == (0.0, 99.0)
    assert np.isfinite(res.scores).any(), f"nothing scored: {judge.last_outputs}"
    for score, text in zip(res.scores, judge.last_outputs):
        expected = parse_rating(text, (0.0, 99.0))
        assert (math.isnan(score) and expected is None) or score == expected
    assert res.unparseable == int(np.isnan(res.scores).sum()) == judge.last_stats["unparseable"]
    assert judge.last_stats == {"n": 7, "unparseable": res.unparseable, "too_long": 0, "engine_calls": 3}
    outputs = list(judge.last_outputs)
    again = judge.score(PROMPTS, RESPONSES)  # greedy: the same text, the same scores
    assert judge.last_outputs == outputs and np.array_equal(again.scores, res.scores, equal_nan=True)


def test_rating_prompt_that_does_not_fit_scores_nan_counted_and_is_never_generated(engine):
    judge = JudgeScorer(engine, template=RATING_TEMPLATE, scale=(0, 9), max_new_tokens=4)
    long_response = "1" * 60  # BOS + prompt + 60 + "=" + 4 new tokens > 64
    res = judge.score(["1+2=", "3+4="], ["3", long_response])
    assert math.isnan(res.scores[1]) and judge.last_outputs[1] is None and isinstance(judge.last_outputs[0], str)
    assert judge.last_stats["too_long"] == 1 and res.unparseable == judge.last_stats["unparseable"] + 1
    assert [len(b) for b in engine.batches] == [1]


def test_judge_spec_builds_through_build_scorer_and_service_reports_unparseable(judge_model_dir):
    spec = ScorerSpec(
        type="judge",
        path=judge_model_dir,
        backend="hf",
        template=RATING_TEMPLATE,
        scale_low=0,
        scale_high=99,
        max_new_tokens=2,
        batch_size=4,
    )
    scorer = build_scorer([spec])
    assert isinstance(scorer, JudgeScorer) and scorer.batch_size == 4 and scorer.generator.max_model_len == 64
    res = ScoringService(scorer, rescale="declared").score(PROMPTS, RESPONSES)
    assert res.unparseable == res.nonfinite == int(np.isnan(res.raw_scores).sum())
    assert res.nonfinite < len(PROMPTS), f"nothing scored: {scorer.last_outputs}"
    assert scorer.last_stats["engine_calls"] == 2
    scorer.close()


def test_scripted_ratings_are_read_exactly_and_unreadable_ones_counted():
    engine = ScriptedEngine("7", " 8/10", "great", "11", "2.5 stars")
    judge = JudgeScorer(engine, template=RATING_TEMPLATE, scale=(0, 10), max_new_tokens=3, batch_size=2)
    res = judge.score(PROMPTS[:5], RESPONSES[:5])
    np.testing.assert_array_equal(res.scores, [7.0, 8.0, np.nan, np.nan, 2.5])  # "11" is off the scale
    assert res.unparseable == 2 and judge.last_stats == {"n": 5, "unparseable": 2, "too_long": 0, "engine_calls": 3}
    assert engine.shown == [p + r + "=" for p, r in zip(PROMPTS[:5], RESPONSES[:5])]


def test_scripted_judge_with_correct_at_reports_an_accuracy_through_the_service():
    judge = JudgeScorer(ScriptedEngine("9", "4", "x"), template=RATING_TEMPLATE, scale=(0, 10))
    res = ScoringService(CorrectAtScorer(judge, 5.0), rescale="none").score(PROMPTS[:3], RESPONSES[:3])
    assert res.correct.tolist() == [True, False, False] and res.unparseable == 1


def test_judge_templates_are_validated(engine):
    with pytest.raises(ValueError, match="allowed placeholders"):
        JudgeScorer(engine, template="{answer}=")
    with pytest.raises(ValueError, match="required"):
        JudgeScorer(engine, template="{prompt}=")
    assert "{response}" in JudgeScorer(engine, scale=(1, 7)).template  # the built-in English template
    with pytest.raises(ValueError, match="allowed placeholders"):
        PopJudge(engine, template="{chosen_a} {chosen_c}")


def test_config_refuses_judge_scorer_without_model_or_with_a_bad_template(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("scoring:\n  scorers:\n    - type: judge\n")
    with pytest.raises(ConfigError, match=r"scorers\[0\]\.path"):
        load_config(p)
    p.write_text("scoring:\n  scorers:\n    - type: judge\n      path: m\n      template: '{answer}'\n")
    with pytest.raises(ConfigError, match=r"scorers\[0\]\.template"):
        load_config(p)
    p.write_text("scoring:\n  scorers:\n    - type: judge\n      path: m\n      template: '{prompt}{response}='\n")
    assert load_config(p).scoring.scorers[0].template == "{prompt}{response}="


# ---------------------------------------------------------------------------------------------------------------------
# PoP judge on the tiny model


@pytest.mark.parametrize("both_orders", [False, True])
def test_pop_judge_verdicts_are_read_from_the_generated_text_and_failures_counted(engine, both_orders):
    a, b = pair_texts(6), pair_texts(6)[::-1]
    choices = choices_the_model_says(engine, a, b)
    judge = PopJudge(
        engine, template=POP_TEMPLATE, choices=choices, max_new_tokens=2, batch_size=4, both_orders=both_orders
    )
    verdicts = judge.compare(a, b)
    n_prompts = 12 if both_orders else 6
    assert sum(len(x) for x in engine.batches) == n_prompts and len(engine.batches) == math.ceil(n_prompts / 4)
    assert len(verdicts) == 6 and set(verdicts) <= {0, 1, None}
    expected, _ = verdicts_from_outputs(judge.last_outputs, choices, both_orders=both_orders)
    assert verdicts == expected
    assert any(o is not None and parse_choice(o, choices) is not None for o in judge.last_outputs)
    if not both_orders:
        assert verdicts.count(0) >= 1 and verdicts.count(1) >= 1  # the probe saw both answers
    stats = judge.last_stats
    assert verdicts.count(None) == stats["unparseable"] + stats["too_long"] + stats["inconsistent"]
    assert stats["compared"] == 6 and stats["engine_calls"] == len(engine.batches)
    tok = engine.tokenizer
    first = tok.decode(engine.batches[0][0], skip_special_tokens=True)
    assert first == POP_TEMPLATE.format(chosen_a=a[0][1], rejected_a=a[0][2], chosen_b=b[0][1], rejected_b=b[0][2])


DIGIT_PAIRS = [("1+1=", str(k), str(10 + k)) for k in range(6)]  # texts the tiny tokenizer encodes and decodes


def test_scripted_pop_verdicts_are_exact():
    engine = ScriptedEngine("A", " B.", "Answer: B", "a", "AB")
    judge = PopJudge(engine, template=POP_TEMPLATE, max_new_tokens=3)
    assert judge.compare(DIGIT_PAIRS[:5], DIGIT_PAIRS[1:6]) == [0, 1, 1, None, None]
    assert judge.last_stats["unparseable"] == 2 and judge.last_stats["compared"] == 5


def test_scripted_pop_verdicts_in_both_orders_keep_only_agreeing_answers():
    #                       as given:     A    B    A  |  swapped:  B    A    A
    judge = PopJudge(ScriptedEngine("A", "B", "A", "B", "A", "A"), template=POP_TEMPLATE, both_orders=True)
    assert judge.compare(DIGIT_PAIRS[:3], DIGIT_PAIRS[3:]) == [0, 1, None]
    assert judge.last_stats["inconsistent"] == 1 and judge.last_stats["engine_calls"] == 1


def test_judge_comparisons_with_a_scripted_judge_naming_the_first_pair_shown():
    candidates = [(1, 0), (3, 2), (5, 4), (0, 3), (2, 5), (4, 1)]
    engine = ScriptedEngine(*["A"] * len(candidates))
    comps, stats = judge_comparisons(PopJudge(engine, template=POP_TEMPLATE), DIGIT_PAIRS, candidates,
                                     rng=np.random.default_rng(1))  # fmt: skip
    swapped = np.random.default_rng(1).random(len(candidates)) < 0.5  # the documented display-order draw
    shown = [(j, i) if s else (i, j) for (i, j), s in zip(candidates, swapped)]
    assert comps == [(i, j, a) for (i, j), (a, _) in zip(candidates, shown)]  # "A": the first pair shown wins
    assert stats == {"candidates": 6, "labelled": 6, "no_label": 0, "agree_with_first": int((~swapped).sum())}
    pair = DIGIT_PAIRS
    expected_prompts = [
        POP_TEMPLATE.format(chosen_a=pair[a][1], rejected_a=pair[a][2], chosen_b=pair[b][1], rejected_b=pair[b][2])
        for a, b in shown
    ]
    assert engine.shown == expected_prompts


class GapOracleJudge:
    """A scripted judge (not an LLM): the tiny model's opinions cannot be controlled, so the label bookkeeping around
    a judge is checked with this deterministic one. It reads each pair's true gap from its rejected text
    ("gap:<x>") and names the larger, or always the first position shown when ``position_biased``."""

    def __init__(self, position_biased: bool = False) -> None:
        self.position_biased = position_biased
        self.calls = 0

    def compare(self, pairs_a: list[Any], pairs_b: list[Any]) -> list[int | None]:
        self.calls += 1
        if self.position_biased:
            return [0] * len(pairs_a)
        gap = lambda p: float(p[2].split(":")[1])  # noqa: E731
        return [0 if gap(x) > gap(y) else 1 for x, y in zip(pairs_a, pairs_b)]


GAPS = [0.5, 3.0, 1.0, 7.0, 2.0, 5.0]
PAIRS = [("1+1=", "2", f"gap:{g}") for g in GAPS]


def test_judge_comparisons_map_verdicts_back_to_pair_indices_whatever_order_they_were_shown_in():
    candidates = [(1, 0), (3, 2), (5, 4), (0, 3), (2, 5)]
    comps, stats = judge_comparisons(GapOracleJudge(), PAIRS, candidates, rng=np.random.default_rng(0))
    assert [(i, j) for i, j, _ in comps] == candidates
    assert all(w == (i if GAPS[i] > GAPS[j] else j) for i, j, w in comps)
    assert stats == {"candidates": 5, "labelled": 5, "no_label": 0, "agree_with_first": 3}
    assert [(t.strong, t.weak) for t in tuples_from_labels(comps)] == [(1, 0), (3, 2), (5, 4), (3, 0), (5, 2)]
    # A judge that always names the first pair shown: without shuffling it would agree with every candidate order.
    many = [(i, j) for i in range(6) for j in range(6) if i != j] * 3
    _, unshuffled = judge_comparisons(GapOracleJudge(position_biased=True), PAIRS, many)
    _, shuffled = judge_comparisons(GapOracleJudge(position_biased=True), PAIRS, many, rng=np.random.default_rng(0))
    assert unshuffled["agree_with_first"] == len(many)
    assert 0.3 * len(many) < shuffled["agree_with_first"] < 0.7 * len(many)


def test_judge_comparisons_with_the_tiny_pop_judge_leave_unlabelled_comparisons_out(engine):
    judge = PopJudge(engine, template=POP_TEMPLATE, choices=("33", "32"), max_new_tokens=2)
    candidates = [(1, 0), (3, 2), (5, 4), (0, 3), (2, 5), (4, 1)]
    comps, stats = judge_comparisons(judge, PAIRS, candidates, rng=np.random.default_rng(1))
    assert stats["labelled"] >= 1, f"nothing labelled: {judge.last_outputs}"
    assert stats["labelled"] == len(comps) == 6 - judge.last_stats["unparseable"] - judge.last_stats["too_long"]
    assert stats["labelled"] + stats["no_label"] == 6
    assert all((i, j) in candidates and w in (i, j) for i, j, w in comps)
    tuples_from_labels(comps)  # consumable as PoP labels


# ---------------------------------------------------------------------------------------------------------------------
# PopEstimator with judge labels


def estimator(**kw: Any) -> PopEstimator:
    args = dict(target="ema", strategy="iterative", k=1, label_noise=0.0, m_min=0.0, m_max=10.0, seed=3)
    return PopEstimator(**{**args, **kw})


@pytest.mark.parametrize("target", ["ema", "bt"])
def test_estimator_with_a_judge_that_agrees_with_the_gaps_reproduces_gap_labels(target):
    by_gap, gap_stats = estimator(target=target).training_items(GAPS, round_index=2)
    by_judge, stats = estimator(target=target, labels="judge", judge=GapOracleJudge()).training_items(
        GAPS, round_index=2, pairs=PAIRS
    )
    assert stats["tuples"] >= 1
    np.testing.assert_array_equal(by_judge.strong, by_gap.strong)
    np.testing.assert_array_equal(by_judge.weak, by_gap.weak)
    np.testing.assert_allclose(by_judge.margin, by_gap.margin)  # NaN where the learner computes it (ema)
    assert stats["tuples"] == gap_stats["tuples"] and stats["uncompared"] == gap_stats["uncompared"]
    assert stats["judge_labelled"] == stats["judge_agree_with_gap"] == stats["tuples"] and stats["judge_no_label"] == 0


def test_estimator_refuses_judge_labels_without_a_judge_texts_or_with_label_noise():
    with pytest.raises(ValueError, match="needs a judge"):
        estimator(labels="judge")
    with pytest.raises(ValueError, match="label_noise"):
        estimator(labels="judge", judge=GapOracleJudge(), label_noise=0.1)
    with pytest.raises(ValueError, match="6 gaps but none pairs"):
        estimator(labels="judge", judge=GapOracleJudge()).training_items(GAPS, 0)
    with pytest.raises(ValueError, match="unknown PoP label source"):
        estimator(labels="model")


def test_estimator_from_config_builds_the_tiny_pop_judge_and_labels_a_round(judge_model_dir, tmp_path):
    overrides = [
        "pop.labels=judge",
        f"pop.judge_path={judge_model_dir}",
        "pop.judge_backend=hf",
        f"pop.judge_template='{POP_TEMPLATE}'",
        "pop.judge_choices=[33,32]",
        "pop.judge_max_new_tokens=2",
        "pop.target=bt",
        "pop.k=2",
    ]
    cfg = load_config(None, overrides)
    kwargs = PopEstimator.kwargs_from_config(cfg.pop, seed=0)
    assert kwargs["labels"] == "judge" and kwargs["judge"]["path"] == judge_model_dir
    est = PopEstimator(**kwargs)
    assert isinstance(est.judge, PopJudge) and est.judge.choices == ("33", "32")
    items, stats = est.training_items(GAPS, 0, pairs=PAIRS)
    assert stats["judge_labelled"] >= 1, f"nothing labelled: {est.judge.last_outputs}"
    candidates, _ = sample_pop_tuples(GAPS, strategy="iterative", k=2, rng=np.random.default_rng([0, 13, 0]))
    assert stats["judge_candidates"] == len(candidates) and stats["tuples"] == stats["judge_labelled"]
    assert stats["judge_no_label"] == est.judge.last_stats["unparseable"] + est.judge.last_stats["too_long"]
    assert len(items) == stats["tuples"] + stats["uncompared"]
    proposed = {frozenset((t.strong, t.weak)) for t in candidates}
    labelled = items.weak != -1  # the rest are pairs no verdict compared: they train against the floor
    assert int(labelled.sum()) == stats["tuples"]
    assert all(frozenset((int(s), int(w))) in proposed for s, w in zip(items.strong[labelled], items.weak[labelled]))
    assert ((items.margin >= 0.0) & (items.margin <= 10.0)).all()
    est.judge.close()


def test_config_refuses_judge_labels_without_model_with_noise_or_equal_choices():
    with pytest.raises(ConfigError, match="pop.judge_path"):
        load_config(None, ["pop.labels=judge"])
    with pytest.raises(ConfigError, match="label_noise"):
        load_config(None, ["pop.labels=judge", "pop.judge_path=m", "pop.label_noise=0.2"])
    with pytest.raises(ConfigError, match="judge_choices"):
        load_config(None, ["pop.labels=judge", "pop.judge_path=m", "pop.judge_choices=[A,A]"])
    with pytest.raises(ConfigError, match="judge_template"):
        load_config(None, ["pop.labels=judge", "pop.judge_path=m", "pop.judge_template='{chosen_a} only'"])
    assert load_config(None, ["pop.labels=judge", "pop.judge_path=m"]).pop.judge_choices == ["A", "B"]
