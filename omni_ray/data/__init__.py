"""Prompt sources: the built-in arith task (arith.py), prompt datasets (prompts.py), offline preferences.

:class:`Prompt` lives here, not in a source module, because every source yields it and the rollout / scoring code
consumes it: arith.py and prompts.py both import it from the package without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Prompt"]


@dataclass(frozen=True)
class Prompt:
    """One prompt of a round or of the eval set.

    ``prompt_id`` is stable across rounds and resumes (pairs.jsonl and eval logs refer to it); ``text`` is exactly
    what the policy is conditioned on (chat template already applied); ``reference`` is the ground-truth answer that
    scorers compare with (``references=``), ``None`` when the source has none; ``columns`` holds the other columns of
    the row that ``data.extra_columns`` names, handed to python / http scorers by name; ``token_ids`` is the prompt as
    the policy reads it (BOS + text, cut to ``data.max_prompt_tokens``), set once when the driver encodes it.
    """

    prompt_id: str
    text: str
    reference: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    token_ids: tuple[int, ...] = ()
