"""The whole round loop on a local Ray cluster: every role a Ray actor, both rollout backends; 2 DeepSpeed ranks for the
run layout, one rank where a test is about the data (a rank's start-up is most of such a test's time)."""

from __future__ import annotations

import json

import pytest

from omni_ray.config import load_config
from tests.conftest import ONE_RANK, require_vllm


def _small_run(tmp_path, model_dir: str, backend: str, *extra: str):
    return load_config(
        "configs/local_tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"run.name=it_{backend}",
            "run.rounds=2",
            f"model.path={model_dir}",
            f"rollout.backend={backend}",
            "data.prompts_per_round=48",
            "data.eval_prompts=32",
            "rollout.samples_per_prompt=4",
            "learner.batch_size=16",
            "learner.epochs=1",
            *extra,
        ],
    )


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _read_when_written(path, marker: bytes, timeout_s: float = 30.0) -> bytes:
    """wandb-core can still be flushing its run file when `finish()` returns."""
    import time

    deadline = time.monotonic() + timeout_s
    while marker not in (data := path.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return data


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_two_round_pipeline_writes_the_run_layout(ray_local, tmp_path, tiny_model_dir, backend):
    if backend == "vllm":
        require_vllm()
    from omni_ray.driver import train

    cfg = _small_run(tmp_path, tiny_model_dir, backend, "logging.wandb.mode=offline")
    summary = train(cfg)
    run = tmp_path / f"it_{backend}"
    assert summary["rounds_completed"] == 2
    assert summary["rollout_backend"] == backend
    assert 0.0 <= summary["final_eval"]["accuracy"] <= 1.0
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 2
    assert (run / "config.yaml").read_text().count("rounds: 2") == 1
    records = _read_jsonl(run / "metrics.jsonl")
    kinds = [r["kind"] for r in records]
    assert kinds.count("round") == 2 and kinds.count("step") >= 2
    # Busy time measured inside every role's actors, for every stage, within the round's wall time.
    stages = ("generate", "score", "sync", "reference", "train")
    for row in (r for r in records if r["kind"] == "round"):
        assert all(0.0 < row[f"busy_{s}"] < row["time_round"] for s in stages), row
        assert row["busy_generate"] <= row["time_generate"] + row["time_eval"]  # eval generates too
    assert set(stages) <= set(summary["busy_s"])
    for r in (1, 2):
        pairs = _read_jsonl(run / "rounds" / f"round_{r:04d}" / "pairs.jsonl")
        assert pairs, "every round with samples writes its pairs"
        for p in pairs:
            assert {"prompt_id", "chosen", "rejected", "score_chosen", "score_rejected", "margin"} <= set(p)
            assert p["score_chosen"] > p["score_rejected"]
            assert p["prompt_id"].startswith(f"r{r - 1}:")
        ckpt = run / "checkpoints" / f"round_{r:04d}"
        assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
        assert (ckpt / "tokenizer.json").is_file()
    # What W&B holds of it (offline run; its protobuf file keeps keys as plain bytes): the optimizer's lr and gradient
    # norm per step, generation speed and every pair-drop reason per round.
    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    data = _read_when_written(wandb_file, b"round/pairs_dropped_all_tied")
    for key in (b"step/lr", b"step/grad_norm", b"round/generate_tokens_per_s", b"round/pairs_dropped_all_tied",
                b"round/pairs_dropped_min_gap", b"round/eval_reward_mean"):  # fmt: skip
        assert key in data, key
    # Different prompts each round: the prompt stream moves on.
    ids = [{p["prompt_id"] for p in _read_jsonl(run / "rounds" / f"round_{r:04d}" / "pairs.jsonl")} for r in (1, 2)]
    assert not ids[0] & ids[1]


@pytest.mark.integration
def test_nan_scores_are_dropped_and_a_round_without_pairs_is_skipped_not_fatal(ray_local, tmp_path, tiny_model_dir):
    from omni_ray.config import ScorerSpec, validate
    from omni_ray.driver import train

    cfg = _small_run(tmp_path, tiny_model_dir, "hf", "run.rounds=1", "run.name=it_nan", ONE_RANK)
    cfg.scoring.scorers = [ScorerSpec(type="python", target="tests.scorers_for_tests:nan_or_constant")]
    validate(cfg)
    summary = train(cfg)
    assert summary["rounds_completed"] == 1
    (round_line,) = [r for r in _read_jsonl(tmp_path / "it_nan" / "metrics.jsonl") if r["kind"] == "round"]
    assert round_line["skipped"] is True and round_line["pairs_kept"] == 0
    assert round_line["nonfinite_scores"] > 0
    assert round_line["pairs_dropped_nonfinite_samples"] == round_line["nonfinite_scores"]
    assert (tmp_path / "it_nan" / "rounds" / "round_0001" / "pairs.jsonl").read_text() == ""
    # Every JSON file of the run parses with a strict parser (NaN / Infinity refused): the NaN scores and the
    # accuracy nobody reported are null, with the reason next to it.
    files = [p for p in (tmp_path / "it_nan").rglob("*") if p.suffix in (".json", ".jsonl")]
    assert {p.name for p in files} >= {"summary.json", "metrics.jsonl", "driver_state.json", "manifest.json"}
    for path in files:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            _strict(line)
    summary = _strict((tmp_path / "it_nan" / "summary.json").read_text())
    assert summary["final_eval"]["accuracy"] is None and "correct" in summary["final_eval"]["accuracy_reason"]


def test_model_dir_without_tokenizer_is_a_clear_error(tmp_path):
    from omni_ray.driver import ensure_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = load_config(None, [f"model.path={tmp_path / 'm'}"])
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        ensure_model(cfg)
    cfg = load_config(None, [f"model.path={tmp_path / 'missing'}", "model.build_tiny_if_missing=false"])
    with pytest.raises(FileNotFoundError, match="missing"):
        ensure_model(cfg)


def _offline_prefs(tmp_path):
    """40 scored pairs and one with an empty chosen response (dropped and counted)."""
    rows = [
        {"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 3), "score_chosen": 10.0,
         "score_rejected": 10.0 * 2.718 ** -0.3}
        for a in range(40)
    ]  # fmt: skip
    rows.append({"prompt": "1+1=", "chosen": "", "rejected": "3", "score_chosen": 9.0, "score_rejected": 1.0})
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


@pytest.mark.integration
def test_offline_preference_file_trains_through_the_same_learner_group(ray_local, tmp_path, tiny_model_dir):
    from omni_ray.driver import train

    data = _offline_prefs(tmp_path)
    cfg = _small_run(tmp_path, tiny_model_dir, "hf", "run.rounds=1", "run.name=offline", ONE_RANK,
                     "data.source=preferences", f"data.path={data}", "loss.name=omni_dpo")  # fmt: skip
    summary = train(cfg)
    assert summary["rounds_completed"] == 1
    (round_line,) = [r for r in _read_jsonl(tmp_path / "offline" / "metrics.jsonl") if r["kind"] == "round"]
    assert round_line["pairs_kept"] == 40 and round_line["data_empty_response"] == 1
    pairs = _read_jsonl(tmp_path / "offline" / "rounds" / "round_0001" / "pairs.jsonl")
    assert {p["chosen"] for p in pairs} == {str(2 * a) for a in range(40)}
    assert (tmp_path / "offline" / "checkpoints" / "round_0001" / "model.safetensors").is_file()


def test_offline_preference_set_is_read_and_tokenized_once_for_every_round(tmp_path, tiny_model_dir, monkeypatch):
    import omni_ray.data.preferences as preferences
    from omni_ray.driver.loop import Driver
    from omni_ray.driver.record import RoundRecord

    reads = []
    read = preferences.load_preference_pairs
    monkeypatch.setattr(preferences, "load_preference_pairs", lambda *a, **kw: reads.append(a) or read(*a, **kw))
    cfg = _small_run(tmp_path, tiny_model_dir, "hf", "run.name=offline_once", "data.source=preferences",
                     f"data.path={_offline_prefs(tmp_path)}")  # fmt: skip
    driver = Driver(cfg)  # no roles started: the offline set is the driver's own
    try:
        records = [RoundRecord(round=r) for r in (1, 2)]
        sampled = [driver._offline_pairs(rec) for rec in records]
    finally:
        driver.close()
    assert len(reads) == 1 and sampled[0] is sampled[1] and len(sampled[0]) == 40
    assert all(rec.sampling["pairs_kept"] == 40 and rec.data_counts["empty_response"] == 1 for rec in records)


@pytest.mark.integration
def test_prompt_dataset_source_feeds_reference_answers_to_the_math_verifier(ray_local, tmp_path, tiny_model_dir):
    """data.source=prompts: online rounds on a jsonl of prompts with reference answers, scored by math_verifier
    (the Qwen2.5-Math config's path, at tiny scale); over-long prompts are skipped and counted."""
    from omni_ray.config import ScorerSpec, validate
    from omni_ray.driver import train

    rows = [{"question": f"{a}+{b}=", "answer": f"#### {a + b}"} for a in range(30) for b in range(0, 30, 3)]
    # Rows whose reference is NOT the sum: the verifier must judge against the reference, not the arithmetic.
    rows += [{"question": f"{a}+{a}=", "answer": f"#### {2 * a + 1}"} for a in range(40, 60)]
    long_prompt = "1" * 40 + "+1="
    rows.append({"question": long_prompt, "answer": "#### 0"})  # longer than max_prompt_tokens
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _small_run(tmp_path, tiny_model_dir, "hf", "run.rounds=2", "run.name=prompts", ONE_RANK,
                     "data.source=prompts", f"data.path={data}", "data.prompt_column=question",
                     "data.answer_column=answer", "data.eval_prompts=40", "data.prompts_per_round=140",
                     "data.max_prompt_tokens=20", "data.on_overlong=skip", "run.dump_rollouts=true")  # fmt: skip
    cfg.scoring.scorers = [ScorerSpec(type="math_verifier")]
    validate(cfg)
    summary = train(cfg)
    assert summary["rounds_completed"] == 2
    rounds = [r for r in _read_jsonl(tmp_path / "prompts" / "metrics.jsonl") if r["kind"] == "round"]
    assert 0.0 <= summary["initial_eval"]["accuracy"] <= 1.0
    assert all(0.0 <= r["sample_accuracy"] <= 1.0 for r in rounds)
    # The long prompt is skipped exactly as often as the dataset hands it out in these two rounds.
    from omni_ray.data.prompts import PromptDataset

    ds = PromptDataset.from_config(cfg.data, seed=cfg.run.seed)
    handed_out = sum(p.text == long_prompt for r in (0, 1) for p in ds.train_prompts(r, 140))
    assert [r["prompts_skipped"] for r in rounds] == [
        sum(p.text == long_prompt for p in ds.train_prompts(r, 140)) for r in (0, 1)
    ] and sum(r["prompts_skipped"] for r in rounds) == handed_out
    assert all(r["pairs_kept"] > 0 for r in rounds)
    shifted = {f"{a}+{a}=": str(2 * a + 1) for a in range(40, 60)}
    judged = [s for r in (1, 2) for s in _read_jsonl(tmp_path / "prompts" / "rounds" / f"round_{r:04d}" /
                                                     "samples.jsonl")
              if s["prompt"] in shifted and s["response"].strip().isdigit()]  # fmt: skip
    assert judged, "some plain-number samples of the shifted rows must be drawn"
    for s in judged:
        assert s["correct"] == (s["response"].strip() == shifted[s["prompt"]]), s
    ids = [{p["prompt_id"] for p in _read_jsonl(tmp_path / "prompts" / "rounds" / f"round_{r:04d}" / "pairs.jsonl")}
           for r in (1, 2)]  # fmt: skip
    assert not ids[0] & ids[1], "no prompt repeats within an epoch"


@pytest.mark.integration
def test_async_pipeline_samples_each_round_one_policy_version_behind(ray_local, tmp_path, tiny_model_dir):
    """pipeline.mode=async: round r+1 is generated and scored while round r trains, so from round 2 on every pair
    comes from the policy before the previous round's update (policy_lag 1), and the run still completes."""
    from omni_ray.driver import train

    cfg = _small_run(tmp_path, tiny_model_dir, "hf", "run.rounds=3", "run.name=async", "pipeline.mode=async",
                     ONE_RANK)  # fmt: skip
    summary = train(cfg)
    assert summary["rounds_completed"] == 3
    rounds = [r for r in _read_jsonl(tmp_path / "async" / "metrics.jsonl") if r["kind"] == "round"]
    assert [r["policy_lag"] for r in rounds] == [0, 1, 1]
    assert [r["policy_version_sampled"] for r in rounds] == [0, 0, 1]
    for r, version in ((1, 0), (2, 0), (3, 1)):
        pairs = _read_jsonl(tmp_path / "async" / "rounds" / f"round_{r:04d}" / "pairs.jsonl")
        assert pairs and {p["policy_version"] for p in pairs} == {version}
        assert all(p["prompt_id"].startswith(f"r{r - 1}:") for p in pairs)


def test_actor_env_caps_the_onednn_kernel_cache_unless_the_user_set_it(monkeypatch):
    from omni_ray.driver import actor_env

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert actor_env()["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    assert actor_env()["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"
