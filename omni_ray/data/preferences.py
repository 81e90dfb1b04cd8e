"""Offline preference data: (prompt, chosen, rejected, score_chosen, score_rejected) records from files or datasets.

Sources (``load_preference_pairs(source)``; prompt datasets, prompts.py, read the same ones through
:func:`read_rows`):

- a ``.jsonl`` file (one JSON object per line; blank lines are ignored);
- a ``.parquet`` file;
- a local dataset dir: a ``datasets.save_to_disk`` dir (``load_from_disk``; a ``DatasetDict`` is indexed by
  ``split``); a clone of an HF Hub dataset repo whose README.md declares its subsets (``configs:``, as gsm8k's
  ``main`` / ``socratic``), read by ``datasets.load_dataset(dir, subset, split=split)`` so that one subset is read,
  never a mix of them; or a dir of ``.jsonl`` / ``.parquet`` files (searched recursively; when some files belong to
  ``split`` by HF's shard naming, ``<split>.jsonl``, ``<split>-00000-of-00001.parquet`` or a ``<split>/`` folder,
  only those are read, else all of them);
- anything else is taken as an HF Hub dataset name (``datasets.load_dataset(source, subset, split=split)``); offline
  that fails with a :class:`PreferenceDataError` saying so.

``subset`` (``data.subset``) is HF's config name; it is refused for a source that has no subsets (a file, a
``save_to_disk`` dir, a dir of files without ``configs:``), so it never goes unread.

Two row schemas, mixed freely: plain strings (``chosen: "..."``) and the UltraFeedback-binarized chat schema, where
``chosen`` / ``rejected`` are message lists ``[{"role": "user", ...}, {"role": "assistant", "content": ...}]``. The
prompt is always the ``prompt`` field (a string; a message list gives its last user message); a response is the
string itself or the content of the last assistant message.

What is refused and what is counted (nothing is dropped silently):

- a required column missing from the source -> :class:`PreferenceDataError` naming the column and the file (for
  ``.jsonl``: a key missing from the first row; a key missing from a later row is a malformed row);
- a malformed row (invalid JSON, not an object, a response that is neither a string nor a message list, a list
  without an assistant message, a score that is not a number) -> error naming the file and the 1-based line (row)
  number, or with ``on_bad_row="skip"`` skipped and counted in ``stats["bad_rows"]``;
- an empty (whitespace-only) prompt or response -> skipped, counted in ``empty_prompt`` / ``empty_response``
  (unless the row carries token ids: a generated response that decodes to "" is still a real ``[EOS]`` response);
- a NaN / inf / null score -> dropped, counted in ``nonfinite_score``;
- ``score_chosen <= score_rejected`` -> kept (the label says which one is preferred) and counted in
  ``nonpositive_gap``; pass ``min_gap`` to drop pairs with a smaller gap (counted in ``below_min_gap``).

``to_train_pairs`` tokenizes records into :class:`omni_ray.pairs.Pair` objects, the structure the driver's round
loop already trains on and writes to ``pairs.jsonl``. Pure Python + datasets / pyarrow: no Ray, no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from omni_ray.pairs import Pair

__all__ = [
    "BadRow",
    "DataSourceError",
    "PreferenceDataError",
    "PreferenceRecord",
    "load_preference_pairs",
    "read_rows",
    "row_label",
    "to_train_pairs",
]

_DATA_SUFFIXES = (".jsonl", ".parquet")
_TOKEN_ID_FIELDS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")


class DataSourceError(ValueError):
    """A data file or dataset that cannot be read as asked (message names the file, and the line or column).

    Raised by the row readers below, which prompt datasets (prompts.py) share with preference data.
    """


PreferenceDataError = DataSourceError  # the name preference-data callers catch; one class, one set of readers


@dataclass
class PreferenceRecord:
    """One offline preference pair (texts and raw scores).

    ``prompt_id`` is the source's ``prompt_id`` field when present, else ``<file name>:<1-based line/row>``.
    The ``*_token_ids`` are set only when the source carries all three (a run's ``rounds/*/pairs.jsonl``):
    ``to_train_pairs`` then uses them instead of re-tokenizing the text.
    """

    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    score_chosen: float
    score_rejected: float
    prompt_token_ids: list[int] | None = None
    chosen_token_ids: list[int] | None = None
    rejected_token_ids: list[int] | None = None

    @property
    def gap(self) -> float:
        """Score gap S_w - S_l."""
        return self.score_chosen - self.score_rejected


class BadRow(Exception):
    """A row that cannot be turned into a record (the message says why); the caller adds file and row number."""


# ---------------------------------------------------------------------------------------------------------------------
# loading


def load_preference_pairs(
    source: str | Path,
    *,
    split: str = "train",
    subset: str = "",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    score_chosen_field: str = "score_chosen",
    score_rejected_field: str = "score_rejected",
    on_bad_row: Literal["raise", "skip"] = "raise",
    min_gap: float | None = None,
    limit: int | None = None,
) -> tuple[list[PreferenceRecord], dict[str, Any]]:
    """Read preference pairs from ``source`` (see the module docstring); returns ``(records, stats)``.

    ``stats``: ``source``, ``files``, ``rows`` (rows read, blank lines excluded), ``records`` (kept), ``bad_rows``,
    ``empty_prompt``, ``empty_response``, ``nonfinite_score``, ``below_min_gap``, ``nonpositive_gap`` (kept).
    ``limit`` stops after that many kept records. No usable record at all raises :class:`PreferenceDataError`.
    """
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    fields = {
        "prompt": prompt_field,
        "chosen": chosen_field,
        "rejected": rejected_field,
        "score_chosen": score_chosen_field,
        "score_rejected": score_rejected_field,
    }
    stats: dict[str, Any] = {
        "source": str(source),
        "files": [],
        "rows": 0,
        "records": 0,
        "bad_rows": 0,
        "empty_prompt": 0,
        "empty_response": 0,
        "nonfinite_score": 0,
        "below_min_gap": 0,
        "nonpositive_gap": 0,
    }
    records: list[PreferenceRecord] = []
    for name, where, row in read_rows(source, split, list(fields.values()), stats, subset=subset):
        stats["rows"] += 1
        try:
            rec = _record(row, fields, default_id=f"{Path(name).name}:{where}")
        except BadRow as exc:
            if on_bad_row == "raise":
                raise DataSourceError(f"{name}: {row_label(name)} {where}: {exc}") from None
            stats["bad_rows"] += 1
            continue
        has_ids = rec.prompt_token_ids is not None  # a generated response may decode to "" and still be [EOS]
        if not rec.prompt.strip() and not has_ids:
            stats["empty_prompt"] += 1
            continue
        if (not rec.chosen.strip() or not rec.rejected.strip()) and not has_ids:
            stats["empty_response"] += 1
            continue
        if not (math.isfinite(rec.score_chosen) and math.isfinite(rec.score_rejected)):
            stats["nonfinite_score"] += 1
            continue
        if min_gap is not None and rec.gap < min_gap:
            stats["below_min_gap"] += 1
            continue
        if rec.gap <= 0:
            stats["nonpositive_gap"] += 1
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    stats["records"] = len(records)
    if not records:
        counts = {k: v for k, v in stats.items() if k not in ("source", "files")}
        raise DataSourceError(f"{source}: no usable preference pairs ({counts})")
    return records, stats


def row_label(name: str) -> str:
    """How a row is counted in messages: ``line`` in a .jsonl file (blank lines counted), else ``row``."""
    return "line" if name.endswith(".jsonl") else "row"


def read_rows(
    source: str | Path, split: str, required: list[str], stats: dict, *, subset: str = ""
) -> Iterator[tuple[str, int, Any]]:
    """(file or dataset name, 1-based line/row number, row) for every row of ``split`` (of ``subset``, HF's config
    name, where the source has subsets) of the source (module docstring).

    A ``required`` column missing from the source raises :class:`DataSourceError` naming it and the columns there
    are; a row that does not parse as JSON is yielded as a :class:`BadRow`, for the caller's ``on_bad_row`` rule.
    ``stats["files"]`` (a list) gets every file or dataset read.
    """
    path = Path(source).expanduser()
    if path.is_dir() and _declares_subsets(path):
        yield from _dataset_rows(_load_dataset(str(path), split, subset), str(path), required, stats)
        return
    if subset and path.exists():
        raise DataSourceError(
            f"{path}: data.subset={subset!r}, but this source has no subsets (a dir declares them in its README.md's "
            "`configs:`, as an HF dataset repo does); leave data.subset empty, or point data.path at the subset's files"
        )
    if path.is_file():
        yield from _file_rows(path, required, stats)
    elif path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            yield from _dataset_rows(_load_from_disk(path, split), str(path), required, stats)
            return
        files = _data_files(path, split)
        if not files:
            raise DataSourceError(
                f"{path}: no .jsonl / .parquet files and not a datasets.save_to_disk dir (no dataset_info.json)"
            )
        for f in files:
            yield from _file_rows(f, required, stats)
    elif isinstance(source, Path) or path.suffix in _DATA_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"data source {source}: no such file or directory")
    else:
        yield from _dataset_rows(_load_dataset(str(source), split, subset), str(source), required, stats)


def _file_rows(path: Path, required: list[str], stats: dict) -> Iterator[tuple[str, int, Any]]:
    stats["files"].append(str(path))
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path, required)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path, required)
    else:
        raise DataSourceError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl or .parquet")


def _jsonl_rows(path: Path, required: list[str]) -> Iterator[tuple[str, int, Any]]:
    first = True
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError as exc:
                row = BadRow(f"invalid JSON ({exc.msg} at column {exc.colno})")
            if first and isinstance(row, dict):
                first = False
                _check_columns(str(path), list(row), required)
            yield str(path), lineno, row


def _parquet_rows(path: Path, required: list[str]) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a corrupt or non-parquet file
        raise DataSourceError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    _check_columns(str(path), pf.schema_arrow.names, required)
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=_present(pf.schema_arrow.names, required)):
        for row in batch.to_pylist():
            n += 1
            yield str(path), n, row


def _present(names: Sequence[str], required: list[str]) -> list[str]:
    """Required columns plus the optional ones the source has (prompt_id, token ids)."""
    return [c for c in names if c in required or c == "prompt_id" or c in _TOKEN_ID_FIELDS]


def _dataset_rows(ds: Any, name: str, required: list[str], stats: dict) -> Iterator[tuple[str, int, Any]]:
    stats["files"].append(name)
    _check_columns(name, list(ds.column_names), required)
    ds = ds.select_columns(_present(ds.column_names, required))
    for i, row in enumerate(ds, start=1):
        yield name, i, row


def _check_columns(name: str, columns: Sequence[str], required: list[str]) -> None:
    for col in required:
        if col not in columns:
            raise DataSourceError(f"{name}: missing column {col!r} (columns: {', '.join(map(str, columns))})")


def _data_files(root: Path, split: str) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES)

    def in_split(p: Path) -> bool:
        return p.stem == split or p.stem.startswith(f"{split}-") or split in p.relative_to(root).parts[:-1]

    chosen = [p for p in files if in_split(p)]
    return chosen or files


def _load_from_disk(path: Path, split: str) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataSourceError(f"{path}: datasets.load_from_disk failed ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSourceError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds


def _declares_subsets(path: Path) -> bool:
    """Whether a dir is an HF dataset repo whose README.md metadata lists its subsets (``configs:``)."""
    import yaml
    from huggingface_hub import metadata_load

    readme = path / "README.md"
    if not readme.is_file():
        return False
    try:
        metadata = metadata_load(readme) or {}
    except yaml.YAMLError as exc:
        raise DataSourceError(f"{readme}: its metadata (the --- block at the top) is not YAML: {exc}") from None
    return bool(metadata.get("configs"))


def _load_dataset(name: str, split: str, subset: str) -> Any:
    """``datasets.load_dataset`` of a Hub name or a local repo clone; its own errors (a subset to pick, an unknown
    split) are kept in the message."""
    import datasets

    which = f"subset {subset!r}, split {split!r}" if subset else f"split {split!r}"
    try:
        return datasets.load_dataset(name, subset or None, split=split)
    except Exception as exc:  # offline: ConnectionError / OSError / DatasetNotFoundError, depending on the version
        if "Config name is missing" in str(exc):
            hint = "; set data.subset to one of them"
        elif Path(name).is_dir():
            hint = ""
        else:
            hint = (
                "; no such local file or dir either: offline (HF_HUB_OFFLINE=1), pass a .jsonl / .parquet file or a "
                "local dataset dir instead"
            )
        raise DataSourceError(
            f"could not load HF dataset {name!r} ({which}): {type(exc).__name__}: {' '.join(str(exc).split())}{hint}"
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# rows -> records


def _record(row: Any, fields: Mapping[str, str], *, default_id: str) -> PreferenceRecord:
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    for key, col in fields.items():
        if col not in row:
            raise BadRow(f"no {col!r} field ({key})")
    token_ids = _token_ids(row)
    return PreferenceRecord(
        prompt_id=str(row["prompt_id"]) if row.get("prompt_id") is not None else default_id,
        prompt=_message_text(row[fields["prompt"]], "user", fields["prompt"]),
        chosen=_message_text(row[fields["chosen"]], "assistant", fields["chosen"]),
        rejected=_message_text(row[fields["rejected"]], "assistant", fields["rejected"]),
        score_chosen=_score(row[fields["score_chosen"]], fields["score_chosen"]),
        score_rejected=_score(row[fields["score_rejected"]], fields["score_rejected"]),
        **token_ids,
    )


def _message_text(value: Any, role: str, col: str) -> str:
    """A plain string, or the last `role` message of a chat-format list (prompt: user, responses: assistant)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _last_message(value, role, col)
    raise BadRow(f"{col!r} must be a string or a message list, got {type(value).__name__}")


def _last_message(messages: list, role: str, col: str) -> str:
    for m in reversed(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise BadRow(f"{col!r}: every message needs 'role' and 'content', got {str(m)[:80]!r}")
        if m["role"] == role:
            content = m["content"]
            if content is None:
                return ""
            if not isinstance(content, str):
                raise BadRow(f"{col!r}: {role} message content must be a string, got {type(content).__name__}")
            return content
    raise BadRow(f"{col!r}: message list has no {role!r} message")


def _score(value: Any, col: str) -> float:
    """A float; None becomes NaN (dropped and counted like NaN); non-numbers are malformed rows."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRow(f"{col!r} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except ValueError:
        raise BadRow(f"{col!r} must be a number, got {value!r}") from None


def _token_ids(row: dict) -> dict[str, list[int] | None]:
    """The three token-id lists when the row has all of them as non-empty int lists, else all None."""
    values = [row.get(k) for k in _TOKEN_ID_FIELDS]
    ok = all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in values)
    return {k: (list(v) if ok else None) for k, v in zip(_TOKEN_ID_FIELDS, values)}


def _is_int(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


# ---------------------------------------------------------------------------------------------------------------------
# records -> token-id pairs


def to_train_pairs(
    records: Iterable[PreferenceRecord],
    tokenizer: Any,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    on_overlong: Literal["truncate", "skip"] = "truncate",
    use_record_token_ids: bool = True,
) -> tuple[list[Pair], dict[str, int]]:
    """Token-id pairs for the learner, as :class:`omni_ray.pairs.Pair` (scores are the records' raw scores).

    Conventions (those of the online loop, ``omni_ray.data.encode_prompt`` and the rollout workers):
    prompt = ``[bos_token_id] + encode(prompt, add_special_tokens=False)`` (no BOS when the tokenizer has none);
    response = ``encode(response, add_special_tokens=False) + [eos_token_id]``. Records that carry token ids (a run's
    ``pairs.jsonl``) are used as they are when ``use_record_token_ids``.

    Overlong (budgets count every token, BOS and EOS included):

    - ``truncate``: the prompt keeps BOS and its *last* tokens (the ones next to the response); a response keeps its
      first ``max_response_tokens`` tokens and then has no EOS, like a rollout completion that hit max_new_tokens;
    - ``skip``: the pair is dropped.

    Pairs whose chosen and rejected token ids end up identical are dropped. Stats: ``records``, ``pairs``,
    ``truncated_prompt``, ``truncated_response`` (responses, so up to 2 per pair), ``skipped_overlong``,
    ``skipped_identical``.
    """
    if on_overlong not in ("truncate", "skip"):
        raise ValueError(f"on_overlong must be 'truncate' or 'skip', got {on_overlong!r}")
    bos = tokenizer.bos_token_id
    if max_prompt_tokens < (2 if bos is not None else 1) or max_response_tokens < 1:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} / max_response_tokens={max_response_tokens} leave no room "
            "for content (the prompt budget includes BOS)"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: responses must end with EOS")
    prefix = [int(bos)] if bos is not None else []
    stats = {
        "records": 0,
        "pairs": 0,
        "truncated_prompt": 0,
        "truncated_response": 0,
        "skipped_overlong": 0,
        "skipped_identical": 0,
    }
    out: list[Pair] = []
    for rec in records:
        stats["records"] += 1
        if use_record_token_ids and rec.prompt_token_ids and rec.chosen_token_ids and rec.rejected_token_ids:
            p, c, r = list(rec.prompt_token_ids), list(rec.chosen_token_ids), list(rec.rejected_token_ids)
        else:
            p = prefix + tokenizer.encode(rec.prompt, add_special_tokens=False)
            c = tokenizer.encode(rec.chosen, add_special_tokens=False) + [int(eos)]
            r = tokenizer.encode(rec.rejected, add_special_tokens=False) + [int(eos)]
        overlong = len(p) > max_prompt_tokens, len(c) > max_response_tokens, len(r) > max_response_tokens
        if any(overlong):
            if on_overlong == "skip":
                stats["skipped_overlong"] += 1
                continue
            if overlong[0]:
                head = prefix if p[: len(prefix)] == prefix else []
                p = head + p[len(head) :][-(max_prompt_tokens - len(head)) :]
                stats["truncated_prompt"] += 1
            if overlong[1]:
                c = c[:max_response_tokens]
                stats["truncated_response"] += 1
            if overlong[2]:
                r = r[:max_response_tokens]
                stats["truncated_response"] += 1
        if c == r:
            stats["skipped_identical"] += 1
            continue
        out.append(
            Pair(
                prompt_id=rec.prompt_id,
                prompt=rec.prompt,
                prompt_token_ids=p,
                chosen=rec.chosen,
                rejected=rec.rejected,
                chosen_token_ids=c,
                rejected_token_ids=r,
                score_chosen=float(rec.score_chosen),
                score_rejected=float(rec.score_rejected),
            )
        )
    stats["pairs"] = len(out)
    return out, stats
