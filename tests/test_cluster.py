"""`ray job submit` against a real local head, and the cluster files validated against their schemas."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ONE_RANK

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_launcher_yaml_validates_against_rays_autoscaler_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def test_rayjob_manifest_is_a_well_formed_kuberay_rayjob():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("omni-ray train configs/")
    config = spec["entrypoint"].split()[2]
    assert (ROOT / config).is_file(), f"the RayJob runs {config}, which the repo must ship"
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_runtime_env_excludes_local_heavy_dirs_and_holds_no_secrets():
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    for d in (".venv/", "runs/", "models/"):
        assert d in env["excludes"]
    secret = re.compile(r"API_KEY|_TOKEN$|SECRET|PASSWORD")
    assert not [k for k in env.get("env_vars", {}) if secret.search(k)]


@pytest.fixture
def ray_head():
    """A real Ray head on free loopback ports, stopped by killing its own process group (never `ray stop`,
    which would stop every Ray cluster on the machine)."""
    from ray.job_submission import JobSubmissionClient

    gcs, dash, client, agent, metrics, rt_agent, node_mgr, obj_mgr = _free_ports(8)
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix sockets live below it (108-char limit)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={rt_agent}", f"--node-manager-port={node_mgr}",
         f"--object-manager-port={obj_mgr}", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 300  # a loaded 2-core machine can take minutes
    while time.monotonic() < deadline:
        try:  # in this process: a `ray job list` per probe would import Ray again while the head starts
            JobSubmissionClient(address).list_jobs()
            break
        except (OSError, RuntimeError):
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the local Ray head did not come up within 300 s")
    yield address, env
    # SIGKILL at once: the head's processes share its process group, and under SIGTERM `ray start --block` waited
    # 30 s (measured) for a graceful stop that this throwaway cluster does not need.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_ray_job_submit_runs_the_own_task_job_with_its_verifier_from_the_working_dir(ray_head, tmp_path,
                                                                                      tiny_model_dir):  # fmt: skip
    """A one-round job of the README's own task (examples/own_task/: a prompt jsonl and a python verifier that reads
    the reference answers): the verifier module must import from the uploaded working dir, in the job's driver and
    in the scorer actor, and its correct flags reach the eval."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from examples.own_task.make_problems import write_problems
    from tests.own_task_helpers import own_task_overrides, python_scorer

    address, env = ray_head
    work = tmp_path / "work"  # the uploaded copy, as a user's checkout would be
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", "runs", "models", ".git", "__pycache__"))
    write_problems(work / "examples" / "own_task" / "problems.jsonl", rows=60, seed=0)
    out = tmp_path / "runs"
    submission = "omni-ray-own-task-job"
    overrides = own_task_overrides(
        Path("examples/own_task/problems.jsonl"), out, "job", tiny_model_dir, python_scorer("exact"),
        "run.rounds=1", "rollout.backend=hf", "data.eval_prompts=16", "data.prompts_per_round=16",
        "rollout.samples_per_prompt=4", "learner.batch_size=8", "learner.epochs=1", "run.save_checkpoints=false",
        ONE_RANK,
    )  # fmt: skip
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission,
           "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
           "omni-ray", "train", "configs/local_tiny.yaml", *overrides]  # fmt: skip
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    status = JobSubmissionClient(address).get_job_status(submission)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads((out / "job" / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert summary["final_eval"]["accuracy"] is not None
