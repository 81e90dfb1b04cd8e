"""Prompt datasets (omni_ray/data/prompts.py): sources, the seeded round stream, eval hold-out, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni_ray.config import DataConfig, ScorerSpec
from omni_ray.data import Prompt
from omni_ray.data.arith import ArithTask
from omni_ray.data.preferences import DataSourceError
from omni_ray.data.prompts import PromptDataset
from omni_ray.scoring import ScoringService


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def math_rows(n: int) -> list[dict]:
    return [{"question": f"What is {i}+{i}?", "answer": f"{i} and {i} make\n#### {2 * i}"} for i in range(n)]


@pytest.fixture
def math_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "math.jsonl", math_rows(20))


def dataset(path: Path, **kw) -> PromptDataset:
    kw = {"prompt_column": "question", "answer_column": "answer", "eval_prompts": 4, **kw}
    return PromptDataset(path, **kw)


def ids(prompts: list[Prompt]) -> list[str]:
    return [p.prompt_id for p in prompts]


# ---------------------------------------------------------------------------------------------------------------------
# what a prompt carries


def test_jsonl_rows_become_prompts_with_references_and_row_ids(math_jsonl):
    ds = dataset(math_jsonl)
    assert ds.stats["rows"] == 20 and ds.stats["train"] == 16 and ds.stats["eval"] == 4 and ds.stats["bad_rows"] == 0
    (p,) = [p for p in ds.train_prompts(0, 16) if p.prompt_id == "train:7"]
    assert p == Prompt(prompt_id="train:7", text="What is 7+7?", reference="7 and 7 make\n#### 14")


def test_without_answer_column_prompts_have_no_reference(math_jsonl):
    ds = PromptDataset(math_jsonl, prompt_column="question", eval_prompts=2)
    assert all(p.reference is None for p in ds.train_prompts(0, 5) + ds.eval_prompts())


def test_numeric_references_are_kept_as_their_string(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", [{"q": f"q{i}", "a": i * 10} for i in range(5)])
    ds = PromptDataset(path, prompt_column="q", answer_column="a", eval_prompts=1)
    assert {p.text: p.reference for p in ds.train_prompts(0, 4)} | {p.text: p.reference for p in ds.eval_prompts()} == {
        f"q{i}": str(i * 10) for i in range(5)
    }


def test_arith_task_yields_the_shared_prompt_with_its_sum_as_reference():
    task = ArithTask(max_operand=9, seed=0, eval_size=5)
    for p in task.train_prompts(0, 20) + task.eval_prompts():
        assert isinstance(p, Prompt)
        a, b = p.text.rstrip("=").split("+")
        assert p.reference == str(int(a) + int(b))


# ---------------------------------------------------------------------------------------------------------------------
# the seeded stream: determinism, epochs, eval hold-out


def test_train_prompts_are_a_pure_function_of_seed_round_and_count(math_jsonl):
    a, b = dataset(math_jsonl, seed=3), dataset(math_jsonl, seed=3)
    assert a.train_prompts(5, 7) == b.train_prompts(5, 7)  # a resumed run rebuilds the dataset: same prompts
    assert a.train_prompts(5, 7) == a.train_prompts(5, 7)
    assert ids(a.train_prompts(0, 7)) != ids(a.train_prompts(1, 7))
    assert ids(a.train_prompts(0, 16)) != ids(dataset(math_jsonl, seed=4).train_prompts(0, 16))


@pytest.mark.parametrize("count", [4, 5, 16, 40])
def test_no_prompt_repeats_within_an_epoch_and_each_epoch_covers_every_row(math_jsonl, count):
    ds = dataset(math_jsonl)  # 16 training rows
    stream = [i for r in range(-(-48 // count)) for i in ids(ds.train_prompts(r, count))][:48]
    epochs = [stream[e * 16 : (e + 1) * 16] for e in range(3)]
    train_ids = set(ids(ds.train_prompts(0, 16)))
    for epoch in epochs:
        assert len(set(epoch)) == 16 and set(epoch) == train_ids
    assert epochs[0] != epochs[1]  # a fresh permutation per epoch


def test_eval_prompts_are_fixed_by_the_seed_and_never_trained_on(math_jsonl):
    ds = dataset(math_jsonl, seed=1)
    eval_ids = set(ids(ds.eval_prompts()))
    assert len(eval_ids) == 4 and ds.eval_prompts() == dataset(math_jsonl, seed=1).eval_prompts()
    trained = {i for r in range(10) for i in ids(ds.train_prompts(r, 7))}
    assert trained.isdisjoint(eval_ids) and len(trained) == 16
    assert set(ids(dataset(math_jsonl, seed=2).eval_prompts())) != eval_ids


def test_eval_split_of_a_saved_dataset_holds_out_that_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {
            "train": Dataset.from_list(math_rows(10)),
            "test": Dataset.from_list([{"question": f"t{i}", "answer": str(i)} for i in range(6)]),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    ds = dataset(tmp_path / "saved", eval_split="test", eval_prompts=3)
    assert len(ds.eval_prompts()) == 3 and all(i.startswith("test:") for i in ids(ds.eval_prompts()))
    assert sorted(ids(ds.train_prompts(0, 10))) == sorted(f"train:{i}" for i in range(10))
    with pytest.raises(DataSourceError, match=r"split 'test'.*6 usable prompts, fewer than data.eval_prompts=7"):
        dataset(tmp_path / "saved", eval_split="test", eval_prompts=7)


def test_eval_split_that_reads_the_training_file_again_is_refused(math_jsonl):
    with pytest.raises(DataSourceError, match=r"math\.jsonl.*eval_split 'test' reads the same files as split 'train'"):
        dataset(math_jsonl, eval_split="test")
    with pytest.raises(ValueError, match="eval_split must differ from split"):
        dataset(math_jsonl, eval_split="train")


def test_too_few_rows_for_the_eval_set_plus_one_training_prompt(math_jsonl):
    assert dataset(math_jsonl, eval_prompts=19).stats["train"] == 1
    with pytest.raises(DataSourceError, match=r"20 usable prompts, but data.eval_prompts=20 are held out"):
        dataset(math_jsonl, eval_prompts=20)


def test_from_config_reads_the_data_section(math_jsonl):
    cfg = DataConfig(
        source="prompts", path=str(math_jsonl), prompt_column="question", answer_column="answer", eval_prompts=5
    )
    ds = PromptDataset.from_config(cfg, seed=7)
    same = dataset(math_jsonl, eval_prompts=5, seed=7)
    assert ds.stats["eval"] == 5 and ds.train_prompts(2, 3) == same.train_prompts(2, 3)


def hub_clone(root: Path) -> Path:
    """A local clone of an HF dataset repo laid out like gsm8k's: two subsets, each its own folder, declared in the
    README.md's metadata."""
    for subset, split, n in (("main", "train", 10), ("main", "test", 5), ("socratic", "train", 8)):
        (root / subset).mkdir(parents=True, exist_ok=True)
        rows = [{"question": f"{subset} {split} {i}", "answer": str(i)} for i in range(n)]
        write_parquet(root / subset / f"{split}-00000-of-00001.parquet", rows)
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n"
        "- config_name: socratic\n  data_files:\n  - split: train\n    path: socratic/train-*\n---\n# gsm8k-like\n"
    )
    return root


