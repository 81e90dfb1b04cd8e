import math
from pathlib import Path

import numpy as np
import pytest

from omni_ray.config import ScorerSpec, ScoringConfig
from omni_ray.scoring import (
    SCORER_TYPES,
    ArithVerifier,
    CorrectAtScorer,
    MathVerifier,
    RewardModelScorer,
    Scorer,
    ScoreResult,
    ScoringService,
    WeightedScorer,
    build_scorer,
    check_range,
    extract_final_answer,
    math_answers_match,
    rescale_per_round,
    rescale_scores,
)
from tests import scorers_for_tests


class FixedScorer(Scorer):
    """Returns preset scores (optionally with correctness), to test combination and service logic."""

    def __init__(self, scores, scale, correct=None, name="fixed"):
        self._scores = np.asarray(scores, dtype=float)
        self._correct = correct
        self.scale = scale
        self.name = name

    def score(self, prompts, responses):
        return ScoreResult(scores=self._scores.copy(), correct=self._correct, scale=self.scale)


PROMPTS = ["1+2=", "10+5=", "7+7="]
RESPONSES = ["3", "25", "x"]


# ---------------------------------------------------------------------------------------------------------------------
# verifier


def test_verifier_exact_off_by_ten_and_unparseable():
    res = ArithVerifier().score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(res.scores, [10.0, 10.0 * math.exp(-1.0), 0.0])
    assert res.correct.tolist() == [True, False, False]
    assert res.scale == (0.0, 10.0) and ArithVerifier().scale == (0.0, 10.0)


def test_verifier_refuses_prompt_without_ground_truth():
    with pytest.raises(ValueError, match="prompt 1"):
        ArithVerifier().score(["1+2=", "hello"], ["3", "4"])


def test_misaligned_prompts_and_responses_raise():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        ScoringService([ScorerSpec()]).score(["1+2=", "2+2="], ["3"])


# ---------------------------------------------------------------------------------------------------------------------
# weighted combination and build_scorer


def test_weighted_maps_each_declared_scale_to_target_then_averages():
    a = FixedScorer([0.0, 0.5, 1.0], (0.0, 1.0), name="a")  # -> 0, 5, 10 on 0-10
    b = FixedScorer([5.0, 0.0, -5.0], (-5.0, 5.0), correct=[True, False, True], name="b")  # -> 10, 5, 0
    w = WeightedScorer([a, b], [3.0, 1.0], target=(0.0, 10.0))
    res = w.score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(res.scores, [2.5, 5.0, 7.5])
    assert w.scale == (0.0, 10.0) and res.scale == (0.0, 10.0)
    assert res.correct.tolist() == [True, False, True]  # the first member that reports correctness
    assert "a*3" in w.name and "b*1" in w.name


def test_weighted_propagates_nan_and_rejects_bad_weights():
    a = FixedScorer([1.0, np.nan, 3.0], (0.0, 10.0))
    res = WeightedScorer([a, ArithVerifier()], [1.0, 1.0]).score(PROMPTS, RESPONSES)
    assert np.isnan(res.scores[1]) and np.isfinite(res.scores[[0, 2]]).all()
    assert res.correct.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="weights"):
        WeightedScorer([a], [0.0])
    with pytest.raises(ValueError, match="1 scorers but 2 weights"):
        WeightedScorer([a], [1.0, 1.0])


def test_build_scorer_single_several_and_wrong_verifier_scale():
    assert isinstance(build_scorer([ScorerSpec()]), ArithVerifier)
    both = build_scorer([ScorerSpec(weight=1.0), {"type": "arith_verifier", "weight": 3.0}])
    assert isinstance(both, WeightedScorer) and both.scale == (0.0, 10.0)
    np.testing.assert_allclose(both.score(PROMPTS, RESPONSES).scores, ArithVerifier().score(PROMPTS, RESPONSES).scores)
    with pytest.raises(ValueError, match=r"scorers\[0\].*arith_verifier"):
        build_scorer([ScorerSpec(scale_low=0.0, scale_high=1.0)])
    with pytest.raises(ValueError, match="empty"):
        build_scorer([])


# ---------------------------------------------------------------------------------------------------------------------
# reward model on a tiny offline Llama


def _save_reward_model(
    out: Path, *, vocab_size: int | None = None, num_labels: int = 1, causal: bool = False, pad: bool = True
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from omni_ray.models.tiny import build_tokenizer

    tok = build_tokenizer()  # saved with left padding: the scorer must pad right regardless
    if not pad:
        tok.pad_token = None
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = (LlamaForCausalLM if causal else LlamaForSequenceClassification)(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matmuls are 10x slower with several OpenMP threads on a busy 2-core machine; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    return _save_reward_model(tmp_path_factory.mktemp("rm"))


def test_reward_model_scores_are_finite_aligned_and_deterministic(rm_dir):
    prompts = ["1+2=", "10+5=", "7+7=", "99+99=", "3+4="]
    responses = ["3", "25", "14", "198", ""]
    rm = RewardModelScorer(rm_dir, batch_size=2, scale=(-1.0, 1.0))
    a = rm.score(prompts, responses)
    assert a.scores.shape == (5,) and np.isfinite(a.scores).all() and a.correct is None
    assert rm.scale == (-1.0, 1.0) and rm.tokenizer.padding_side == "right"
    np.testing.assert_array_equal(a.scores, rm.score(prompts, responses).scores)
    # Padding and batching do not change a score: each sequence alone gives the same value, order is kept.
    alone = RewardModelScorer(rm_dir, batch_size=1)
    np.testing.assert_allclose(alone.score(prompts, responses).scores, a.scores, atol=1e-5)
    np.testing.assert_allclose(rm.score(prompts[::-1], responses[::-1]).scores, a.scores[::-1], atol=1e-5)
    assert len(a.scores) == len(set(np.round(a.scores, 6)))  # different texts, different scores


def test_reward_model_through_service_and_weighted_with_verifier(rm_dir):
    specs = [
        ScorerSpec(type="arith_verifier", weight=1.0),
        ScorerSpec(type="reward_model", weight=1.0, path=str(rm_dir), scale_low=-1.0, scale_high=1.0),
    ]
    svc = ScoringService(specs, "declared", 0.0, 1.0)
    res = svc.score(PROMPTS, RESPONSES)
    assert isinstance(svc.scorer, WeightedScorer) and res.scale == (0.0, 1.0) and res.raw_scale == (0.0, 10.0)
    assert np.isfinite(res.scores).all() and res.correct.tolist() == [True, False, False]


def test_reward_model_dir_without_tokenizer_raises_naming_dir(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=18,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=0,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm_no_tok")
    with pytest.raises(ValueError, match="rm_no_tok.*no tokenizer"):
        RewardModelScorer(tmp_path / "rm_no_tok")
    with pytest.raises(ValueError, match="missing_dir"):
        RewardModelScorer(tmp_path / "missing_dir")


def test_reward_model_tokenizer_larger_than_model_vocab_raises(tmp_path):
    d = _save_reward_model(tmp_path / "small_vocab", vocab_size=10)  # tokenizer has 18 ids
    with pytest.raises(ValueError, match=r"small_vocab.*mismatch.*18 tokens.*vocab_size=10"):
        RewardModelScorer(d)


def test_reward_model_must_be_one_label_sequence_classifier(tmp_path):
    with pytest.raises(ValueError, match="causal.*not a sequence-classification"):
        RewardModelScorer(_save_reward_model(tmp_path / "causal", causal=True))
    with pytest.raises(ValueError, match="two_labels.*num_labels=2"):
        RewardModelScorer(_save_reward_model(tmp_path / "two_labels", num_labels=2))


def test_reward_model_without_pad_token_pads_with_eos(tmp_path):
    rm = RewardModelScorer(_save_reward_model(tmp_path / "nopad", pad=False), batch_size=3)
    eos = rm.tokenizer.eos_token_id
    assert rm.tokenizer.pad_token_id == eos and rm.model.config.pad_token_id == eos
    batched = rm.score(PROMPTS, RESPONSES).scores
    alone = RewardModelScorer(tmp_path / "nopad", batch_size=1).score(PROMPTS, RESPONSES).scores
    np.testing.assert_allclose(batched, alone, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# the service: counts, non-finite accounting, rescale modes


def test_service_wrong_count_raises_with_counts():
    svc = ScoringService(FixedScorer([1.0, 2.0], (0.0, 10.0), name="short"))
    with pytest.raises(ValueError, match=r"'short'.*\(2,\) for 3 responses.*exactly 3"):
        svc.score(PROMPTS, RESPONSES)
    svc = ScoringService(FixedScorer([1.0, 2.0, 3.0], (0.0, 10.0), correct=[True]))
    with pytest.raises(ValueError, match="1 correctness flags for 3"):
        svc.score(PROMPTS, RESPONSES)


def test_service_passes_nan_and_inf_through_and_counts_them():
    svc = ScoringService(FixedScorer([np.nan, 5.0, np.inf], (0.0, 10.0)), "declared", 0.0, 1.0)
    res = svc.score(PROMPTS, RESPONSES)
    assert res.nonfinite == 2
    assert np.isnan(res.scores[0]) and res.scores[1] == pytest.approx(0.5) and np.isposinf(res.scores[2])
    assert np.isnan(res.raw_scores[0]) and res.raw_scores[1] == 5.0 and np.isposinf(res.raw_scores[2])


def test_service_per_round_maps_min_to_low_and_max_to_high():
    raw = [3.0, -2.0, 8.0, np.nan, 0.5]
    svc = ScoringService(FixedScorer(raw, (-100.0, 100.0)), "per_round", 1.0, 5.0)
    res = svc.score(["1+1="] * 5, ["2"] * 5)
    np.testing.assert_allclose(res.scores[[1, 2, 0]], [1.0, 5.0, 1.0 + 4.0 * 5.0 / 10.0])
    assert np.isnan(res.scores[3]) and res.nonfinite == 1 and res.scale == (1.0, 5.0)
    np.testing.assert_array_equal(res.raw_scores[[0, 1, 2, 4]], [3.0, -2.0, 8.0, 0.5])


def test_service_declared_and_none_modes_keep_raw_scores():
    declared = ScoringService([ScorerSpec()], "declared", 0.0, 1.0).score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(declared.scores, [1.0, math.exp(-1.0), 0.0])
    np.testing.assert_allclose(declared.raw_scores, [10.0, 10.0 * math.exp(-1.0), 0.0])
    assert declared.scale == (0.0, 1.0) and declared.raw_scale == (0.0, 10.0) and declared.busy_s >= 0.0
    none = ScoringService(FixedScorer([-3.0, 0.0, 3.0], (-5.0, 5.0)), "none", 0.0, 1.0)
    res = none.score(PROMPTS, RESPONSES)
    np.testing.assert_array_equal(res.scores, res.raw_scores)
    assert res.scale == (-5.0, 5.0) and none.scale == (-5.0, 5.0) and res.correct is None
    with pytest.raises(ValueError, match="unknown rescale"):
        ScoringService([ScorerSpec()], "zscore")


def test_service_from_config_defaults():
    svc = ScoringService.from_config(ScoringConfig())
    assert isinstance(svc.scorer, ArithVerifier)
    assert svc.declared_scale == (0.0, 10.0) and svc.rescale == "declared" and svc.scale == (0.0, 10.0)
    res = svc.score(PROMPTS, RESPONSES)
    assert res.correct.tolist() == [True, False, False]


def test_python_scorer_function_is_loaded_by_name_with_its_declared_scale():
    svc = ScoringService(
        [ScorerSpec(type="python", target="tests.scorers_for_tests:length_score", scale_low=0, scale_high=5)],
        rescale="declared",
    )
    res = svc.score(["1+1="], ["22"])
    assert res.raw_scores.tolist() == [2.0] and res.scores.tolist() == [4.0]


def test_python_scorer_that_cannot_be_imported_names_the_target():
    with pytest.raises(ValueError, match="no_such_module:fn"):
        ScoringService([ScorerSpec(type="python", target="no_such_module:fn")])


# ---------------------------------------------------------------------------------------------------------------------
# math verifier: final answer vs reference answer


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("So x = 3 and \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # braces nested inside the box
        ("First \\boxed{4}, no: \\boxed{\\boxed{5}}", "5"),  # the last box wins, boxes inside boxes too
        ("\\boxed{7} and then \\boxed{unclosed", "7"),  # a box cut off by max_new_tokens is not an answer
        ("It is 3 + 4. The answer is: 1,234.", "1234"),  # math-verify's text: no thousands commas
        ("The final answer is $\\dfrac{3}{4}$.", "\\frac{3}{4}"),  # ... and \dfrac written \frac
        ("48/2 = 24 and 24 + 48 = 72\n#### 72", "72"),
        ("I got 3, then 4.5 in the end", "4.5"),  # no marked answer: the last number
        ("I do not know", None),
    ],
)
def test_final_answer_is_the_last_box_else_the_stated_answer_else_the_last_number(response, answer):
    assert extract_final_answer(response) == answer


@pytest.mark.parametrize(
    ("predicted", "reference", "same"),
    [
        ("72", "72.0", True),
        ("1,234", "1234", True),
        ("\\$5", "5", True),
        ("3/4", "\\frac{3}{4}", True),
        ("0.5", "\\dfrac{1}{2}", True),
        ("-\\frac{6}{4}", "-1.5", True),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),  # symbolic: math-verify
        ("\\text{Monday}", "monday", True),  # normalised strings
        ("72", "73", False),
        ("1/3", "0.33", False),
        ("1/0", "1", False),
    ],
)
def test_math_answers_match_numbers_fractions_and_expressions(predicted, reference, same):
    assert math_answers_match(predicted, reference) is same


def test_math_verifier_scores_ten_for_the_right_answer_and_zero_otherwise():
    responses = [
        "Adding: \\boxed{72}",  # boxed
        "\\boxed{\\frac{1}{2}}",  # nested braces, fraction vs a decimal reference
        "The answer is 3/4.",  # fraction vs \dfrac
        "\\boxed{71}",  # wrong
        "I cannot solve this.",  # no answer
    ]
    references = ["Natalia sold 48 + 24 = 72 clips.\n#### 72", "0.5", "\\dfrac{3}{4}", "72", "72"]
    res = MathVerifier().score(["q"] * 5, responses, references)
    assert res.scores.tolist() == [10.0, 10.0, 10.0, 0.0, 0.0]
    assert res.correct.tolist() == [True, True, True, False, False] and res.scale == (0.0, 10.0)


def test_math_verifier_without_references_names_the_scorer_and_the_item():
    with pytest.raises(ValueError, match=r"math_verifier: no reference answers given \(items 0\.\.1"):
        MathVerifier().score(["q", "q"], ["1", "2"])
    with pytest.raises(ValueError, match="math_verifier: item 1 has no reference answer"):
        MathVerifier().score(["q", "q"], ["1", "2"], ["1", None])
    with pytest.raises(ValueError, match=r"math_verifier: no reference answers given \(items 0\.\.0"):
        ScoringService([ScorerSpec(type="math_verifier")]).score(["q"], ["1"])


def test_service_hands_references_only_to_scorers_that_need_them():
    fixed = FixedScorer([1.0, 2.0, 3.0], (0.0, 10.0), name="fixed")  # a two-argument score(): unchanged
    svc = ScoringService(fixed, "none")
    assert not svc.needs_references
    np.testing.assert_array_equal(svc.score(PROMPTS, RESPONSES, ["a", "b", "c"]).scores, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="2 references but 3 responses"):
        svc.score(PROMPTS, RESPONSES, ["a", "b"])


def test_weighted_scorer_passes_references_through_to_the_verifier():
    w = build_scorer([{"type": "math_verifier", "weight": 1.0}, {"type": "arith_verifier", "weight": 1.0}])
    assert isinstance(w, WeightedScorer) and w.needs_references
    svc = ScoringService(w, "none")
    assert svc.needs_references
    res = svc.score(PROMPTS, ["3", "15", "x"], ["3", "16", "14"])  # the second reference disagrees with arith
    np.testing.assert_allclose(res.scores, [10.0, 5.0, 0.0])
    assert res.correct.tolist() == [True, False, False]  # the first member's check: math_verifier
    with pytest.raises(ValueError, match="math_verifier: no reference answers"):
        svc.score(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match=r"scorers\[0\].*math_verifier"):
        build_scorer([ScorerSpec(type="math_verifier", scale_high=1.0)])


def test_gsm8k_marker_wins_over_a_later_number_in_response_and_reference():
    # math-verify alone would read the last number (5); "#### X" marks the final answer.
    assert extract_final_answer("48 + 24 = 72\n#### 72\nCheck: 5 boxes") == "72"
    res = MathVerifier().score(["q", "q"], ["#### 72\n(5 steps)", "72"], ["So 72.\n#### 72\n", "x = 2\\sqrt{3}"])
    assert res.correct.tolist() == [True, False]


def test_math_verifier_reads_a_bare_latex_reference_as_a_whole_not_its_last_number():
    res = MathVerifier().score(["q"] * 3, ["\\boxed{2\\sqrt{3}}", "\\boxed{3}", "\\boxed{(1, 2)}"],
                               ["2\\sqrt{3}", "2\\sqrt{3}", "(1,2)"])  # fmt: skip
    assert res.correct.tolist() == [True, False, True]


# ---------------------------------------------------------------------------------------------------------------------
# scales and the range check (one check for every (low, high) pair)


def test_rescale_maps_declared_scale_to_zero_ten():
    out = rescale_scores(np.array([0.0, 0.5, 1.0, np.nan]), scale=(0.0, 1.0))
    assert out[:3].tolist() == [0.0, 5.0, 10.0] and math.isnan(out[3])
    assert rescale_scores([1.0, 10.0], scale=(1.0, 10.0), target=(0.0, 1.0)).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="scale"):
        rescale_scores([1.0], scale=(1.0, 1.0))


def test_rescale_from_a_scale_that_does_not_start_at_zero():
    # (-5, 5) -> (0, 10): x + 5 (by hand); out of scale is not clipped.
    out = rescale_scores([-5.0, -2.5, 0.0, 4.0, 7.0], scale=(-5.0, 5.0))
    np.testing.assert_allclose(out, [0.0, 2.5, 5.0, 9.0, 12.0])
    # (-5, 5) -> (1, 2): 1 + (x + 5) / 10.
    np.testing.assert_allclose(rescale_scores([-5.0, 0.0, 3.0], scale=(-5.0, 5.0), target=(1.0, 2.0)), [1.0, 1.5, 1.8])


def test_rescale_per_round_min_max_and_constant_midpoint():
    out = rescale_per_round(np.array([-3.0, 1.0, 5.0, np.inf]))
    assert out[:3].tolist() == [0.0, 5.0, 10.0] and out[3] == np.inf
    assert rescale_per_round([2.0, 2.0]).tolist() == [5.0, 5.0]


@pytest.mark.parametrize("bad", [(1.0, 1.0), (2.0, 1.0), (0.0, math.inf), (math.nan, 1.0), (1.0,), "ab", None])
def test_check_range_refuses_anything_but_a_finite_increasing_pair_naming_it(bad):
    with pytest.raises(ValueError, match="my range"):
        check_range("my range", bad)


def test_check_range_returns_floats():
    assert check_range("r", (-5, 5)) == (-5.0, 5.0) and isinstance(check_range("r", [0, 1])[0], float)


# ---------------------------------------------------------------------------------------------------------------------
# the registry of scorer types


def test_every_config_scorer_type_is_registered():
    assert SCORER_TYPES == ("arith_verifier", "http", "judge", "math_verifier", "python", "reward_model")


def test_unknown_scorer_type_is_an_error_listing_the_registered_ones():
    with pytest.raises(ValueError, match=r"scorers\[1\]\.type: unknown scorer type 'rm'; registered: arith_verifier, "):
        build_scorer([ScorerSpec(), {"type": "rm"}])


def test_importing_the_scoring_package_loads_no_heavy_library():
    import subprocess
    import sys

    code = (
        "import sys, omni_ray.scoring; "
        "print(sorted(m for m in ('torch', 'transformers', 'urllib3', 'vllm', 'requests') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------------
# scorers see the prompt's row: references and data.extra_columns

ROW_PROMPTS = ["p0", "p1", "p2", "p3", "p4"]
ROW_RESPONSES = ["a", "b", "c", "d", "e"]
ROW_REFERENCES = ["a", "x", "c", "y", "e"]  # items 0, 2, 4 are answered right
LEVELS = [7, 3, 9, 1, 4]  # distinct per item: a shuffle would show


def python_service(target: str, **spec: object) -> ScoringService:
    return ScoringService([ScorerSpec(type="python", target=f"tests.scorers_for_tests:{target}", **spec)], "none")


def test_python_scorer_gets_references_and_extra_columns_in_item_order():
    svc = python_service("level_and_match")
    res = svc.score(ROW_PROMPTS, ROW_RESPONSES, ROW_REFERENCES, {"level": LEVELS, "topic": list("vwxyz")})
    assert res.raw_scores.tolist() == [7.0, 3.0, 9.0, 1.0, 4.0]  # "topic" is not declared, so not passed
    assert res.correct.tolist() == [True, False, True, False, True]  # the tuple return's flags


def test_python_scorer_returning_a_mapping_and_declaring_no_references():
    res = python_service("level_as_mapping").score(ROW_PROMPTS, ROW_RESPONSES, ROW_REFERENCES, {"level": LEVELS})
    assert res.raw_scores.tolist() == [7.0, 3.0, 9.0, 1.0, 4.0] and res.correct is None


def test_python_scorer_taking_kwargs_gets_every_column_and_the_references():
    scorers_for_tests.RECEIVED.clear()
    python_service("record_kwargs").score(ROW_PROMPTS, ROW_RESPONSES, ROW_REFERENCES, {"level": LEVELS, "t": "vwxyz"})
    assert scorers_for_tests.RECEIVED == [{"references": ROW_REFERENCES, "level": LEVELS, "t": list("vwxyz")}]
    python_service("record_kwargs").score(ROW_PROMPTS, ROW_RESPONSES)
    assert scorers_for_tests.RECEIVED[-1] == {}


def test_python_scorer_class_gets_what_its_score_declares():
    svc = python_service("ReferenceLength")
    res = svc.score(["q"] * 3, ["3", "1", "5"], ["abc", "xy", "hello"], {"level": [1, 2, 3]})
    assert res.raw_scores.tolist() == [3.0, 2.0, 5.0] and res.correct.tolist() == [True, False, True]


def test_row_data_of_the_wrong_length_or_a_reserved_name_is_an_error_naming_the_column():
    svc = python_service("level_and_match")
    with pytest.raises(ValueError, match="extra column 'level' has 4 values for 5 responses"):
        svc.score(ROW_PROMPTS, ROW_RESPONSES, ROW_REFERENCES, {"level": LEVELS[:4]})
    with pytest.raises(ValueError, match="4 references but 5 responses"):
        svc.score(ROW_PROMPTS, ROW_RESPONSES, ROW_REFERENCES[:4], {"level": LEVELS})
    with pytest.raises(ValueError, match="extra column 'responses' cannot be handed to scorers"):
        svc.score(ROW_PROMPTS, ROW_RESPONSES, ROW_REFERENCES, {"responses": LEVELS})


def test_a_scorer_reading_a_column_the_prompts_do_not_carry_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"level_and_match' needs 'level', which .* has \['references'\]"):
        python_service("level_and_match").score(ROW_PROMPTS, ROW_RESPONSES, ROW_REFERENCES)
    with pytest.raises(ValueError, match=r"'reference_length' needs 'references'.*data.answer_column"):
        python_service("ReferenceLength").score(["q"], ["3"])


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("one_flag_too_few", "returned 2 correctness flags for 3 responses"),
        ("flags_that_are_not_bools", r"correct\[1\] is None; expected True or False"),
        ("mapping_with_a_typo", r"keys \['corect', 'scores'\]; expected 'scores' and optionally 'correct'"),
    ],
)
def test_python_scorer_with_wrong_correct_flags_is_a_clear_error(target, message):
    with pytest.raises(ValueError, match=message):
        python_service(target).score(["q"] * 3, ["a", "b", "c"])


# ---------------------------------------------------------------------------------------------------------------------
# correct_at: an answer check for any scorer


def test_correct_at_counts_scores_at_or_above_it_as_correct_and_nan_as_wrong():
    svc = python_service("length_score", scale_low=0, scale_high=5, correct_at=2.0)
    assert isinstance(svc.scorer, CorrectAtScorer)
    res = svc.score(["q"] * 4, ["1", "22", "333", ""])
    assert res.correct.tolist() == [False, True, True, False]
    nan = python_service("nan_or_constant", correct_at=5.0).score(["q"] * 2, ["1", "2"])
    assert nan.correct.tolist() == [False, True]


def test_correct_at_replaces_the_flags_a_scorer_returned():
    own = ScoringService([ScorerSpec()]).score(PROMPTS, RESPONSES).correct  # scores 10, 3.68, 0
    assert own.tolist() == [True, False, False]
    replaced = ScoringService([ScorerSpec(correct_at=3.0)]).score(PROMPTS, RESPONSES).correct
    assert replaced.tolist() == [True, True, False]
    tuple_flags = python_service("level_and_match", correct_at=5.0)  # levels >= 5 win over response == reference
    res = tuple_flags.score(ROW_PROMPTS, ROW_RESPONSES, ROW_REFERENCES, {"level": LEVELS})
    assert res.correct.tolist() == [True, False, True, False, False]


def test_weighted_scorer_takes_flags_from_the_first_member_that_yields_them():
    specs = [
        ScorerSpec(type="python", target="tests.scorers_for_tests:length_score", scale_low=0, scale_high=5),
        ScorerSpec(type="python", target="tests.scorers_for_tests:length_score", scale_high=5, correct_at=3.0),
    ]
    res = ScoringService(specs, "none").score(["q"] * 3, ["1", "333", "4444"])
    assert res.correct.tolist() == [False, True, True]
    np.testing.assert_allclose(res.raw_scores, [2.0, 6.0, 8.0])  # both map len/5 to 0-10, weights equal
