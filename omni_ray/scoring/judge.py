"""LLM judges through a rollout engine: a pointwise rating scorer and a preference-over-preference (PoP) judge.

Both format a prompt from a template, generate greedily with a :class:`~omni_ray.rollout.worker.RolloutWorker`
(vLLM or HF ``generate``; or any object with the same ``generate`` / ``tokenizer``) in batches, and read the answer
out of the generated text. Nothing is guessed: an answer that cannot be read gives no score / no label, and is
counted.

- :class:`JudgeScorer` (scorer type ``judge``): ``template`` with ``{prompt}`` / ``{response}`` -> the first number
  in the output (:func:`parse_rating`). A number outside the declared scale, or no number at all, is *unparseable*:
  the response scores NaN (pairing drops it) and ``ScoreResult.unparseable`` counts it. A rating prompt that does not
  fit the judge's context (prompt + ``max_new_tokens`` > ``max_model_len``) is not truncated (that would judge a
  different text): it scores NaN too and is counted in ``unparseable`` and, separately, in ``last_stats["too_long"]``.
- :class:`PopJudge`: shown two preference pairs (a prompt, a chosen and a rejected response each), says which one
  shows the stronger preference, answering with one of two ``choices`` (:func:`parse_choice`: the first standalone
  occurrence of either). ``compare(pairs_a, pairs_b)`` returns 0 (a), 1 (b) or None (unreadable, counted).
  ``both_orders=True`` asks with the pairs in both positions and keeps only verdicts that agree (position bias).
- :func:`judge_comparisons`: candidate comparisons ``(i, j)`` of a round's pairs -> ``(i, j, winner)`` triples for
  :func:`omni_ray.pop.tuples_from_labels`, with the display order randomised per comparison (so a judge's position
  bias does not line up with the candidates' order) and counters.

Prompt encoding: the tokenizer's ``encode`` with special tokens, plus a BOS in front when the tokenizer defines one
and did not add it (the tiny model's tokenizer adds none; every role prompts with BOS + text). ``chat_template=True``
wraps the text as one user message with the tokenizer's chat template (for instruction-tuned judges).
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omni_ray.scoring.base import Scorer, ScoreResult, check_inputs, check_range, register_scorer

__all__ = [
    "DEFAULT_POP_TEMPLATE",
    "JudgeEngine",
    "JudgeScorer",
    "PopJudge",
    "default_rating_template",
    "judge_comparisons",
    "parse_choice",
    "parse_rating",
    "verdicts_from_outputs",
]

log = logging.getLogger(__name__)

PairText = tuple[str, str, str]  # (prompt, chosen, rejected)

_DEFAULT_BATCH_SIZE = 64

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_RATING_FIELDS = frozenset({"prompt", "response"})
_POP_FIELDS = frozenset({f"{f}_{s}" for f in ("prompt", "chosen", "rejected") for s in ("a", "b")}) | {
    "choice_a",
    "choice_b",
}

DEFAULT_POP_TEMPLATE = (
    "Below are two preference pairs. Each pair has a prompt, a chosen response and a rejected response.\n\n"
    "Pair {choice_a}\nPrompt: {prompt_a}\nChosen: {chosen_a}\nRejected: {rejected_a}\n\n"
    "Pair {choice_b}\nPrompt: {prompt_b}\nChosen: {chosen_b}\nRejected: {rejected_b}\n\n"
    "In which pair is the chosen response better than the rejected one by the larger margin? "
    "Answer with {choice_a} or {choice_b} only.\nAnswer:"
)


def default_rating_template(scale: tuple[float, float]) -> str:
    """The built-in pointwise rating prompt for ``scale`` (placeholders ``{prompt}`` / ``{response}``)."""
    lo, hi = scale
    return (
        f"Rate how good the response is as an answer to the prompt, on a scale from {lo:g} (worst) to {hi:g} "
        "(best). Reply with the number only.\n\nPrompt: {prompt}\nResponse: {response}\nRating:"
    )


def _template_fields(template: str, allowed: frozenset[str], required: set[str], what: str) -> set[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{what} is not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    if not names <= allowed or not required <= names:
        raise ValueError(
            f"{what} uses {sorted(names)}; allowed placeholders: {sorted(allowed)}, required: {sorted(required)}"
        )
    return names


def parse_rating(text: str, scale: tuple[float, float]) -> float | None:
    """The first number in ``text`` if it lies on ``scale`` (inclusive), else None (no later number is tried:
    picking another one would be a guess)."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    value = float(m.group())
    return value if math.isfinite(value) and scale[0] <= value <= scale[1] else None