def test_data_subset_reads_one_subset_of_a_hub_repo_clone(tmp_path, datasets_cache):
    repo = hub_clone(tmp_path / "gsm")
    cfg = DataConfig(source="prompts", path=str(repo), subset="main", split="train", eval_split="test",
                     prompt_column="question", answer_column="answer", eval_prompts=5)  # fmt: skip
    ds = PromptDataset.from_config(cfg, seed=0)
    assert ds.stats["train"] == 10 and ds.stats["eval"] == 5
    texts = {p.text for p in ds.train_prompts(0, 10) + ds.eval_prompts()}
    assert texts == {f"main train {i}" for i in range(10)} | {f"main test {i}" for i in range(5)}


def test_a_repo_clone_with_subsets_and_none_chosen_is_refused_naming_them(tmp_path, datasets_cache):
    repo = hub_clone(tmp_path / "gsm")
    with pytest.raises(DataSourceError, match=r"gsm.*Config name is missing.*'main', 'socratic'.*set data\.subset"):
        dataset(repo, eval_prompts=2)
    with pytest.raises(DataSourceError, match=r"subset 'nope'.*'main', 'socratic'"):
        dataset(repo, subset="nope", eval_prompts=2)


def test_a_repo_clone_whose_readme_metadata_is_not_yaml_is_refused_naming_the_readme(tmp_path):
    repo = hub_clone(tmp_path / "gsm")
    (repo / "README.md").write_text("---\nconfigs: [main\n---\n")
    with pytest.raises(DataSourceError, match=r"gsm/README\.md: its metadata .* is not YAML"):
        dataset(repo, subset="main")


