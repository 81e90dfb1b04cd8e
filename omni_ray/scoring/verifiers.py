"""Rule verifiers: answers checked against ground truth, on the fixed 0-10 scale (docs/methods.md sec. 2 and 5).

- :class:`ArithVerifier` (type ``arith_verifier``): the built-in task's verifier, ground truth recomputed from the
  prompt text.
- :class:`MathVerifier` (type ``math_verifier``): a response's final answer against the prompt's reference answer
  (``data.answer_column``), through HF math-verify: answer extraction (``\\boxed{}``, "the answer is X", the last
  number, ...) and the comparison (exact numbers, fractions vs decimals, LaTeX expressions, sets, intervals).

math-verify has no anchor for GSM8K's ``#### X`` marker; :func:`gsm8k_answer` is the one step before it (the
text after the last marker), as math-verify's own GSM8K task does it.

math-verify's time limits use SIGALRM, which only works in the main thread (where a Ray actor runs its calls);
elsewhere they are off rather than making every parse fail.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from omni_ray.data.arith import SCORE_SCALE, answer_of, is_correct, quality
from omni_ray.scoring.base import Scorer, ScoreResult, check_inputs, register_scorer

__all__ = ["ArithVerifier", "MathVerifier", "extract_final_answer", "gsm8k_answer", "math_answers_match"]

_GSM8K_MARK = "####"
_TIME_LIMIT_S = 5


class ArithVerifier(Scorer):
    """The built-in task's verifier: ground truth recomputed from the prompt text, never trusted from elsewhere.

    ``scores`` = partial-credit quality 10 * exp(-|pred - true| / 10) (0 if unparseable), so quality can differ from
    correctness and Omni-DPO's quality weight has something to see; ``correct`` = exact answer match.
    """

    name = "arith_verifier"
    scale = SCORE_SCALE

    def score(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        """Quality and exactness per response; a prompt that is not an arith problem raises ValueError."""
        check_inputs(prompts, responses)
        scores = np.empty(len(responses), dtype=np.float64)
        correct = np.empty(len(responses), dtype=bool)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            try:
                answer = answer_of(p)
            except ValueError as e:
                raise ValueError(f"{self.name}: prompt {i} has no ground truth: {e}") from None
            scores[i] = quality(r, answer)
            correct[i] = is_correct(r, answer)
        return ScoreResult(scores=scores, correct=correct, scale=self.scale)


# ---------------------------------------------------------------------------------------------------------------------
# math-verify


def _time_limit() -> int | None:
    return _TIME_LIMIT_S if threading.current_thread() is threading.main_thread() else None


def gsm8k_answer(text: str) -> str | None:
    """The answer after GSM8K's last ``#### `` marker (its first line), None when the text has no marked answer."""
    _, mark, tail = text.rpartition(_GSM8K_MARK)
    lines = tail.strip().splitlines()
    return lines[0].strip() if mark and lines else None


def _parse(text: str, configs: Sequence[Any] | None = None) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if configs is None:  # a response: a boxed answer first, then math-verify's "final answer" / "answer" anchors
        configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(text, extraction_config=configs, parsing_timeout=_time_limit())


def _parse_answer(answer: str) -> list[Any]:
    """A bare answer (``\\frac{1}{2}``, ``1,234``, ``\\text{Monday}``) parsed as the math it is."""
    return _parse(f"${answer}$")


def _parse_response(response: str) -> list[Any]:
    marked = gsm8k_answer(response)
    return _parse_answer(marked) if marked is not None else _parse(response)


def _parse_reference(reference: str) -> list[Any]:
    """A worked solution's marked answer (``#### X``, ``\\boxed{}``, "the answer is"), else the reference as a bare
    answer: no last-number guess, since a bare ``2\\sqrt{3}`` is the answer itself and not a text ending in 3."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    marked = gsm8k_answer(reference)
    if marked is not None:
        return _parse_answer(marked)
    anchored = [
        LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=0),
        ExprExtractionConfig(try_extract_without_anchor=False),
    ]
    return _parse(reference, anchored) or _parse_answer(reference)


def _verify(gold: list[Any], predicted: list[Any]) -> bool:
    from math_verify import verify

    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=_time_limit()))


def extract_final_answer(response: str) -> str | None:
    """A response's final answer as math-verify extracts it (the last ``\\boxed{}``, else the stated answer, else the
    last number; GSM8K's ``#### X``), in its normalised text (``\\dfrac`` -> ``\\frac``, no thousands commas)."""
    texts = [p for p in _parse_response(response) if isinstance(p, str)]
    return texts[0] if texts else None


def math_answers_match(predicted: str, reference: str) -> bool:
    """Whether two bare final answers are the same math (numbers, fractions, decimals, expressions, strings)."""
    return _verify(_parse_answer(reference), _parse_answer(predicted))


class MathVerifier(Scorer):
    """A response's final answer checked against the prompt's reference answer with math-verify.

    ``scores`` = 10 when it matches, else 0, also when the response states no answer; ``correct`` = the same check.
    The reference may be a bare answer or a worked solution whose marked answer (``\\boxed{}``, ``#### X``) is used.
    Every item needs one: a missing reference raises rather than scoring 0, which would teach the policy that a
    right answer is wrong.
    """

    name = "math_verifier"
    scale = SCORE_SCALE
    needs_references = True

    def score(
        self, prompts: list[str], responses: list[str], references: Sequence[str | None] | None = None
    ) -> ScoreResult:
        """10 / 0 per response; ValueError naming the item when its reference is missing or holds no answer."""
        check_inputs(prompts, responses)
        n = len(responses)
        if references is None:
            raise ValueError(
                f"{self.name}: no reference answers given (items 0..{n - 1} have none); it needs the prompt "
                "dataset's answer column (data.answer_column)"
            )
        if len(references) != n:
            raise ValueError(f"{self.name}: {len(references)} references for {n} responses")
        correct = np.zeros(n, dtype=bool)
        for i, (response, reference) in enumerate(zip(responses, references, strict=True)):
            if reference is None or not str(reference).strip():
                raise ValueError(f"{self.name}: item {i} has no reference answer (data.answer_column)")
            gold = _parse_reference(str(reference))
            if not gold:
                raise ValueError(f"{self.name}: item {i}: no answer could be read from its reference {reference!r}")
            correct[i] = _verify(gold, _parse_response(response))
        return ScoreResult(scores=np.where(correct, SCORE_SCALE[1], SCORE_SCALE[0]), correct=correct, scale=self.scale)


def _verifier_scale(spec: Any, scale: tuple[float, float], where: str) -> None:
    """A verifier spec must keep the verifier's own scale (0-10): declaring another one would make every rescale
    downstream wrong, so it is refused rather than silently ignored."""
    if scale != tuple(float(v) for v in SCORE_SCALE):
        raise ValueError(
            f"{where}: {spec.type} scores on {SCORE_SCALE}, but scale_low/scale_high declare {scale}; leave them at "
            f"{SCORE_SCALE[0]:g}/{SCORE_SCALE[1]:g}"
        )


@register_scorer("arith_verifier")
def _arith_verifier(spec: Any, *, scale: tuple[float, float], where: str, **_: Any) -> ArithVerifier:
    _verifier_scale(spec, scale, where)
    return ArithVerifier()


@register_scorer("math_verifier")
def _math_verifier(spec: Any, *, scale: tuple[float, float], where: str, **_: Any) -> MathVerifier:
    _verifier_scale(spec, scale, where)
    return MathVerifier()
