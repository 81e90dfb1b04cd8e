"""Offline preference data: every source kind, both row schemas, bad input refused or counted, tokenization."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from omni_ray.data import encode_prompt
from omni_ray.data.preferences import PreferenceDataError, PreferenceRecord, load_preference_pairs, to_train_pairs
from omni_ray.models.tiny import build_tokenizer


def _chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


ROWS = [  # the UltraFeedback-binarized schema (chat lists) and plain strings, mixed
    {"prompt": "1+2=", "chosen": _chat("1+2=", "3"), "rejected": _chat("1+2=", "4"), "score_chosen": 9.0,
     "score_rejected": 2.0},
    {"prompt": "10+5=", "chosen": "15", "rejected": "51", "score_chosen": 8.5, "score_rejected": 1.5},
    {"prompt": "7+7=", "chosen": _chat("7+7=", "14"), "rejected": "41", "score_chosen": 7, "score_rejected": 7},
]  # fmt: skip


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _texts(records: list[PreferenceRecord]) -> list[tuple[str, str, str]]:
    return [(r.prompt, r.chosen, r.rejected) for r in records]


EXPECTED = [("1+2=", "3", "4"), ("10+5=", "15", "51"), ("7+7=", "14", "41")]


def test_jsonl_reads_chat_and_plain_string_rows(tmp_path):
    records, stats = load_preference_pairs(_write_jsonl(tmp_path / "p.jsonl", ROWS))
    assert _texts(records) == EXPECTED
    assert [(r.score_chosen, r.score_rejected) for r in records] == [(9.0, 2.0), (8.5, 1.5), (7.0, 7.0)]
    assert records[0].prompt_id == "p.jsonl:1" and records[0].prompt_token_ids is None
    assert stats["records"] == stats["rows"] == 3 and stats["nonpositive_gap"] == 1  # the tie is kept, counted


def _uniform(rows: list[dict], chat: bool) -> list[dict]:
    """The rows with every response as a chat list (chat) or a plain string: a parquet column has one type."""

    def conv(r: dict, k: str):
        text = r[k] if isinstance(r[k], str) else r[k][-1]["content"]
        return _chat(r["prompt"], text) if chat else text

    return [{**r, "chosen": conv(r, "chosen"), "rejected": conv(r, "rejected")} for r in rows]


def test_parquet_file_and_dir_of_files_read_the_same_records(tmp_path):
    import pandas as pd

    pd.DataFrame(_uniform(ROWS, chat=True)).to_parquet(tmp_path / "chat.parquet")
    assert _texts(load_preference_pairs(tmp_path / "chat.parquet")[0]) == EXPECTED
    d = tmp_path / "data"
    d.mkdir()
    pd.DataFrame(_uniform(ROWS[:2], chat=False)).to_parquet(d / "train-00000-of-00002.parquet")
    _write_jsonl(d / "train-00001-of-00002.jsonl", ROWS[2:])
    _write_jsonl(d / "test.jsonl", ROWS[:1])  # another split: not read
    records, stats = load_preference_pairs(d, split="train")
    assert _texts(records) == EXPECTED and len(stats["files"]) == 2


def test_saved_dataset_dir_is_read_by_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(_uniform(ROWS, chat=True))}).save_to_disk(
        str(tmp_path / "ds")
    )
    records, _ = load_preference_pairs(tmp_path / "ds", split="train_prefs")
    assert _texts(records) == EXPECTED
    with pytest.raises(PreferenceDataError, match="no split 'train'.*train_prefs"):
        load_preference_pairs(tmp_path / "ds")


def test_malformed_jsonl_row_error_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "", '{"prompt": "2+2=", "chosen": ', ROWS[1]])
    with pytest.raises(PreferenceDataError, match=r"bad\.jsonl: line 3: invalid JSON"):
        load_preference_pairs(path)
    records, stats = load_preference_pairs(path, on_bad_row="skip")
    assert len(records) == 2 and stats["bad_rows"] == 1 and stats["rows"] == 3  # the blank line is not a row


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**ROWS[1], "chosen": 5}, "'chosen' must be a string or a message list"),
        ({**ROWS[1], "rejected": [{"role": "user", "content": "x"}]}, "no 'assistant' message"),
        ({**ROWS[1], "score_chosen": "high"}, "'score_chosen' must be a number"),
        ({k: v for k, v in ROWS[1].items() if k != "rejected"}, "no 'rejected' field"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_row_error_names_line_and_reason(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "p.jsonl", [ROWS[0], row])
    with pytest.raises(PreferenceDataError, match=rf"p\.jsonl: line 2: .*{message}"):
        load_preference_pairs(path)


def test_missing_column_error_names_column_and_file(tmp_path):
    import pandas as pd

    no_scores = [{k: v for k, v in r.items() if k != "score_rejected"} for r in ROWS[1:]]
    with pytest.raises(PreferenceDataError, match=r"nos\.jsonl: missing column 'score_rejected'"):
        load_preference_pairs(_write_jsonl(tmp_path / "nos.jsonl", no_scores))
    pd.DataFrame(_uniform(no_scores, chat=False)).to_parquet(tmp_path / "nos.parquet")
    with pytest.raises(PreferenceDataError, match=r"nos\.parquet: missing column 'score_rejected'"):
        load_preference_pairs(tmp_path / "nos.parquet")
    # custom field names are what is required
    renamed = [{("question" if k == "prompt" else k): v for k, v in r.items()} for r in ROWS]
    path = _write_jsonl(tmp_path / "q.jsonl", renamed)
    assert len(load_preference_pairs(path, prompt_field="question")[0]) == 3
    with pytest.raises(PreferenceDataError, match="missing column 'prompt'"):
        load_preference_pairs(path)


def test_empty_texts_and_nonfinite_scores_are_skipped_and_counted(tmp_path):
    rows = [
        ROWS[1],
        {**ROWS[1], "prompt": "   "},
        {**ROWS[1], "chosen": ""},
        {**ROWS[0], "rejected": _chat("1+2=", "")},
        {**ROWS[1], "score_chosen": float("nan")},
        {**ROWS[1], "score_rejected": None},
        {**ROWS[1], "score_rejected": float("-inf")},
    ]
    records, stats = load_preference_pairs(_write_jsonl(tmp_path / "p.jsonl", rows))
    assert len(records) == 1
    assert (stats["empty_prompt"], stats["empty_response"], stats["nonfinite_score"]) == (1, 2, 3)
    assert stats["rows"] == 7
    assert all(math.isfinite(r.score_chosen) and math.isfinite(r.score_rejected) for r in records)


def test_min_gap_drops_and_counts_and_limit_stops_early(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", ROWS)
    records, stats = load_preference_pairs(path, min_gap=0.5)
    assert len(records) == 2 and stats["below_min_gap"] == 1
    assert len(load_preference_pairs(path, limit=1)[0]) == 1


def test_no_usable_rows_missing_file_and_unknown_suffix_are_clear_errors(tmp_path):
    with pytest.raises(PreferenceDataError, match="no usable preference pairs"):
        load_preference_pairs(_write_jsonl(tmp_path / "e.jsonl", [{**ROWS[1], "chosen": ""}]))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(PreferenceDataError, match="unsupported file type '.csv'"):
        load_preference_pairs(tmp_path / "x.csv")


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(PreferenceDataError, match="could not load HF dataset 'no-such-org/no-such-prefs'.*local"):
        load_preference_pairs("no-such-org/no-such-prefs", split="train_prefs")


def test_data_subset_reads_that_subset_of_a_repo_clone_and_names_it_offline(tmp_path, monkeypatch, datasets_cache):
    import pandas as pd

    repo = tmp_path / "prefs"
    for subset, rows in (("clean", ROWS), ("noisy", ROWS[:1])):
        (repo / subset).mkdir(parents=True)
        pd.DataFrame(_uniform(rows, chat=False)).to_parquet(repo / subset / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: clean\n  data_files: clean/*\n- config_name: noisy\n  data_files: noisy/*\n---\n"
    )
    records, stats = load_preference_pairs(repo, subset="clean")
    assert _texts(records) == EXPECTED and stats["files"] == [str(repo)]
    assert len(load_preference_pairs(repo, subset="noisy")[0]) == 1
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(PreferenceDataError, match=r"'no-such-org/no-such-prefs' \(subset 'main', split 'train'\)"):
        load_preference_pairs("no-such-org/no-such-prefs", subset="main")


def test_run_pairs_jsonl_keeps_its_token_ids(tmp_path):
    row = {**ROWS[1], "prompt_id": "r0:1", "prompt_token_ids": [1, 5, 4], "chosen_token_ids": [2],
           "rejected_token_ids": [9, 9], "chosen": ""}  # fmt: skip
    records, stats = load_preference_pairs(_write_jsonl(tmp_path / "pairs.jsonl", [row]))
    assert stats["empty_response"] == 0  # decodes to "" but is a real [EOS] response
    assert records[0].prompt_id == "r0:1" and records[0].chosen_token_ids == [2]
    pairs, _ = to_train_pairs(records, build_tokenizer(), max_prompt_tokens=16, max_response_tokens=16)
    assert (pairs[0].prompt_token_ids, pairs[0].chosen_token_ids, pairs[0].rejected_token_ids) == (
        [1, 5, 4],
        [2],
        [9, 9],
    )


def _rec(prompt: str, chosen: str, rejected: str) -> PreferenceRecord:
    return PreferenceRecord("id", prompt, chosen, rejected, 8.0, 3.0)


def test_to_train_pairs_uses_the_bos_prompt_and_eos_response_convention():
    tok = build_tokenizer()
    pairs, stats = to_train_pairs([_rec("12+3=", "15", "16")], tok, max_prompt_tokens=16, max_response_tokens=8)
    p = pairs[0]
    assert p.prompt_token_ids == encode_prompt(tok, "12+3=")
    assert p.chosen_token_ids == tok.encode("15", add_special_tokens=False) + [tok.eos_token_id]
    assert p.rejected_token_ids[-1] == tok.eos_token_id
    assert (p.score_chosen, p.score_rejected, p.gap) == (8.0, 3.0, 5.0)
    assert stats == {**stats, "pairs": 1, "truncated_prompt": 0, "truncated_response": 0}


def test_overlong_pairs_are_truncated_keeping_bos_and_prompt_end_or_skipped():
    tok = build_tokenizer()
    rec = _rec("123456789+1=", "1234567890", "9")
    pairs, stats = to_train_pairs([rec], tok, max_prompt_tokens=5, max_response_tokens=4)
    p = pairs[0]
    assert p.prompt_token_ids == [tok.bos_token_id] + tok.encode("9+1=", add_special_tokens=False)
    assert p.chosen_token_ids == tok.encode("1234", add_special_tokens=False)  # cut: no EOS, like max_new_tokens
    assert p.rejected_token_ids == tok.encode("9", add_special_tokens=False) + [tok.eos_token_id]
    assert (stats["truncated_prompt"], stats["truncated_response"], stats["skipped_overlong"]) == (1, 1, 0)
    pairs, stats = to_train_pairs(
        [rec, _rec("1+1=", "2", "3")], tok, max_prompt_tokens=5, max_response_tokens=4, on_overlong="skip"
    )
    assert len(pairs) == 1 and stats["skipped_overlong"] == 1 and stats["records"] == 2


def test_pairs_identical_after_truncation_are_dropped_and_counted():
    pairs, stats = to_train_pairs(
        [_rec("1+1=", "22222", "22223")], build_tokenizer(), max_prompt_tokens=8, max_response_tokens=3
    )
    assert pairs == [] and stats["skipped_identical"] == 1
