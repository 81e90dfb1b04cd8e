"""Prompt sources: the built-in arith task (arith.py), prompt datasets (prompts.py), offline preferences.

:class:`Prompt` and :func:`encode_prompt` live here, not in a source module, because every source yields prompts and
every role reads their token ids: arith.py and prompts.py import them from the package without importing each other,
and the driver encodes prompts without importing a model library's model classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Prompt", "encode_prompt"]


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


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt token ids as every role sees them: BOS + the text's tokens (no EOS). A text that already starts with the
    BOS token (a chat template's output) keeps its own."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids
