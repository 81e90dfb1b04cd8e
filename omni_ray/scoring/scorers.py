"""Scorers: (prompt, response) -> score on a declared scale (step 2 of an online round, docs/methods.md sec. 2 and 4).

Plain classes, no Ray: the driver wraps a :class:`ScoringService` in ``ray.remote``; tests call everything directly.

Why every scorer declares a ``scale``: Omni-DPO's ``eta`` (quality weight) and ``tau_good`` (calibrated NLL gate)
and the ``math`` pair rule's ``good_threshold`` only mean something on a known range. A scorer states the range its
scores live on; :class:`ScoringService` keeps the raw scores (pairs are built and filtered on what the scorer said,
the peers' "filtered on a shaped reward" bug) and maps them to the configured range for the loss.

- :class:`ArithVerifier`: the built-in task's rule verifier (exact answer check + partial-credit quality, 0-10).
- :class:`MathVerifier`: final answer of a response vs the prompt's reference answer (10 or 0); it sets
  ``needs_references``, so :class:`ScoringService` hands it the references (``Prompt.reference``).
- :class:`RewardModelScorer`: an HF sequence-classification reward model (one logit) over ``prompt + response``.
- :class:`WeightedScorer`: a weighted mean of several scorers, each first mapped from its own scale to a common one.
- ``HttpScorer`` (remote.py): a remote reward endpoint, JSON over HTTP with timeout, retries and backoff.
- ``JudgeScorer`` (judge.py): an LLM rating responses through a rollout engine; unreadable ratings are NaN, counted.

Non-finite scores (a reward model overflowing, a custom scorer returning NaN) are passed through, not hidden:
``build_pairs`` drops and counts those samples, and :class:`ScoringService` counts them per call (``nonfinite``).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from omni_ray.config import ScorerSpec, ScoringConfig
from omni_ray.data.arith import SCORE_SCALE, answer_of, is_correct, quality
from omni_ray.pairs import rescale_per_round, rescale_scores
from omni_ray.tracking import BusyClock

__all__ = [
    "RESCALE_MODES",
    "ArithVerifier",
    "MathVerifier",
    "RewardModelScorer",
    "ScoreResult",
    "Scorer",
    "ScoringService",
    "WeightedScorer",
    "build_scorer",
    "extract_final_answer",
    "math_answers_match",
]

log = logging.getLogger(__name__)

RESCALE_MODES: tuple[str, ...] = ("none", "declared", "per_round")

# Files whose presence means a directory holds a tokenizer (fast JSON, sentencepiece, BPE/WordPiece vocabularies).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)


@dataclass
class ScoreResult:
    """Scores of one batch of (prompt, response) pairs, aligned with the inputs.

    A scorer fills ``scores`` (on its declared scale), ``correct`` when it knows the answer check (verifiers do;
    ``None`` = unknown) and ``scale``. :class:`ScoringService` adds the rest: ``raw_scores`` / ``raw_scale`` (what
    the scorer said, kept for pairing and audit), ``scores`` / ``scale`` after the configured rescale, the count of
    non-finite scores and the wall time spent (``busy_s``) so the driver can log per-stage busy time.

    ``unparseable`` is set by scorers that read a score out of generated text (LLM judges): how many responses got
    no score because the judge's output held no number on the scale (or the rating prompt did not fit the judge's
    context). Those responses score NaN, so they are also in ``nonfinite``; the separate count says why.
    """

    scores: np.ndarray
    correct: np.ndarray | None = None
    scale: tuple[float, float] | None = None
    raw_scores: np.ndarray | None = None
    raw_scale: tuple[float, float] | None = None
    nonfinite: int = 0
    busy_s: float = 0.0
    unparseable: int = 0

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.correct is not None:
            self.correct = np.asarray(self.correct, dtype=bool)
        if self.raw_scores is not None:
            self.raw_scores = np.asarray(self.raw_scores, dtype=np.float64)

    def __len__(self) -> int:
        return int(self.scores.shape[0]) if self.scores.ndim else 1

    def metrics(self, prefix: str = "score/") -> dict[str, float]:
        """Flat per-call numbers for the metrics line (means over finite scores only; NaN when none are finite)."""

        def finite_mean(x: np.ndarray | None) -> float:
            if x is None or not np.isfinite(x).any():
                return float("nan")
            return float(x[np.isfinite(x)].mean())

        out = {
            f"{prefix}n": float(len(self)),
            f"{prefix}nonfinite": float(self.nonfinite),
            f"{prefix}unparseable": float(self.unparseable),
            f"{prefix}busy_s": float(self.busy_s),
            f"{prefix}mean": finite_mean(self.scores),
            f"{prefix}raw_mean": finite_mean(self.raw_scores if self.raw_scores is not None else self.scores),
        }
        if self.correct is not None and len(self.correct):
            out[f"{prefix}accuracy"] = float(self.correct.mean())
        return out


class Scorer(ABC):
    """Base of every scorer: a ``name``, a declared ``scale`` (lo, hi) and ``score(prompts, responses)``.

    Anything with these three attributes works where a scorer is expected (duck typing); subclassing just documents
    the contract. ``score`` must return one score per response, aligned with the inputs.

    A scorer that checks responses against ground truth sets ``needs_references = True`` and takes a third argument,
    ``score(prompts, responses, references)``: one reference answer (or None) per item. Only those scorers get
    references (see :func:`_score_with`), so every other scorer, including user scorers, keeps its two-argument
    ``score``.
    """

    name: str = "scorer"
    scale: tuple[float, float] = SCORE_SCALE
    needs_references: bool = False

    @abstractmethod
    def score(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        """Score each (prompt, response); one entry per response, on ``self.scale``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, scale={self.scale})"


