"""Actor faults survived and refused: a rollout worker killed mid-generation (sync and during the async prefetch), a
scorer and a PoP estimator killed between calls, retries that run out, stage timeouts that name the stage, a stale
worker refused, and a dead learner rank that stops the run naming the checkpoint to resume from."""

from __future__ import annotations

import json

import pytest

from omni_ray.config import load_config
from tests.conftest import ONE_RANK


def _cfg(tmp_path, model_dir: str, name: str, *extra: str):
    return load_config(
        "configs/local_tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            f"model.path={model_dir}",
            "rollout.num_workers=2",
            "rollout.num_cpus=0.25",
            "data.prompts_per_round=32",
            "data.eval_prompts=32",
            "rollout.samples_per_prompt=8",
            "learner.batch_size=16",
            "learner.epochs=1",
            "run.dump_rollouts=true",
            "logging.console=false",
            *extra,
        ],
    )


# The HF rollout backend is enough where the fault is not in the engine itself, and one learner rank (ONE_RANK) where it
# is not in the learner.
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


@pytest.fixture(scope="module")
def shared(ray_local, tmp_path_factory, tiny_model_dir):
    """One driver for the faults that leave it usable (stateless actors restarted, timeouts on a copy of a policy)."""
    from omni_ray.driver import Driver

    driver = Driver(_cfg(tmp_path_factory.mktemp("faults"), tiny_model_dir, "shared", *HF_ONE_WORKER, ONE_RANK))
    driver.start_roles()
    yield driver
    driver.close()


def _exit_process(_actor) -> None:
    import os

    os._exit(1)


class _DieBeforeCall:
    """Stands in for a stateless role's handle: before its first `method` call, the actor's process exits (a call
    queued in front of it), so that call is sure to meet a dead actor whatever its speed; Ray restarts the actor."""

    def __init__(self, handle, method: str):
        self.handle, self.method, self.died = handle, method, False

    def __getattr__(self, name: str):
        method = getattr(self.handle, name)
        if name != self.method or self.died:
            return method
        outer = self

        class _Method:
            def remote(self, *args, **kwargs):
                outer.died = True
                outer.handle.__ray_call__.remote(_exit_process)
                return method.remote(*args, **kwargs)

        return _Method()


class _KillOnCall:
    """Stands in for a role's actor handle: its call number `nth` (1-based) of `method` is submitted, then the actor
    is killed while that call is in flight (Ray restarts it; a rollout worker from the model dir). Everything else
    goes to the real handle."""

    def __init__(self, handle, method: str = "generate", nth: int = 1):
        self.handle, self.method, self.nth, self.calls, self.killed = handle, method, nth, 0, False

    def __getattr__(self, name: str):
        method = getattr(self.handle, name)
        if name != self.method:
            return method
        outer = self

        class _Method:
            def remote(self, *args, **kwargs):
                import ray

                ref = method.remote(*args, **kwargs)
                outer.calls += 1
                if outer.calls == outer.nth:
                    outer.killed = True
                    ray.kill(outer.handle, no_restart=False)
                return ref

        return _Method()


def _samples(driver, round_number: int) -> list[dict]:
    path = driver.run_dir.path / f"rounds/round_{round_number:04d}/samples.jsonl"
    return [json.loads(s) for s in path.read_text().splitlines()]


@pytest.mark.integration
def test_rollout_worker_killed_mid_generation_is_restarted_and_every_prompt_answered(ray_local, start_driver):
    # Two HF workers: the retry path is the driver's, whatever the engine; a killed vLLM engine's restart on its model
    # dir is test_weight_sync.py's nccl test.
    driver = start_driver("kill_rollout", "rollout.backend=hf", ONE_RANK)
    driver.run_round(0)  # policy version 1 now lives only in the learner and the workers
    real = driver.roles.rollout[0]
    driver.roles.rollout[0] = proxy = _KillOnCall(real)
    try:
        row = driver.run_round(1)
    finally:
        driver.roles.rollout[0] = real
    assert proxy.killed and row["faults_rollout"] >= 1
    assert row["samples"] == 32 * 8
    expected = [p.prompt_id for p in driver.prompts.train(1)[0] for _ in range(8)]
    assert [s["prompt_id"] for s in _samples(driver, 2)] == expected
    # Every answer came from the policy the round expected (a restarted engine would hold version 0).
    assert {s["policy_version"] for s in _samples(driver, 2)} == {1}
    assert ray_local.get(driver.roles.rollout[0].ready.remote())["policy_version"] == driver.policy_version == 2


@pytest.mark.integration
def test_rollout_worker_killed_during_the_async_prefetch_is_restored_and_the_round_sampled_again(start_driver):
    """pipeline.mode=async: round 2's generate calls go out during round 1; the worker dies under them. The round
    still completes, sampled again by the current policy once the worker holds it, and every sample records the
    version it was drawn from."""
    driver = start_driver("kill_prefetch", *HF_ONE_WORKER, ONE_RANK, "pipeline.mode=async", "run.rounds=2")
    real = driver.roles.rollout[0]
    driver.roles.rollout[0] = proxy = _KillOnCall(real, nth=2)  # 1: round 1's own samples, 2: the prefetch
    try:
        rows = [driver.run_round(0), driver.run_round(1)]
    finally:
        driver.roles.rollout[0] = real
    assert proxy.killed
    assert sum(r.get("faults_rollout", 0) for r in rows) >= 1
    assert rows[1]["policy_version_sampled"] == 1 and rows[1]["policy_lag"] == 0
    assert rows[1]["samples"] == 32 * 8
    assert {s["policy_version"] for s in _samples(driver, 2)} == {1}


