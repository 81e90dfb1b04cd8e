"""Online training on a prompt dataset (``data.source: prompts``): UltraFeedback prompts, a math set with answers.

:class:`PromptDataset` has the interface the driver uses for the built-in task (``eval_prompts()``,
``train_prompts(round_index, count)``) and reads the sources preference data reads (an HF dataset name, a
``save_to_disk`` dir, a dir of / a single ``.jsonl`` or ``.parquet`` file), through the same readers.

Rows:

- ``prompt_column``: a string, or a chat message list ``[{"role", "content"}, ...]`` (UltraFeedback's ``messages``,
  a ``chosen`` conversation). A list stands for the conversation up to and including its last user message; any
  later assistant turn is the dataset's answer, not part of the prompt.
- ``answer_column`` (optional): the reference answer verifiers compare with (``Prompt.reference``); a number is kept
  as its string. It may be a whole worked solution (MATH's ``solution``, GSM8K's ``answer``): ``math_verifier``
  takes the final answer out of it.
- ``extra_columns`` (optional): more columns of the row, kept as they are in ``Prompt.columns`` (column -> value)
  and handed to python / http scorers by name (what TRL's reward functions get as keyword arguments).

Rendering: with a ``chat_template`` callable (the driver passes the tokenizer's ``apply_chat_template`` with
``add_generation_prompt=True``), every prompt goes through it, a plain string as a one-message user conversation, so
an instruct model sees the format it was tuned on. Without one, strings are used as they are and a message list
gives the content of its last user message. Rendering is done when prompts are handed out, not at load time, so a
60k-row dataset is not templated up front.

Determinism (resume relies on it): the eval set is fixed by the seed; ``train_prompts(r, n)`` is a pure function
of ``(seed, r, n)``. Training rows are walked in epochs, each a permutation seeded by ``(seed, epoch)``, and round
``r`` takes positions ``[r*n, (r+1)*n)`` of that endless stream: no prompt repeats within an epoch, and a resumed
run gets exactly the prompts the interrupted one would have. ``prompt_id`` is ``"<split>:<row>"`` (0-based row
index in the split), the same in every round.

Refused or counted: a missing column (prompt, answer or extra) raises :class:`DataSourceError` naming the file, the
column and the columns there are; a row without one of the extra columns, or whose prompt is empty, neither a
string nor a message list, or a list without a user message, or whose reference is empty when ``answer_column`` is
set, raises naming the file and line / row, or with ``on_bad_row="skip"`` is skipped and counted in
``stats["bad_rows"]``; too few rows for the eval set plus one training prompt raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from omni_ray.data import Prompt
from omni_ray.data.preferences import BadRow, DataSourceError, read_rows, row_label

if TYPE_CHECKING:
    from omni_ray.config import DataConfig

__all__ = ["ChatTemplate", "Prompt", "PromptDataset"]

#: Renders a conversation (ending with the user's turn) into the text the policy continues.
ChatTemplate = Callable[[list[dict[str, str]]], str]

# Tags mixed into the seed so the eval hold-out and the training epochs draw independent streams.
_EVAL_TAG, _TRAIN_TAG = 101, 103

_RawPrompt = str | list[dict[str, str]]
_Row = tuple[str, _RawPrompt, str | None, dict[str, Any]]  # (prompt_id, raw prompt, reference, extra columns)


class PromptDataset:
    """Prompts (with optional reference answers and extra columns) of a dataset, handed out per round (module
    docstring for the rules).

    ``stats``: ``source``, ``files``, ``rows`` (read, both splits), ``bad_rows`` (skipped), ``train`` and ``eval``
    (prompts in each set).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        split: str = "train",
        subset: str = "",
        prompt_column: str = "prompt",
        answer_column: str = "",
        extra_columns: Sequence[str] = (),
        eval_split: str = "",
        eval_prompts: int = 500,
        seed: int = 0,
        on_bad_row: Literal["raise", "skip"] = "raise",
        chat_template: ChatTemplate | None = None,
    ) -> None:
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
        if eval_prompts < 1:
            raise ValueError(f"eval_prompts must be >= 1, got {eval_prompts}")
        if eval_split == split:
            raise ValueError(f"eval_split must differ from split ({split!r}); leave it empty to hold out rows of it")
        self.seed = int(seed)
        self.chat_template = chat_template
        self._prompt_column, self._answer_column, self._on_bad_row = prompt_column, answer_column, on_bad_row
        self._extra_columns = list(extra_columns)
        self._subset = subset
        self.stats: dict[str, Any] = {"source": str(path), "files": [], "rows": 0, "bad_rows": 0}
        rows = self._load(path, split)
        if eval_split:
            n_files = len(self.stats["files"])
            self._train, self._eval = rows, self._held_out(self._load(path, eval_split), eval_prompts)
            train_files, eval_files = set(self.stats["files"][:n_files]), set(self.stats["files"][n_files:])
            shared = sorted(f for f in train_files & eval_files if Path(f).is_file())
            if shared:  # a single file, or a dir without per-split files, has no splits: eval would be trained on
                raise DataSourceError(
                    f"{path}: eval_split {eval_split!r} reads the same files as split {split!r} ({', '.join(shared)}); "
                    "leave data.eval_split empty to hold out rows, or name files by split (<split>.jsonl)"
                )
            if not rows:
                raise DataSourceError(f"{path} (split {split!r}): no usable prompts to train on")
            if len(self._eval) < eval_prompts:
                raise DataSourceError(
                    f"{path} (split {eval_split!r}): {len(self._eval)} usable prompts, fewer than "
                    f"data.eval_prompts={eval_prompts}; lower data.eval_prompts"
                )
        else:
            if len(rows) < eval_prompts + 1:
                raise DataSourceError(
                    f"{path} (split {split!r}): {len(rows)} usable prompts, but data.eval_prompts={eval_prompts} are "
                    "held out for eval and at least one must be left to train on; lower data.eval_prompts or set "
                    "data.eval_split"
                )
            self._eval = self._held_out(rows, eval_prompts)
            held = {row[0] for row in self._eval}
            self._train = [row for row in rows if row[0] not in held]
        self.stats.update(train=len(self._train), eval=len(self._eval))

    @classmethod
    def from_config(cls, data: DataConfig, *, seed: int, chat_template: ChatTemplate | None = None) -> PromptDataset:
        """From ``cfg.data`` (``path``, ``split``, ``subset``, ``prompt_column``, ``answer_column``, ``extra_columns``,
        ``eval_split``, ``eval_prompts``, ``on_bad_row``) and ``cfg.run.seed``."""
        return cls(
            data.path,
            split=data.split,
            subset=data.subset,
            prompt_column=data.prompt_column,
            answer_column=data.answer_column,
            extra_columns=list(data.extra_columns),
            eval_split=data.eval_split,
            eval_prompts=data.eval_prompts,
            seed=seed,
            on_bad_row=data.on_bad_row,  # type: ignore[arg-type]
            chat_template=chat_template,
        )

    # -----------------------------------------------------------------------------------------------------------------
    # handing out

    def eval_prompts(self) -> list[Prompt]:
        """The fixed held-out set, disjoint from the training rows."""
        return [self._render(row) for row in self._eval]

    def train_prompts(self, round_index: int, count: int) -> list[Prompt]:
        """Round ``round_index``'s ``count`` prompts: positions ``[r*count, (r+1)*count)`` of the epoch stream."""
        if round_index < 0 or count < 0:
            raise ValueError(f"need round_index >= 0 and count >= 0, got {round_index}, {count}")
        n = len(self._train)
        positions = np.arange(round_index * count, (round_index + 1) * count, dtype=np.int64)
        epochs = positions // n
        picked = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            permutation = np.random.default_rng([self.seed, _TRAIN_TAG, int(epoch)]).permutation(n)
            picked[in_epoch] = permutation[positions[in_epoch] % n]
        return [self._render(self._train[i]) for i in picked]

    def _held_out(self, rows: list[_Row], count: int) -> list[_Row]:
        """``count`` rows drawn by the seed, in file order."""
        order = np.random.default_rng([self.seed, _EVAL_TAG]).permutation(len(rows))
        return [rows[i] for i in sorted(order[:count])]

    def _render(self, row: _Row) -> Prompt:
        prompt_id, raw, reference, columns = row
        if self.chat_template is None:
            text = raw if isinstance(raw, str) else raw[-1]["content"]
        else:
            text = self.chat_template([{"role": "user", "content": raw}] if isinstance(raw, str) else raw)
            if not isinstance(text, str):
                raise TypeError(f"chat_template must return a string, got {type(text).__name__} for {prompt_id}")
        return Prompt(prompt_id=prompt_id, text=text, reference=reference, columns=dict(columns))

    # -----------------------------------------------------------------------------------------------------------------
    # loading

    def _load(self, path: str | Path, split: str) -> list[_Row]:
        """(prompt_id, raw prompt, reference, extra columns) of every usable row of ``split``, in file order."""
        required = [self._prompt_column] + ([self._answer_column] if self._answer_column else [])
        required += [c for c in self._extra_columns if c not in required]
        out: list[_Row] = []
        for index, (name, where, row) in enumerate(read_rows(path, split, required, self.stats, subset=self._subset)):
            self.stats["rows"] += 1
            try:
                raw, reference, columns = self._parse(row)
            except BadRow as exc:
                if self._on_bad_row == "raise":
                    raise DataSourceError(f"{name}: {row_label(name)} {where}: {exc}") from None
                self.stats["bad_rows"] += 1
                continue
            out.append((f"{split}:{index}", raw, reference, columns))
        return out

    def _parse(self, row: Any) -> tuple[_RawPrompt, str | None, dict[str, Any]]:
        if isinstance(row, BadRow):
            raise row
        if not isinstance(row, Mapping):
            raise BadRow(f"expected a JSON object, got {type(row).__name__}")
        col = self._prompt_column
        if col not in row:
            raise BadRow(f"no {col!r} field")
        value = row[col]
        if isinstance(value, str):
            if not value.strip():
                raise BadRow(f"empty prompt in {col!r}")
            raw: _RawPrompt = value
        elif isinstance(value, list):
            raw = _conversation(value, col)
        else:
            raise BadRow(f"{col!r} must be a string or a chat message list, got {type(value).__name__}")
        missing = [c for c in self._extra_columns if c not in row]
        if missing:
            raise BadRow(f"no {missing[0]!r} field (data.extra_columns)")
        reference = _reference(row, self._answer_column) if self._answer_column else None
        return raw, reference, {c: row[c] for c in self._extra_columns}


def _conversation(messages: list, col: str) -> list[dict[str, str]]:
    """The messages up to and including the last user message, as plain role/content dicts (checked)."""
    last_user = -1
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow(f"{col!r}: message {i} needs a string 'role' and a string 'content', got {str(m)[:80]!r}")
        if m["role"] == "user":
            last_user = i
    if last_user < 0:
        raise BadRow(f"{col!r}: the message list has no 'user' message")
    if not messages[last_user]["content"].strip():
        raise BadRow(f"{col!r}: empty prompt (the last user message is blank)")
    return [{"role": m["role"], "content": m["content"]} for m in messages[: last_user + 1]]


def _reference(row: Mapping, col: str) -> str:
    """The reference answer as a string (numbers as written by ``str``); empty or missing is a bad row."""
    value = row.get(col)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"empty or non-text reference answer in {col!r}: {str(value)[:80]!r}")
    return value.strip()