def _check_inputs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: they must be aligned one to one")


def _score_with(
    scorer: Scorer, prompts: list[str], responses: list[str], references: Sequence[str | None] | None
) -> ScoreResult:
    """Call ``scorer``, passing the references only to a scorer that declares ``needs_references``."""
    if getattr(scorer, "needs_references", False):
        return scorer.score(prompts, responses, references)  # type: ignore[call-arg]
    return scorer.score(prompts, responses)


def _check_result(name: str, result: Any, n: int) -> ScoreResult:
    """A scorer's output must be a ScoreResult with exactly one score (and correctness flag) per response."""
    if not isinstance(result, ScoreResult):
        raise ValueError(f"scorer {name!r} returned {type(result).__name__}, expected a ScoreResult")
    if result.scores.ndim != 1 or result.scores.shape[0] != n:
        raise ValueError(
            f"scorer {name!r} returned scores of shape {tuple(result.scores.shape)} for {n} responses; "
            f"expected exactly {n} scores"
        )
    if result.correct is not None and (result.correct.ndim != 1 or result.correct.shape[0] != n):
        raise ValueError(
            f"scorer {name!r} returned {result.correct.size} correctness flags for {n} responses; expected {n}"
        )
    return result


def _as_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from e
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"{name} must be finite with high > low, got {value!r}")
    return lo, hi


# ---------------------------------------------------------------------------------------------------------------------
# rule verifier


class ArithVerifier(Scorer):
    """The built-in task's verifier: ground truth recomputed from the prompt text, never trusted from elsewhere.

    ``scores`` = partial-credit quality 10 * exp(-|pred - true| / 10) (0 if unparseable), so quality can differ from
    correctness and Omni-DPO's quality weight has something to see; ``correct`` = exact answer match.
    """

    name = "arith_verifier"
    scale = SCORE_SCALE

    def score(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        """Quality and exactness per response; a prompt that is not an arith problem raises ValueError."""
        _check_inputs(prompts, responses)
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
# math verifier (reference answers)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "the answer is X" / GSM8K's "#### X": X is a $...$ or \(...\) span, else the next run of non-space characters.
_MARKED = re.compile(r"(?:answer\s+is|####)\s*:?\s*(\$[^$\n]+\$|\\\(.+?\\\)|\\?\$?[^\s$]+)", re.IGNORECASE)
_LAST_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_DECIMAL = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_SLASH_FRACTION = re.compile(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)")
_LATEX_FRACTION = re.compile(r"(-?)\\[dt]?frac(?:\{(-?\d+)\}\{(-?\d+)\}|(\d)(\d))")
_DELIMITERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _clean(answer: str) -> str | None:
    """Strip math delimiters, surrounding space and trailing punctuation; None when nothing is left."""
    a = answer.strip()
    for left, right in _DELIMITERS:
        if len(a) >= len(left) + len(right) and a.startswith(left) and a.endswith(right):
            a = a[len(left) : -len(right)].strip()
    a = a.rstrip(".,;:!").strip()
    return a or None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (nested braces matched), None when there is none."""
    for m in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[m.end() : i]
    return None


def _marked_answer(text: str) -> str | None:
    """An answer the text marks as final: the last ``\\boxed{}``, else the last "answer is X" / "#### X"."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    marked = _MARKED.findall(text)
    return _clean(marked[-1]) if marked else None


def extract_final_answer(response: str) -> str | None:
    """A response's final answer: the last ``\\boxed{...}``, else "answer is X" / "#### X", else the last number."""
    marked = _marked_answer(response)
    if marked is not None:
        return marked
    numbers = _LAST_NUMBER.findall(response)
    return numbers[-1] if numbers else None


def reference_answer(reference: str) -> str:
    """The answer in a reference: a marked one when it is a worked solution (MATH, GSM8K), else the whole text.

    No last-number fallback here: a bare reference such as ``\\frac{1}{2}`` is the answer itself.
    """
    return _marked_answer(reference) or _clean(reference) or reference


def _as_number(answer: str) -> Fraction | None:
    """An exact number for integers, decimals, thousands commas, ``$`` amounts, ``a/b`` and ``\\frac`` / ``\\dfrac``.

    Exact rationals keep "0.5" == "1/2" == "\\frac{1}{2}" and "1,000" == "1000" cheap: most math-set answers are
    plain numbers, and only the rest pay for the symbolic comparison.
    """
    s = re.sub(r"\\?\$|\\[!,;]|\s|\{,\}", lambda m: "," if m.group() == "{,}" else "", answer)
    try:
        if m := _LATEX_FRACTION.fullmatch(s):
            num, den = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
            value = Fraction(int(num), int(den))
            return -value if m.group(1) else value
        if m := _SLASH_FRACTION.fullmatch(s):
            return Fraction(m.group(1)) / Fraction(m.group(2))
        if _DECIMAL.fullmatch(s):
            return Fraction(s.replace(",", ""))
    except ZeroDivisionError:
        return None
    return None


def _normalised(answer: str) -> str:
    """Case, spacing, ``\\text{}`` / ``\\left`` / ``\\right`` / ``\\dfrac`` and degree signs made uniform."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", answer)
    s = re.sub(r"\\(?:left|right|displaystyle)|\\[!,;: ]|\^\{?\\circ\}?|\s", "", s)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".").lower()


def _symbolically_equal(predicted: str, reference: str) -> bool:
    """HF math-verify's LaTeX / expression parsing and sympy comparison (sqrt, pi, intervals, sets, equations).

    Its time limits use SIGALRM, which only works in the main thread (where a Ray actor runs its calls); elsewhere
    they are off rather than making every comparison fail.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"${reference}$", extraction_config=configs, parsing_timeout=limit)
    pred = parse(f"${predicted}$", extraction_config=configs, parsing_timeout=limit)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=limit))


def math_answers_match(predicted: str, reference: str) -> bool:
    """Whether two final answers agree: as exact numbers when both are numbers, else as normalised strings, else
    symbolically (math-verify)."""
    p, r = _as_number(predicted), _as_number(reference)
    if p is not None and r is not None:
        return p == r
    return _normalised(predicted) == _normalised(reference) or _symbolically_equal(predicted, reference)