def test_a_subset_of_a_source_without_subsets_is_refused(tmp_path, math_jsonl):
    with pytest.raises(DataSourceError, match=r"math\.jsonl: data\.subset='main', but this source has no subsets"):
        dataset(math_jsonl, subset="main")
    write_parquet(tmp_path / "train.parquet", math_rows(5))  # a dir of files, no README.md metadata
    with pytest.raises(DataSourceError, match="data.subset='main', but this source has no subsets"):
        dataset(tmp_path, subset="main", eval_prompts=1)


# ---------------------------------------------------------------------------------------------------------------------
# chat message lists and the chat template


CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Question {i}"},
            {"role": "assistant", "content": f"Answer {i}"},  # the dataset's answer: never part of the prompt
        ]
    }
    for i in range(4)
] + [{"messages": "A plain string prompt"}]


def toy_template(messages: list[dict[str, str]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_chat_lists_without_a_template_give_the_last_user_message(tmp_path):
    path = write_parquet(tmp_path / "chat.parquet", CHAT_ROWS[:4])
    ds = PromptDataset(path, prompt_column="messages", eval_prompts=1)
    assert sorted(p.text for p in ds.train_prompts(0, 3) + ds.eval_prompts()) == [f"Question {i}" for i in range(4)]


def test_chat_template_renders_the_conversation_up_to_the_last_user_turn(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    ds = PromptDataset(path, prompt_column="messages", eval_prompts=1, chat_template=toy_template)
    texts = {p.prompt_id: p.text for p in ds.train_prompts(0, 4) + ds.eval_prompts()}
    assert texts["train:2"] == "<system>Be brief.<user>Question 2<assistant>"
    assert texts["train:4"] == "<user>A plain string prompt<assistant>"  # strings are one user message


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_missing_column_names_the_file_the_column_and_the_columns_there_are(tmp_path, math_jsonl):
    with pytest.raises(DataSourceError, match=r"math\.jsonl: missing column 'problem' \(columns: question, answer\)"):
        PromptDataset(math_jsonl, prompt_column="problem")
    parquet = write_parquet(tmp_path / "m.parquet", math_rows(5))
    with pytest.raises(DataSourceError, match=r"m\.parquet: missing column 'solution' \(columns: question, answer\)"):
        PromptDataset(parquet, prompt_column="question", answer_column="solution", eval_prompts=1)


BAD_ROWS = [
    {"question": "ok 0", "answer": "0"},
    {"question": "   ", "answer": "1"},  # line 2: empty prompt
    {"question": 42, "answer": "2"},  # line 3: neither a string nor a message list
    "{not json",  # line 4
    {"question": [{"role": "assistant", "content": "hi"}], "answer": "4"},  # line 5: no user message
    {"question": "ok 5", "answer": ""},  # line 6: empty reference
    {"question": "ok 6", "answer": "6"},
    {"question": "ok 7", "answer": "7"},
]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (2, "empty prompt"),
        (3, "must be a string or a chat message list, got int"),
        (4, "invalid JSON"),
        (5, "no 'user' message"),
        (6, "empty or non-text reference answer in 'answer'"),
    ],
)
def test_a_bad_row_raises_naming_the_file_and_line(tmp_path, line, message):
    rows = [BAD_ROWS[0]] + [BAD_ROWS[line - 1]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataSourceError, match=rf"bad\.jsonl: line 2: .*{message}"):
        PromptDataset(path, prompt_column="question", answer_column="answer", eval_prompts=1)


def test_bad_rows_are_skipped_and_counted_when_asked_and_ids_keep_row_positions(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    ds = PromptDataset(path, prompt_column="question", answer_column="answer", eval_prompts=1, on_bad_row="skip")
    assert ds.stats["rows"] == 8 and ds.stats["bad_rows"] == 5 and ds.stats["train"] + ds.stats["eval"] == 3
    everything = {p.prompt_id: p.text for p in ds.train_prompts(0, 2) + ds.eval_prompts()}
    assert everything == {"train:0": "ok 0", "train:6": "ok 6", "train:7": "ok 7"}


# ---------------------------------------------------------------------------------------------------------------------
# references reach the verifier


def test_references_reach_the_math_verifier_through_the_scoring_service(math_jsonl):
    prompts = dataset(math_jsonl).train_prompts(0, 6)
    right = [f"So the total is \\boxed{{{int(p.reference.rsplit('#### ', 1)[1])}}}." for p in prompts]
    wrong = ["The answer is 1000." for _ in prompts]
    svc = ScoringService([ScorerSpec(type="math_verifier")])
    assert svc.needs_references
    texts, refs = [p.text for p in prompts] * 2, [p.reference for p in prompts] * 2
    res = svc.score(texts, right + wrong, refs)
    assert res.correct.tolist() == [True] * 6 + [False] * 6
    assert res.raw_scores.tolist() == [10.0] * 6 + [0.0] * 6


# ---------------------------------------------------------------------------------------------------------------------
# extra columns reach the scorers


def level_rows(n: int) -> list[dict]:
    return [{"question": f"q{i}", "answer": str(i), "level": 100 + i, "meta": {"src": f"s{i}"}} for i in range(n)]


def test_extra_columns_are_read_into_each_prompt_as_they_are(tmp_path):
    path = write_jsonl(tmp_path / "lv.jsonl", level_rows(6))
    ds = PromptDataset(path, prompt_column="question", answer_column="answer", extra_columns=["level", "meta"],
                       eval_prompts=1)  # fmt: skip
    for p in ds.train_prompts(0, 5) + ds.eval_prompts():
        i = int(p.prompt_id.split(":")[1])
        assert p.columns == {"level": 100 + i, "meta": {"src": f"s{i}"}} and p.reference == str(i)
    plain = PromptDataset(path, prompt_column="question", eval_prompts=1)
    assert all(p.columns == {} for p in plain.train_prompts(0, 5))


def test_from_config_passes_the_extra_columns(tmp_path):
    path = write_parquet(tmp_path / "lv.parquet", [{k: v for k, v in r.items() if k != "meta"} for r in level_rows(6)])
    cfg = DataConfig(source="prompts", path=str(path), prompt_column="question", extra_columns=["level"])
    cfg.eval_prompts = 2
    ds = PromptDataset.from_config(cfg, seed=0)
    assert sorted(p.columns["level"] for p in ds.train_prompts(0, 4) + ds.eval_prompts()) == list(range(100, 106))


def test_missing_extra_column_names_the_file_and_the_columns_there_are(tmp_path, math_jsonl):
    with pytest.raises(DataSourceError, match=r"math\.jsonl: missing column 'level' \(columns: question, answer\)"):
        PromptDataset(math_jsonl, prompt_column="question", extra_columns=["level"], eval_prompts=2)
    parquet = write_parquet(tmp_path / "m.parquet", math_rows(5))
    with pytest.raises(DataSourceError, match=r"m\.parquet: missing column 'level' \(columns: question, answer\)"):
        PromptDataset(parquet, prompt_column="question", extra_columns=["level"], eval_prompts=1)


def test_a_row_without_an_extra_column_is_a_bad_row(tmp_path):
    rows = level_rows(4)
    del rows[2]["level"]  # line 3; the first row has every column, so the file's columns check passes
    path = write_jsonl(tmp_path / "lv.jsonl", rows)
    with pytest.raises(DataSourceError, match=r"lv\.jsonl: line 3: no 'level' field \(data\.extra_columns\)"):
        PromptDataset(path, prompt_column="question", extra_columns=["level"], eval_prompts=1)
    ds = PromptDataset(path, prompt_column="question", extra_columns=["level"], eval_prompts=1, on_bad_row="skip")
    assert ds.stats["bad_rows"] == 1 and ds.stats["train"] + ds.stats["eval"] == 3


def test_references_and_extra_columns_reach_a_python_scorer_through_the_service(tmp_path):
    ds = PromptDataset(write_jsonl(tmp_path / "lv.jsonl", level_rows(8)), prompt_column="question",
                       answer_column="answer", extra_columns=["level"], eval_prompts=2)  # fmt: skip
    prompts = ds.train_prompts(0, 6)
    responses = [p.reference if i % 2 == 0 else "wrong" for i, p in enumerate(prompts)]
    svc = ScoringService([ScorerSpec(type="python", target="tests.scorers_for_tests:level_and_match", scale_high=200)])
    res = svc.score([p.text for p in prompts], responses, [p.reference for p in prompts],
                    {"level": [p.columns["level"] for p in prompts]})  # fmt: skip
    assert res.raw_scores.tolist() == [float(100 + int(p.reference)) for p in prompts]
    assert res.correct.tolist() == [True, False, True, False, True, False]