def parse_choice(text: str, choices: Sequence[str]) -> int | None:
    """Index of the choice that occurs first in ``text`` as a standalone token (not inside a longer word or
    number; case-sensitive), or None."""
    cs = [str(c).strip() for c in choices]
    alternation = "|".join(re.escape(c) for c in sorted(set(cs), key=len, reverse=True))
    m = re.search(rf"(?<![0-9A-Za-z])(?:{alternation})(?![0-9A-Za-z])", text)
    return None if m is None else cs.index(m.group())


# ---------------------------------------------------------------------------------------------------------------------
# the engine both judges use


class JudgeEngine:
    """Greedy batched generation of text prompts on a RolloutWorker (given, or built from a model dir).

    ``max_model_len`` is the prompt + output token budget: given, else the given engine's ``max_model_len``, else
    the model config's ``max_position_embeddings``; 0 = unknown, the engine's own check applies.
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        path: str = "",
        backend: str = "auto",
        max_model_len: int = 0,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        seed: int = 0,
        chat_template: bool = False,
        num_threads: int | None = None,
        **backend_options: Any,
    ) -> None:
        if engine is None:
            if not path:
                raise ValueError("a judge needs an engine or a model dir (path)")
            if max_model_len <= 0:
                from transformers import AutoConfig

                cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
                max_model_len = int(getattr(cfg, "max_position_embeddings", 0) or 0)
                if max_model_len <= 0:
                    raise ValueError(f"judge model {path}: no max_position_embeddings in its config; set max_model_len")
            from omni_ray.rollout.worker import RolloutWorker

            engine = RolloutWorker(
                path,
                backend=backend,
                seed=seed,
                dtype=dtype,
                max_model_len=max_model_len,
                trust_remote_code=trust_remote_code,
                num_threads=num_threads,
                **backend_options,
            )
            self.owned = True
        else:
            self.owned = False
            if max_model_len <= 0:  # a RolloutWorker exposes its context length
                max_model_len = int(getattr(engine, "max_model_len", 0) or 0)
        self.engine = engine
        self.max_model_len = max_model_len  # 0 = unknown: the engine's own check applies
        self.seed = seed
        self.chat_template = chat_template
        self.tokenizer = engine.tokenizer
        if chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the judge's tokenizer has no chat template")

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if self.chat_template:
            return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        ids = list(tok.encode(text, add_special_tokens=True))
        bos = tok.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [int(bos)] + ids
        return ids

    def generate(self, texts: list[str], *, max_new_tokens: int, batch_size: int) -> tuple[list[str | None], int]:
        """Greedy output text per input (None: the prompt does not fit), and the number of engine calls."""
        ids = [self.encode(t) for t in texts]
        fits = [i for i, x in enumerate(ids) if not self.max_model_len or len(x) + max_new_tokens <= self.max_model_len]
        out: list[str | None] = [None] * len(texts)
        calls = 0
        for start in range(0, len(fits), batch_size):
            batch = fits[start : start + batch_size]
            comps = self.engine.generate(
                [ids[i] for i in batch], n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=self.seed
            )
            calls += 1
            if len(comps) != len(batch):
                raise RuntimeError(f"judge engine returned {len(comps)} results for {len(batch)} prompts")
            for i, c in zip(batch, comps, strict=True):
                out[i] = c[0].text
        return out, calls

    def close(self) -> None:
        if self.owned and hasattr(self.engine, "close"):
            self.engine.close()


def _engine_kwargs(
    path: str, backend: str, max_model_len: int, *, trust_remote_code: bool, device: str, seed: int = 0
) -> dict[str, Any]:
    options: dict[str, Any] = {"device": device} if backend == "hf" and device != "cpu" else {}
    return dict(
        path=path,
        backend=backend,
        max_model_len=max_model_len,
        trust_remote_code=trust_remote_code,
        seed=seed,
        **options,
    )


# ---------------------------------------------------------------------------------------------------------------------
# pointwise judge


class JudgeScorer(Scorer):
    """An LLM rating each (prompt, response) on the declared ``scale`` (module docstring for the rules).

    Args:
        engine: a RolloutWorker (or anything with ``generate`` + ``tokenizer``); None: build one from ``path``.
        path / backend / max_model_len / dtype / trust_remote_code / seed / chat_template / backend options: how to
            build that engine (``max_model_len`` 0 = the model config's ``max_position_embeddings``).
        template: rating prompt with ``{response}`` and optionally ``{prompt}``; "" = :func:`default_rating_template`.
        scale: the declared score range; outputs outside it are unparseable.
        max_new_tokens: tokens generated per rating.
        batch_size: prompts per engine call.

    ``generator`` is the :class:`JudgeEngine` generating the ratings (its ``max_model_len`` is the token budget);
    ``last_outputs`` keeps the raw outputs of the last call (None where the prompt did not fit) for audit;
    ``last_stats`` its counters (``n``, ``unparseable``, ``too_long``, ``engine_calls``).
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        template: str = "",
        scale: tuple[float, float] = (0.0, 10.0),
        max_new_tokens: int = 8,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        name: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.scale = check_range("judge scale", scale)
        self.template = template or default_rating_template(self.scale)
        _template_fields(self.template, _RATING_FIELDS, {"response"}, "judge template")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, {batch_size}")
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.generator = JudgeEngine(engine, **engine_kwargs)
        label = engine_kwargs.get("path") or getattr(engine, "model_path", "") or type(engine).__name__
        self.name = name or f"judge:{str(label).rstrip('/').rsplit('/', 1)[-1]}"
        self.last_outputs: list[str | None] = []
        self.last_stats: dict[str, int] = {}

    def prompts_for(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        """The rating prompts the judge is shown."""
        return [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> ScoreResult:
        """One rating per response (NaN where none could be read), with ``unparseable`` counted."""
        prompts, responses = list(prompts), list(responses)
        check_inputs(prompts, responses)
        outputs, calls = self.generator.generate(
            self.prompts_for(prompts, responses), max_new_tokens=self.max_new_tokens, batch_size=self.batch_size
        )
        scores = np.full(len(outputs), np.nan, dtype=np.float64)
        too_long = unparseable = 0
        for i, text in enumerate(outputs):
            if text is None:
                too_long += 1
                continue
            value = parse_rating(text, self.scale)
            if value is None:
                unparseable += 1
            else:
                scores[i] = value
        self.last_outputs = outputs
        self.last_stats = {"n": len(outputs), "unparseable": unparseable, "too_long": too_long, "engine_calls": calls}
        if unparseable or too_long:
            log.warning(
                "%s: %d of %d outputs held no rating on %s, %d prompts did not fit (scored NaN)",
                self.name,
                unparseable,
                len(outputs),
                self.scale,
                too_long,
            )
        return ScoreResult(scores=scores, scale=self.scale, unparseable=unparseable + too_long)

    def close(self) -> None:
        """Shut down the engine when the judge built it."""
        self.generator.close()


# ---------------------------------------------------------------------------------------------------------------------
# PoP judge


def _pair_text(x: Any) -> PairText:
    """(prompt, chosen, rejected) of a 3-tuple or of an object with those attributes (e.g. ``pairs.Pair``)."""
    if hasattr(x, "chosen") and hasattr(x, "rejected"):
        return str(x.prompt), str(x.chosen), str(x.rejected)
    prompt, chosen, rejected = x
    return str(prompt), str(chosen), str(rejected)


def verdicts_from_outputs(
    outputs: Sequence[str | None], choices: Sequence[str], *, both_orders: bool = False
) -> tuple[list[int | None], dict[str, int]]:
    """Verdicts (0 = first pair, 1 = second, None) from a PoP judge's raw outputs, and why some are missing.

    ``outputs`` holds one answer per comparison (None: its prompt did not fit), or with ``both_orders`` first the
    answers with the pairs as given, then the answers with the pairs swapped; a verdict then needs both answers
    to name the same pair. Counts: ``too_long``, ``unparseable`` (no choice readable), ``inconsistent``.
    """
    n = len(outputs) // 2 if both_orders else len(outputs)
    if both_orders and len(outputs) != 2 * n:
        raise ValueError(f"both_orders needs an even number of outputs, got {len(outputs)}")
    read = [None if o is None else parse_choice(o, choices) for o in outputs]
    counts = {"too_long": 0, "unparseable": 0, "inconsistent": 0}
    verdicts: list[int | None] = []
    for i in range(n):
        idx = [i, i + n] if both_orders else [i]
        if any(outputs[j] is None for j in idx):
            counts["too_long"] += 1
            verdicts.append(None)
        elif any(read[j] is None for j in idx):
            counts["unparseable"] += 1
            verdicts.append(None)
        elif both_orders and read[i] != 1 - read[i + n]:  # type: ignore[operator]
            counts["inconsistent"] += 1
            verdicts.append(None)
        else:
            verdicts.append(read[i])
    return verdicts, counts


class PopJudge:
    """An LLM saying which of two preference pairs shows the stronger preference (module docstring).

    Args:
        engine / engine kwargs: as :class:`JudgeScorer`.
        template: placeholders ``{prompt_a} {chosen_a} {rejected_a} {prompt_b} {chosen_b} {rejected_b}`` and
            optionally ``{choice_a} {choice_b}``; must show both pairs (``{chosen_a}`` and ``{chosen_b}``).
            "" = :data:`DEFAULT_POP_TEMPLATE`.
        choices: the answers naming the first / second pair shown (default ``("A", "B")``).
        both_orders: ask twice, pairs swapped; a label only when both answers name the same pair.

    ``last_outputs`` / ``last_stats`` (``compared``, ``unparseable``, ``too_long``, ``inconsistent``,
    ``engine_calls``) describe the last call; ``stats`` accumulates the counters over the judge's life.
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        template: str = "",
        choices: Sequence[str] = ("A", "B"),
        max_new_tokens: int = 4,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        both_orders: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        self.template = template or DEFAULT_POP_TEMPLATE
        _template_fields(self.template, _POP_FIELDS, {"chosen_a", "chosen_b"}, "PoP judge template")
        cs = [str(c).strip() for c in choices]
        if len(cs) != 2 or not all(cs) or cs[0] == cs[1]:
            raise ValueError(f"choices must be two different non-empty answers, got {list(choices)!r}")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, {batch_size}")
        self.choices = (cs[0], cs[1])
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.both_orders = bool(both_orders)
        self.generator = JudgeEngine(engine, **engine_kwargs)
        self.last_outputs: list[str | None] = []
        self.last_stats: dict[str, int] = {}
        self.stats: dict[str, int] = {}

    @classmethod
    def from_config(cls, pop: Any, *, trust_remote_code: bool = False, device: str = "cpu", seed: int = 0) -> PopJudge:
        """From a ``PopConfig`` with ``labels=judge`` (the ``judge_*`` keys)."""
        if not pop.judge_path:
            raise ValueError("pop.judge_path: pop.labels=judge needs the judge's causal LM dir")
        return cls(
            template=pop.judge_template,
            choices=tuple(pop.judge_choices),
            max_new_tokens=pop.judge_max_new_tokens,
            batch_size=pop.judge_batch_size,
            both_orders=pop.judge_both_orders,
            **_engine_kwargs(
                pop.judge_path,
                pop.judge_backend,
                pop.judge_max_model_len,
                trust_remote_code=trust_remote_code,
                device=device,
                seed=seed,
            ),
        )

    def prompt_for(self, a: Any, b: Any) -> str:
        """The text the judge is shown for pair ``a`` (first) against pair ``b`` (second)."""
        (pa, ca, ra), (pb, cb, rb) = _pair_text(a), _pair_text(b)
        return self.template.format(
            prompt_a=pa,
            chosen_a=ca,
            rejected_a=ra,
            prompt_b=pb,
            chosen_b=cb,
            rejected_b=rb,
            choice_a=self.choices[0],
            choice_b=self.choices[1],
        )

    def compare(self, pairs_a: Sequence[Any], pairs_b: Sequence[Any]) -> list[int | None]:
        """Per position: 0 when pair ``pairs_a[i]`` shows the stronger preference, 1 when ``pairs_b[i]`` does,
        None when the judge's answer could not be read (or, with ``both_orders``, the two answers disagree)."""
        if len(pairs_a) != len(pairs_b):
            raise ValueError(f"{len(pairs_a)} first pairs but {len(pairs_b)} second pairs: they must be aligned")
        n = len(pairs_a)
        texts = [self.prompt_for(a, b) for a, b in zip(pairs_a, pairs_b, strict=True)]
        if self.both_orders:
            texts += [self.prompt_for(b, a) for a, b in zip(pairs_a, pairs_b, strict=True)]
        outputs, calls = self.generator.generate(texts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        verdicts, counts = verdicts_from_outputs(outputs, self.choices, both_orders=self.both_orders)
        unparseable, too_long, inconsistent = counts["unparseable"], counts["too_long"], counts["inconsistent"]
        self.last_outputs = outputs
        self.last_stats = {
            "compared": n,
            "unparseable": unparseable,
            "too_long": too_long,
            "inconsistent": inconsistent,
            "engine_calls": calls,
        }
        for k, v in self.last_stats.items():
            self.stats[k] = self.stats.get(k, 0) + v
        if unparseable or too_long or inconsistent:
            log.warning(
                "PoP judge: %d of %d comparisons without a label (%d unreadable, %d too long, %d inconsistent)",
                unparseable + too_long + inconsistent,
                n,
                unparseable,
                too_long,
                inconsistent,
            )
        return verdicts

    def close(self) -> None:
        """Shut down the engine when the judge built it."""
        self.generator.close()


def judge_comparisons(
    judge: Any,
    pairs: Sequence[Any],
    candidates: Sequence[tuple[int, int]],
    *,
    rng: np.random.Generator | None = None,
) -> tuple[list[tuple[int, int, int]], dict[str, int]]:
    """Judge-labelled PoP comparisons ``(i, j, winner)`` for :func:`omni_ray.pop.tuples_from_labels`.

    ``candidates`` are index pairs ``(i, j)`` into ``pairs`` (e.g. the tuples gap sampling proposes, ``i`` the
    gap-stronger one). With ``rng`` each comparison is shown in a random order, so a judge that favours a position
    is not rewarded for agreeing with the candidate order. Comparisons without a verdict are left out and counted.

    Returns:
        ``(comparisons, stats)``; stats: ``candidates``, ``labelled``, ``no_label`` and ``agree_with_first``
        (labels naming the candidate's first pair ``i``; with gap-proposed candidates: agreement with the gaps).
    """
    items = [_pair_text(p) for p in pairs]
    cand = [(int(i), int(j)) for i, j in candidates]
    for i, j in cand:
        if i == j or not (0 <= i < len(items) and 0 <= j < len(items)):
            raise ValueError(f"candidate comparison ({i}, {j}) must name two different pairs of {len(items)}")
    swap = rng.random(len(cand)) < 0.5 if rng is not None else np.zeros(len(cand), dtype=bool)
    shown = [(j, i) if s else (i, j) for (i, j), s in zip(cand, swap, strict=True)]
    verdicts = judge.compare([items[a] for a, _ in shown], [items[b] for _, b in shown]) if shown else []
    if len(verdicts) != len(shown):
        raise RuntimeError(f"the PoP judge returned {len(verdicts)} verdicts for {len(shown)} comparisons")
    comparisons: list[tuple[int, int, int]] = []
    agree = 0
    for (i, j), (a, b), v in zip(cand, shown, verdicts, strict=True):
        if v is None:
            continue
        if v not in (0, 1):
            raise ValueError(f"a PoP judge verdict must be 0, 1 or None, got {v!r}")
        winner = a if v == 0 else b
        comparisons.append((i, j, winner))
        agree += int(winner == i)
    stats = {
        "candidates": len(cand),
        "labelled": len(comparisons),
        "no_label": len(cand) - len(comparisons),
        "agree_with_first": agree,
    }
    return comparisons, stats


def as_pop_judge(judge: Any) -> Any:
    """A PopJudge from a mapping of constructor kwargs; anything with ``compare`` is returned as is."""
    if hasattr(judge, "compare"):
        return judge
    if isinstance(judge, Mapping):
        return PopJudge(**dict(judge))
    raise TypeError(f"expected a PopJudge or its kwargs, got {type(judge).__name__}")


@register_scorer("judge")
def _judge(spec: Any, *, scale: tuple[float, float], device: str, trust_remote_code: bool, where: str) -> JudgeScorer:
    if not spec.path:
        raise ValueError(f"{where}.path: a judge scorer needs a causal LM dir")
    return JudgeScorer(
        template=spec.template,
        scale=scale,
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size or _DEFAULT_BATCH_SIZE,
        chat_template=spec.chat_template,
        **_engine_kwargs(
            spec.path, spec.backend, spec.max_model_len, trust_remote_code=trust_remote_code, device=device
        ),
    )
