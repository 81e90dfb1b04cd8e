"""Prompt sources: the built-in arith task (arith.py), prompt datasets (prompts.py), offline preferences.

:class:`Prompt` lives here, not in a source module, because every source yields it and the rollout / scoring code
consumes it: arith.py and prompts.py both import it from the package without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Prompt"]


@dataclass(frozen=True)
class Prompt:
    """One prompt of a round or of the eval set.

    ``prompt_id`` is stable across rounds and resumes (pairs.jsonl and eval logs refer to it); ``text`` is exactly
    what the policy is conditioned on (chat template already applied); ``reference`` is the ground-truth answer that
    reference-based verifiers (``math_verifier``) compare with, ``None`` when the source has none.
    """

    prompt_id: str
    text: str
    reference: str | None = None