class MathVerifier(Scorer):
    """A response's final answer (:func:`extract_final_answer`) checked against the prompt's reference answer.

    ``scores`` = 10 when it matches (:func:`math_answers_match`), else 0, also when the response states no answer;
    ``correct`` = the same check. The reference may be a bare answer or a worked solution whose marked answer
    (``\\boxed{}``, ``#### X``) is used. Every item needs one: a missing reference raises rather than scoring 0,
    which would teach the policy that a right answer is wrong.
    """

    name = "math_verifier"
    scale = SCORE_SCALE
    needs_references = True

    def score(
        self, prompts: list[str], responses: list[str], references: Sequence[str | None] | None = None
    ) -> ScoreResult:
        """10 / 0 per response; ValueError naming the item when its reference is missing."""
        _check_inputs(prompts, responses)
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
            answer = extract_final_answer(response)
            correct[i] = answer is not None and math_answers_match(answer, reference_answer(str(reference)))
        return ScoreResult(scores=np.where(correct, SCORE_SCALE[1], SCORE_SCALE[0]), correct=correct, scale=self.scale)


# ---------------------------------------------------------------------------------------------------------------------
# reward model


class RewardModelScorer(Scorer):
    """An HF sequence-classification reward model (``num_labels=1``) scoring the text ``prompt + response``.

    Everything that would make the scores silently meaningless is refused at construction with a ValueError naming
    the directory: no tokenizer in it, a checkpoint that is not a 1-label sequence classifier (loading a causal LM
    through AutoModelForSequenceClassification would give a randomly initialised head), a tokenizer whose ids do not
    fit the model's embedding table, no pad token and no EOS to stand in for it.

    Padding: sequences are right-padded (whatever the saved tokenizer says) and ``config.pad_token_id`` is set to the
    tokenizer's pad id, so a Llama-style model that pools the last non-pad token reads the last real token. Right
    padding also keeps real tokens at positions 0.. as when a sequence is scored alone, which matters for models with
    absolute position embeddings (left padding without ``position_ids`` shifts them; RoPE models are shift-invariant).
    Batches are formed from length-sorted inputs to waste less compute on padding.

    ``scale`` is the declared range of the model's logit (a statement by the user; reward models are unbounded, use
    ``scoring.rescale=per_round`` when the range is unknown). ``max_length`` (optional) truncates from the left so
    the final token, which the model pools, is kept. A sequence with no tokens at all scores NaN.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 32,
        device: str = "cpu",
        trust_remote_code: bool = False,
        scale: tuple[float, float] = (0.0, 10.0),
        dtype: str = "float32",
        max_length: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        self.name = f"reward_model:{self.path.name}"
        self.scale = _as_range(f"reward model {self.path} scale", scale)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be > 0 or None, got {max_length}")
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.device = torch.device(device)
        where = f"reward model dir {str(self.path)!r}"

        if not self.path.is_dir():
            raise ValueError(f"{where} does not exist or is not a directory")
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{where} has no config.json (expected an HF save_pretrained layout)")
        if not any((self.path / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(
                f"{where} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the reward model's tokenizer "
                "next to it with tokenizer.save_pretrained(dir)"
            )

        config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code, local_files_only=True)
        archs = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(
                f"{where} is not a sequence-classification model (architectures={archs}); a reward model scorer "
                "needs an *ForSequenceClassification checkpoint with num_labels=1"
            )
        if int(getattr(config, "num_labels", 0)) != 1:
            raise ValueError(f"{where} has num_labels={config.num_labels}; a reward model must output a single logit")

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                self.path, trust_remote_code=trust_remote_code, local_files_only=True
            )
        except Exception as e:  # tokenizer loaders raise OSError, ValueError, TypeError, ... depending on the backend
            raise ValueError(f"{where}: could not load its tokenizer: {type(e).__name__}: {e}") from e
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"{where}: the tokenizer has neither a pad token nor an EOS token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
            log.info("%s: tokenizer has no pad token; padding with EOS (id %d)", where, tokenizer.pad_token_id)
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"

        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_vocab = int(getattr(text_config, "vocab_size", 0) or 0)
        tok_vocab = len(tokenizer)
        if model_vocab <= 0:
            raise ValueError(f"{where}: config has no vocab_size; cannot check that the tokenizer matches the model")
        if tok_vocab > model_vocab:
            raise ValueError(
                f"{where}: tokenizer/model mismatch: the tokenizer has {tok_vocab} tokens but the model's embedding "
                f"table has vocab_size={model_vocab}; token ids >= {model_vocab} would index out of range"
            )
        if model_vocab - tok_vocab > 4096:
            log.warning(
                "%s: model vocab_size=%d is much larger than the tokenizer's %d tokens; is it the right tokenizer?",
                where,
                model_vocab,
                tok_vocab,
            )

        torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}")
        model, info = AutoModelForSequenceClassification.from_pretrained(
            self.path,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            dtype=torch_dtype,
            output_loading_info=True,
        )
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(
                f"{where}: weights missing from the checkpoint would be randomly initialised ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); it is not a trained reward model of this architecture"
            )
        # Pooling reads config.pad_token_id to find each row's last real token: it must be the id we pad with.
        model.config.pad_token_id = tokenizer.pad_token_id
        if text_config is not config and hasattr(model.config, "get_text_config"):
            model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        model.to(self.device)
        model.eval()
        self.tokenizer = tokenizer
        self.model = model

    def _encode(self, texts: list[str]) -> list[list[int]]:
        kwargs: dict[str, Any] = {"add_special_tokens": True}
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return [list(ids) for ids in self.tokenizer(texts, **kwargs)["input_ids"]]

    def score(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        """One logit per ``prompt + response``, in the input order (computed in length-sorted batches)."""
        import torch

        _check_inputs(prompts, responses)
        n = len(responses)
        scores = np.full(n, np.nan, dtype=np.float64)
        if n == 0:
            return ScoreResult(scores=scores, scale=self.scale)
        ids = self._encode([p + r for p, r in zip(prompts, responses, strict=True)])
        order = [i for i in sorted(range(n), key=lambda i: len(ids[i])) if ids[i]]  # empty sequences stay NaN
        pad = int(self.tokenizer.pad_token_id)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                    attention[row, : len(ids[i])] = 1
                out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device))
                logits = out.logits.float().reshape(len(batch), -1)[:, 0].cpu().numpy()
                scores[batch] = logits
        return ScoreResult(scores=scores, scale=self.scale)


# ---------------------------------------------------------------------------------------------------------------------
# combination


class WeightedScorer(Scorer):
    """Weighted mean of several scorers, each first mapped from its own declared scale to ``target``.

    Mapping before averaging is what makes the weights mean what they say: a verifier on 0-1 and a reward model on
    -5..5 would otherwise be mixed in arbitrary units. The combination's declared scale is ``target``; a NaN from
    any member makes that response's combined score NaN (it is dropped and counted downstream, not averaged away).
    ``correct`` is taken from the first member that reports one. It needs references when any member does, and
    passes them to those members only.
    """

    def __init__(
        self, scorers: Sequence[Scorer], weights: Sequence[float], *, target: tuple[float, float] = (0.0, 10.0)
    ) -> None:
        if not scorers:
            raise ValueError("WeightedScorer needs at least one scorer")
        if len(weights) != len(scorers):
            raise ValueError(f"{len(scorers)} scorers but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"scorer weights must be finite and > 0, got {list(weights)}")
        self.scorers = list(scorers)
        self.weights = w / w.sum()
        self.scale = _as_range("WeightedScorer target", target)
        self.needs_references = any(getattr(s, "needs_references", False) for s in self.scorers)
        parts = [f"{s.name}*{float(x):g}" for s, x in zip(self.scorers, w, strict=True)]
        self.name = "weighted(" + ", ".join(parts) + ")"

    def score(
        self, prompts: list[str], responses: list[str], references: Sequence[str | None] | None = None
    ) -> ScoreResult:
        """Each member scores, is rescaled to the common target, then the normalised weighted sum is taken."""
        _check_inputs(prompts, responses)
        n = len(responses)
        total = np.zeros(n, dtype=np.float64)
        correct: np.ndarray | None = None
        unparseable = 0
        for scorer, w in zip(self.scorers, self.weights, strict=True):
            res = _check_result(scorer.name, _score_with(scorer, prompts, responses, references), n)
            total += w * rescale_scores(res.scores, scale=tuple(scorer.scale), target=self.scale)
            unparseable += int(res.unparseable)
            if correct is None and res.correct is not None:
                correct = res.correct
        return ScoreResult(scores=total, correct=correct, scale=self.scale, unparseable=unparseable)


class FunctionScorer(Scorer):
    """A plain function ``(prompts, responses) -> scores`` on a declared scale, as a Scorer."""

    def __init__(self, fn: Any, *, name: str, scale: tuple[float, float]):
        self.fn, self.name, self.scale = fn, name, scale

    def score(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        return ScoreResult(scores=np.asarray(self.fn(prompts, responses), dtype=np.float64), scale=self.scale)


def python_scorer(target: str, *, scale: tuple[float, float]) -> Scorer:
    """A user scorer named ``module:name``: a Scorer class (built with no arguments) or a scoring function."""
    import importlib

    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"python scorer {target!r} cannot be imported: {exc}") from None
    if isinstance(obj, type):
        return obj()
    return FunctionScorer(obj, name=target, scale=scale)


def _spec(spec: ScorerSpec | Mapping[str, Any]) -> ScorerSpec:
    return ScorerSpec(**dict(spec)) if isinstance(spec, Mapping) else spec


def build_scorer(
    specs: Sequence[ScorerSpec | Mapping[str, Any]],
    *,
    device: str = "cpu",
    batch_size: int = 32,
    trust_remote_code: bool = False,
) -> Scorer:
    """The scorer a ``scoring.scorers`` list describes: one spec gives that scorer, several a WeightedScorer.

    Types: ``arith_verifier``, ``math_verifier``, ``reward_model`` (``path``), ``python`` (``target``), ``http``
    (``url``, see :mod:`omni_ray.scoring.remote`) and ``judge`` (``path``, ``template``, see
    :mod:`omni_ray.scoring.judge`). A spec's ``batch_size`` (when > 0) overrides the ``batch_size`` argument.

    A verifier spec must keep the verifier's own scale (0-10): declaring another one would make every rescale
    downstream wrong, so it is refused rather than silently ignored.
    """
    if not specs:
        raise ValueError("scoring.scorers is empty: at least one scorer is needed")
    scorers: list[Scorer] = []
    weights: list[float] = []
    for i, raw in enumerate(specs):
        spec = _spec(raw)
        declared = _as_range(f"scoring.scorers[{i}] scale", (spec.scale_low, spec.scale_high))
        if spec.type in ("arith_verifier", "math_verifier"):
            if declared != tuple(float(v) for v in SCORE_SCALE):
                raise ValueError(
                    f"scoring.scorers[{i}]: {spec.type} scores on {SCORE_SCALE}, but scale_low/scale_high declare "
                    f"{declared}; leave them at {SCORE_SCALE[0]:g}/{SCORE_SCALE[1]:g}"
                )
            scorers.append(ArithVerifier() if spec.type == "arith_verifier" else MathVerifier())
        elif spec.type == "reward_model":
            if not spec.path:
                raise ValueError(f"scoring.scorers[{i}].path: a reward_model scorer needs a model dir")
            scorers.append(
                RewardModelScorer(
                    spec.path,
                    batch_size=spec.batch_size or batch_size,
                    device=device,
                    trust_remote_code=trust_remote_code,
                    scale=declared,
                )
            )
        elif spec.type == "python":
            scorers.append(python_scorer(spec.target, scale=declared))
        elif spec.type == "http":
            from omni_ray.scoring.remote import HttpScorer

            scorers.append(HttpScorer.from_spec(spec, scale=declared, where=f"scoring.scorers[{i}]"))
        elif spec.type == "judge":
            from omni_ray.scoring.judge import JudgeScorer

            scorers.append(
                JudgeScorer.from_spec(spec, scale=declared, trust_remote_code=trust_remote_code, device=device)
            )
        else:
            raise ValueError(f"scoring.scorers[{i}].type: unknown scorer type {spec.type!r}")
        weights.append(float(spec.weight))
    if len(scorers) == 1:
        return scorers[0]
    return WeightedScorer(scorers, weights, target=(0.0, 10.0))


# ---------------------------------------------------------------------------------------------------------------------
# the service the Ray actor wraps


class ScoringService:
    """What the scoring Ray actor runs: a scorer plus the configured rescale, with checks and accounting.

    ``rescale``:
    - ``none``: ``scores`` = raw scores, ``scale`` = the scorer's declared scale;
    - ``declared``: affine map from the declared scale to ``(rescale_low, rescale_high)`` (not clipped);
    - ``per_round``: min-max over this call's finite scores to ``(rescale_low, rescale_high)``, for scorers whose
      range is unknown; call it once per round with the whole round's samples, or gaps change meaning between calls.

    ``specs`` is the ``scoring.scorers`` list, or an already built scorer (custom scorers, tests).
    """

    def __init__(
        self,
        specs: Sequence[ScorerSpec | Mapping[str, Any]] | Scorer,
        rescale: str = "declared",
        rescale_low: float = 0.0,
        rescale_high: float = 10.0,
        **build_kwargs: Any,
    ) -> None:
        if rescale not in RESCALE_MODES:
            raise ValueError(f"unknown rescale mode {rescale!r}; valid: {', '.join(RESCALE_MODES)}")
        self.target = _as_range("scoring.rescale_low/rescale_high", (rescale_low, rescale_high))
        self.rescale = rescale
        self.scorer: Scorer = specs if hasattr(specs, "score") else build_scorer(specs, **build_kwargs)  # type: ignore[arg-type]
        self.declared_scale = _as_range(f"scorer {self.scorer.name!r} scale", self.scorer.scale)
        self.clock = BusyClock()

    @classmethod
    def from_config(cls, cfg: ScoringConfig, **build_kwargs: Any) -> ScoringService:
        """From a ``ScoringConfig`` (``scorers``, ``rescale``, ``rescale_low``, ``rescale_high``)."""
        return cls(list(cfg.scorers), cfg.rescale, cfg.rescale_low, cfg.rescale_high, **build_kwargs)

    @property
    def scale(self) -> tuple[float, float]:
        """The scale of the ``scores`` this service returns (after rescaling)."""
        return self.declared_scale if self.rescale == "none" else self.target

    @property
    def needs_references(self) -> bool:
        """Whether ``score`` must be given a reference answer per item (a ``math_verifier`` is configured)."""
        return bool(getattr(self.scorer, "needs_references", False))

    def info(self) -> dict[str, Any]:
        """What is scoring and on which scales (for the run's log / config echo)."""
        return {
            "scorer": self.scorer.name,
            "declared_scale": list(self.declared_scale),
            "rescale": self.rescale,
            "scale": list(self.scale),
        }

    def score(
        self, prompts: list[str], responses: list[str], references: Sequence[str | None] | None = None
    ) -> ScoreResult:
        """Score, validate the count, rescale; raw scores, non-finite count and busy time ride along.

        ``references`` (one reference answer or None per item, aligned with the responses) reach only scorers that
        need them (:attr:`needs_references`); others ignore them, so a caller may always pass them.
        """
        with self.clock.timing("score"):
            return self._score(prompts, responses, references)

    def busy(self) -> dict[str, float]:
        """Seconds spent scoring since start-up (`BusyClock.totals`)."""
        return self.clock.totals()

    def _score(self, prompts: list[str], responses: list[str], references: Sequence[str | None] | None) -> ScoreResult:
        t0 = time.perf_counter()
        prompts, responses = list(prompts), list(responses)
        _check_inputs(prompts, responses)
        if references is not None:
            references = list(references)
            if len(references) != len(responses):
                raise ValueError(f"{len(references)} references but {len(responses)} responses: they must be aligned")
        res = _check_result(self.scorer.name, _score_with(self.scorer, prompts, responses, references), len(responses))
        raw = res.scores.copy()
        if self.rescale == "none":
            scores = raw.copy()
        elif self.rescale == "declared":
            scores = rescale_scores(raw, scale=self.declared_scale, target=self.target)
        else:
            scores = rescale_per_round(raw, target=self.target)
        nonfinite = int((~np.isfinite(raw)).sum())
        if nonfinite:
            log.warning(
                "%s: %d of %d scores are NaN/inf (passed through; pairing drops them)",
                self.scorer.name,
                nonfinite,
                len(raw),
            )
        return ScoreResult(
            scores=scores,
            correct=res.correct,
            scale=self.scale,
            raw_scores=raw,
            raw_scale=self.declared_scale,
            nonfinite=nonfinite,
            busy_s=time.perf_counter() - t0,
            unparseable=int(res.unparseable),
        )
