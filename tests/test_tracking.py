"""Metrics sinks read back: metrics.jsonl, an offline W&B run, TensorBoard event files."""

from __future__ import annotations

import json
import time

import pytest

from omni_ray.config import load_config
from omni_ray.tracking import BusyClock, Tracker, busy_between, read_records


def _exercise(tracker: Tracker) -> None:
    tracker.log("step", {"round": 1, "loss": 0.5, "w_perf": 0.3, "step": 1}, step=1)
    tracker.log("step", {"round": 1, "loss": 0.4, "w_perf": 0.2, "step": 2}, step=2)
    tracker.log_distributions(
        {"w_perf": [0.1, 0.2, 0.3], "w_qual": [0.9, 0.95], "margin": []},
        [{"prompt_id": "r0:0", "prompt": "1+1=", "chosen": "2", "rejected": "7", "score_chosen": 10.0,
          "score_rejected": 6.1, "margin": 0.2}],
        step=2,
    )  # fmt: skip
    tracker.log("round", {"round": 1, "eval_accuracy": 0.42, "pairs_kept": 3, "skipped": False}, step=2)


def test_metrics_jsonl_has_a_kind_per_line_and_booleans_are_kept(tmp_path):
    cfg = load_config(None, ["logging.wandb.mode=disabled"])
    tracker = Tracker(tmp_path, cfg.logging, {}, "t")
    _exercise(tracker)
    tracker.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["step", "step", "round"]
    assert lines[-1]["eval_accuracy"] == 0.42 and lines[-1]["skipped"] is False


def _read_when_written(path, marker: bytes, timeout_s: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    while marker not in (data := path.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return data


def test_offline_wandb_run_records_scalars_histograms_and_the_sample_table(tmp_path):
    cfg = load_config(None, ["logging.wandb.mode=offline", "logging.wandb.project=omni-ray-test"])
    tracker = Tracker(tmp_path, cfg.logging, {"loss": {"beta": 2.0}}, "t")
    run_id = tracker.wandb_run_id
    _exercise(tracker)
    tracker.close()
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    # wandb 0.31 has no public reader for offline runs; the run file is protobuf, whose keys and JSON values are
    # stored as plain bytes, so reading them back this way checks what was recorded. wandb-core's writer can still
    # be flushing it when finish() returns (seen on a loaded machine: the header alone, the records a moment later).
    data = _read_when_written(run_dir / f"run-{run_id}.wandb", b"step/loss")
    for key in (b"step/loss", b"round/eval_accuracy", b"dist/w_perf", b"samples/pairs", b"beta"):
        assert key in data, key
    assert b"dist/margin" not in data  # empty distributions are not logged
    (table,) = (run_dir / "files" / "media" / "table").rglob("*.table.json")
    body = json.loads(table.read_text())
    assert body["columns"][:2] == ["prompt_id", "prompt"] and body["data"][0][2] == "2"


def test_resuming_with_the_saved_id_continues_the_same_wandb_run(tmp_path):
    cfg = load_config(None, ["logging.wandb.mode=offline"])
    first = Tracker(tmp_path, cfg.logging, {}, "t")
    run_id = first.wandb_run_id
    first.close()
    second = Tracker(tmp_path, cfg.logging, {}, "t", wandb_run_id=run_id)
    assert second.wandb_run_id == run_id
    second.close()


def test_tensorboard_sink_writes_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, ["logging.tensorboard=true"])
    tracker = Tracker(tmp_path, cfg.logging, {}, "t")
    _exercise(tracker)
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("step/loss")] == pytest.approx([0.5, 0.4])
    assert "dist/w_perf" in acc.Tags()["histograms"]


@pytest.mark.parametrize("mode", ["always", "never"])
def test_progress_bar_names_the_stage_and_keeps_the_round_table(tmp_path, capsys, mode):
    cfg = load_config(None, ["logging.wandb.mode=disabled", f"logging.progress={mode}"])
    tracker = Tracker(tmp_path, cfg.logging, {}, "t")
    tracker.start_progress(rounds=3, done=1)
    tracker.stage(2, "train (512 pairs)")
    tracker.round_row({"round": 2, "eval_accuracy": 0.5})
    tracker.close()
    out, err = capsys.readouterr()
    assert "acc" in out and "0.500" in out  # the round table is printed either way
    assert ("round 2: train (512 pairs)" in err) == (mode == "always")
    assert ("1/3" in err) == (mode == "always")  # resumed runs start the bar at the rounds already done


def test_progress_auto_draws_no_bar_when_stdout_is_not_a_terminal(tmp_path, capsys):
    cfg = load_config(None, ["logging.wandb.mode=disabled"])
    tracker = Tracker(tmp_path, cfg.logging, {}, "t")
    tracker.start_progress(rounds=3, done=0)
    tracker.stage(1, "generate + score")
    tracker.close()
    assert "generate" not in capsys.readouterr().err


def test_busy_clock_accumulates_per_stage_and_counts_a_call_that_raised():
    clock = BusyClock()
    with clock.timing("generate"):
        sum(range(10_000))
    with pytest.raises(RuntimeError), clock.timing("generate"):
        raise RuntimeError("engine died")
    with clock.timing("sync"):
        pass
    first = clock.totals()
    assert set(first) == {"generate", "sync"} and first["generate"] > 0.0
    with clock.timing("generate"):
        sum(range(10_000))
    assert clock.totals()["generate"] > first["generate"] and clock.totals()["sync"] == first["sync"]


def test_busy_between_takes_the_slowest_actor_per_stage_and_restarts_from_zero():
    before = [{"generate": 10.0, "sync": 1.0}, {"generate": 4.0}, {}]
    after = [{"generate": 13.0, "sync": 1.5}, {"generate": 2.5}, {"score": 0.7}]
    # worker 0: 3.0 s; worker 1 went back (restarted): its new 2.5 s; the scorer's first read counts whole.
    assert busy_between(before, after) == {"generate": 3.0, "sync": 0.5, "score": 0.7}
    with pytest.raises(ValueError):
        busy_between(before, after[:2])


def test_read_records_returns_the_tracker_lines_in_order_filtered_by_kind(tmp_path):
    cfg = load_config(None, [])
    tracker = Tracker(tmp_path, cfg.logging, {}, "t")
    tracker.log("step", {"loss": 0.5}, step=1)
    tracker.log("round", {"round": 1, "eval_accuracy": 0.4}, step=1)
    tracker.log("step", {"loss": 0.4}, step=2)
    tracker.close()
    path = tmp_path / "metrics.jsonl"
    assert [r["kind"] for r in read_records(path)] == ["step", "round", "step"]
    assert [r["loss"] for r in read_records(path, "step")] == [0.5, 0.4]
    assert read_records(tmp_path / "missing.jsonl") == []
