"""The own-task example's verifier: a response is right when it is exactly the reference answer.

Two ways to hand omni-ray a binary verifier (``type: python``, ``scale_low: 0``, ``scale_high: 1``), both here:

- ``exact`` returns ``(scores, correct)``: a score per response and its correct flag, so eval reports accuracy;
- ``exact_score`` returns the scores alone; the scorer spec's ``correct_at: 1`` then says which scores are correct.

omni-ray calls them as ``fn(prompts, responses, references=...)``: ``references`` are the ``data.answer_column``
values of the prompts' rows, one per response. The target ``examples.own_task.my_verifier:exact`` imports in the
scorer's Ray worker when ``omni-ray train`` runs from the repository root: Ray puts the driver's working directory
on its local workers' ``sys.path``, and ``ray job submit --working-dir .`` makes the uploaded directory theirs.
"""

from __future__ import annotations


def exact_score(prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
    """1.0 when the response, stripped of surrounding whitespace, equals the reference answer; else 0.0."""
    if len(references) != len(responses):
        raise ValueError(f"{len(references)} references for {len(responses)} responses")
    if any(ref is None for ref in references):
        raise ValueError("my_verifier needs every prompt's reference answer: set data.answer_column=answer")
    return [float(r.strip() == ref.strip()) for r, ref in zip(responses, references)]


def exact(prompts: list[str], responses: list[str], references: list[str | None]) -> tuple[list[float], list[bool]]:
    """``exact_score``'s scores and, per response, whether it is correct (score 1)."""
    scores = exact_score(prompts, responses, references)
    return scores, [s == 1.0 for s in scores]
