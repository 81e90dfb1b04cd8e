"""Exact resume: a driver killed with SIGKILL during round 2 and rerun with `run.resume=auto` trains on exactly the
prompts, in the same order, and to exactly the pairs of an uninterrupted run of the same seed; a truncated checkpoint
is detected and the previous one used, with a message saying so.

The killed run is a real `omni-ray train` process with its own local Ray cluster (started by the driver), so SIGKILL
to its process group takes the driver and the cluster down together, as a preempted node would. The other runs
(uninterrupted, resumed) train in-process on the tests' cluster: the same `train` the command line calls, without a
process and a cluster to start each time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ONE_RANK

ROUNDS = 2
CONFIG = "configs/local_tiny.yaml"


def _overrides(out: Path, model_dir: str, name: str, *extra: str) -> list[str]:
    return [
        f"run.output_dir={out}", f"run.name={name}", f"run.rounds={ROUNDS}", f"model.path={model_dir}",
        "data.prompts_per_round=64", "data.eval_prompts=32", "rollout.samples_per_prompt=4",
        "learner.batch_size=16", "learner.epochs=1", "ray.num_cpus=2", "logging.wandb.mode=offline",
        # HF generate and one learner rank: what resume must restore here is the driver's state and the seeds, whatever
        # the engine and the rank count; each backend's seeded sampling is tested on its own (test_rollout.py), and a
        # learner state saved on 2 ranks resumes to identical training in test_learner.py.
        "rollout.backend=hf", ONE_RANK, *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    """The test process' environment, less the W&B service that the in-process runs started: the killed run is its
    own process and starts its own."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


def _pairs(run: Path, r: int) -> list[dict]:
    keys = ("prompt_id", "chosen", "rejected", "score_chosen", "score_rejected")
    lines = (run / "rounds" / f"round_{r:04d}" / "pairs.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in keys} for line in lines]


def _round_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "round"]


def _config(out: Path, model_dir: str, name: str, *extra: str):
    from omni_ray.config import load_config

    return load_config(CONFIG, _overrides(out, model_dir, name, *extra))


def _train(capsys, out: Path, model_dir: str, name: str, *extra: str) -> str:
    """`omni-ray train` in this process, on the tests' cluster; returns what it printed."""
    from omni_ray.driver import train

    capsys.readouterr()
    train(_config(out, model_dir, name, *extra))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory, tiny_model_dir) -> Path:
    from omni_ray.driver import train

    out = tmp_path_factory.mktemp("runs")
    train(_config(out, tiny_model_dir, "straight"))
    return out / "straight"


@pytest.mark.integration
def test_run_killed_in_round_two_resumes_to_the_same_prompts_and_pairs(uninterrupted, tmp_path, tiny_model_dir,
                                                                       capsys):  # fmt: skip
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "omni_ray.cli", "train", CONFIG, *_overrides(tmp_path, tiny_model_dir, "killed")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=_env(),
    )  # fmt: skip
    try:
        # Round 1's checkpoint committed (its manifest is written last) means round 2 is under way.
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "round_0001" / "manifest.json").is_file():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
        time.sleep(0.5)  # into round 2: generating or training
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "checkpoints" / "round_0002").exists(), "the kill came too late to test a mid-round resume"

    out = _train(capsys, tmp_path, tiny_model_dir, "killed", "run.resume=auto")
    assert "resumed from" in out and "round_0001" in out

    for r in range(1, ROUNDS + 1):
        assert _pairs(run, r) == _pairs(uninterrupted, r), f"round {r} trained on different pairs"
    # Each round is logged once, with the same held-out accuracy as the uninterrupted run.
    resumed, straight = _round_records(run), _round_records(uninterrupted)
    assert [r["round"] for r in resumed] == list(range(1, ROUNDS + 1))
    assert [r["eval_accuracy"] for r in resumed] == [r["eval_accuracy"] for r in straight]
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == ROUNDS
    # The W&B run continues under the id driver_state.json saved: both runs' offline records carry it.
    saved = json.loads((run / "checkpoints" / "round_0001" / "driver_state.json").read_text())["wandb_run_id"]
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert saved and len(runs) == 2 and all(r.name.endswith(f"-{saved}") for r in runs)


@pytest.mark.integration
def test_truncated_checkpoint_is_skipped_for_the_previous_one(uninterrupted, tmp_path, tiny_model_dir, capsys):
    import shutil

    run = tmp_path / "straight"
    shutil.copytree(uninterrupted, run)
    newest = run / "checkpoints" / f"round_{ROUNDS:04d}" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])

    out = _train(capsys, tmp_path, tiny_model_dir, "straight", "run.resume=auto")
    assert f"round_{ROUNDS:04d} is unusable" in out and f"resuming from round_{ROUNDS - 1:04d}" in out
    # The last round was trained again from the previous round's state: the same pairs as the first time.
    assert _pairs(run, ROUNDS) == _pairs(uninterrupted, ROUNDS)
    assert [r["round"] for r in _round_records(run)] == list(range(1, ROUNDS + 1))


@pytest.mark.integration
def test_resume_of_a_finished_run_trains_nothing_and_says_so(uninterrupted, tmp_path, tiny_model_dir, capsys):
    """In-process and before any actor starts: no round is added, no checkpoint is touched."""
    import shutil

    from omni_ray.driver import Driver

    run = tmp_path / "straight"
    shutil.copytree(uninterrupted, run)
    manifests = {p: p.read_bytes() for p in run.glob("checkpoints/*/manifest.json")}
    driver = Driver(_config(tmp_path, tiny_model_dir, "straight", "run.resume=auto"))
    try:
        summary = driver.run()
    finally:
        driver.close()
    assert f"has completed {ROUNDS} of run.rounds={ROUNDS} rounds: nothing to train" in capsys.readouterr().out
    assert driver.roles is None, "nothing to train starts no actor"
    assert summary["rounds_completed"] == ROUNDS
    assert [r["round"] for r in _round_records(run)] == list(range(1, ROUNDS + 1))
    assert {p: p.read_bytes() for p in run.glob("checkpoints/*/manifest.json")} == manifests


@pytest.mark.parametrize("key, override, saved", [("seed", "run.seed=5", "seed=0, the config says 5"),
                                                  ("prompts_per_round", "data.prompts_per_round=65",
                                                   "prompts_per_round=64, the config says 65")])  # fmt: skip
def test_resume_with_another_prompt_stream_is_refused_naming_the_key(uninterrupted, tmp_path, tiny_model_dir, key,
                                                                      override, saved):  # fmt: skip
    import shutil

    from omni_ray.driver.run_dir import RunDir

    shutil.copytree(uninterrupted, tmp_path / "straight")
    with pytest.raises(ValueError, match=saved):
        RunDir(_config(tmp_path, tiny_model_dir, "straight", "run.resume=auto", override)).prepare()


def test_a_fresh_run_over_an_earlier_one_moves_it_aside(tmp_path, tiny_model_dir, capsys):
    from omni_ray.driver.run_dir import RunDir

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    RunDir(_config(tmp_path, tiny_model_dir, "r")).prepare()
    (aside,) = tmp_path.glob("r.prev-*")
    assert (aside / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.yaml"]
    assert f"moved to {aside}" in capsys.readouterr().out


def test_resume_auto_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, tiny_model_dir, capsys):
    from omni_ray.driver.run_dir import RunDir

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    assert RunDir(_config(tmp_path, tiny_model_dir, "r", "run.resume=auto")).prepare() is None
    assert "no usable checkpoint" in capsys.readouterr().out and list(tmp_path.glob("r.prev-*"))