@pytest.mark.integration
def test_scorer_killed_between_calls_is_restarted_and_the_batch_scored(ray_local, shared, monkeypatch):
    shared.faults.take()
    monkeypatch.setattr(shared.roles, "scorer", proxy := _DieBeforeCall(shared.roles.scorer, "score"))
    result = shared.score(shared.prompts.encode([_prompt("2+3=")] * 2)[0], ["5", "7"])
    assert proxy.died and list(result.correct) == [True, False]
    assert shared.faults.take() == {"scorer": 1}


@pytest.mark.integration
def test_pop_estimator_killed_between_calls_is_restarted_and_the_round_gets_its_items(ray_local, shared, monkeypatch):
    from omni_ray.driver.record import RoundRecord
    from omni_ray.pairs import Pair

    shared.faults.take()
    monkeypatch.setattr(shared.roles, "pop", proxy := _DieBeforeCall(shared.roles.pop, "training_items"))
    pairs = [Pair(f"p{i}", "", [1], "", "", [2], [3], 10.0, 10.0 - i) for i in range(1, 5)]
    items = shared.pop_items(RoundRecord(round=1), pairs, 0)
    assert proxy.died and len(items) == 4 and shared.faults.take() == {"pop": 1}


@pytest.mark.integration
@pytest.mark.parametrize("role", ["rollout", "scorer"])
def test_a_stage_past_its_timeout_raises_naming_the_stage(shared, role, monkeypatch):
    from omni_ray.driver.calls import RetryPolicy

    prompts = shared.prompts.encode([_prompt("2+3=")] * 64)[0]
    monkeypatch.setitem(shared.policies, role, RetryPolicy(timeout_s=0.001, max_retries=0))
    with pytest.raises(TimeoutError, match=rf"^{role}: calls \[0\] did not finish within 0 s"):
        if role == "rollout":
            shared.generate(prompts, n=8, temperature=1.0, seed=0, version=shared.policy_version)
        else:
            shared.score(prompts, ["5"] * 64)


@pytest.mark.integration
def test_a_learner_call_past_its_timeout_raises_naming_the_call(shared):
    from omni_ray.learner.group import LearnerGroupError

    saved, shared.roles.learner.timeout_s = shared.roles.learner.timeout_s, 0.001
    try:
        with pytest.raises(LearnerGroupError, match=r"learner.parameter_checksum did not finish within 0 s"):
            shared.roles.learner.parameter_checksums()
    finally:
        shared.roles.learner.timeout_s = saved


@pytest.mark.integration
def test_actor_failing_more_than_max_retries_stops_the_round_with_the_role_named(ray_local, shared, monkeypatch):
    """With no retry left (`max_retries=0`), a call whose actor died raises naming the role; Ray still restarts the
    actors (their `max_restarts` is the shared driver's), so the driver stays usable."""
    from dataclasses import replace

    shared.faults.take()
    for role in ("scorer", "rollout"):
        monkeypatch.setitem(shared.policies, role, replace(shared.policies[role], max_retries=0))
    monkeypatch.setattr(shared.roles, "scorer", _DieBeforeCall(shared.roles.scorer, "score"))
    monkeypatch.setattr(shared.roles, "rollout", [_KillOnCall(shared.roles.rollout[0])])  # its one worker
    with pytest.raises(RuntimeError, match="scorer call 0 failed 1 times"):
        shared.score(shared.prompts.encode([_prompt("2+3=")])[0], ["5"])
    with pytest.raises(RuntimeError, match="rollout call 0 failed 1 times"):
        shared.generate(shared.eval_set[:4], n=1, temperature=0.0, seed=0, version=0)
    assert shared.faults.take() == {"scorer": 1, "rollout": 1}


def test_each_roles_retry_policy_comes_from_its_own_config_keys(tmp_path, tiny_model_dir):
    from omni_ray.driver import Driver
    from omni_ray.driver.calls import RetryPolicy

    retries = ("rollout.timeout_s=7", "rollout.max_retries=0", "scoring.timeout_s=8", "scoring.max_retries=1",
               "pop.timeout_s=9", "pop.max_retries=4")  # fmt: skip
    driver = Driver(_cfg(tmp_path, tiny_model_dir, "policies", *retries))
    try:
        assert driver.policies == {"rollout": RetryPolicy(7, 0), "scorer": RetryPolicy(8, 1), "pop": RetryPolicy(9, 4)}
    finally:
        driver.close()


def test_a_worker_holding_another_policy_version_refuses_to_generate(tiny_model_dir):
    from omni_ray.data import encode_prompt
    from omni_ray.rollout import RolloutWorker, StaleWeightsError

    worker = RolloutWorker(tiny_model_dir, backend="hf")
    ids = [encode_prompt(worker.tokenizer, "1+2=")]
    with pytest.raises(StaleWeightsError, match="holds policy version 0, the driver expects 3"):
        worker.generate(ids, n=1, temperature=0.0, max_new_tokens=4, seed=0, expect_version=3)
    assert worker.generate(ids, n=1, temperature=0.0, max_new_tokens=4, seed=0, expect_version=0)


@pytest.mark.integration
def test_dead_learner_rank_stops_the_run_naming_the_checkpoint_to_resume(ray_local, start_driver):
    from omni_ray.learner.group import LearnerGroupError

    driver = start_driver("kill_learner", *HF_ONE_WORKER, "learner.timeout_s=60")
    driver.run_round(0)
    ray_local.kill(driver.roles.learner.workers[1])
    with pytest.raises(LearnerGroupError, match=r"round 2; the newest good checkpoint is .*round_0001; rerun"):
        driver.run_round(1)


def _prompt(text: str):
    from omni_ray.data import Prompt
    from omni_ray.data.arith import answer_of

    return Prompt(prompt_id=text, text=text, reference=str(answer_of(text)))
