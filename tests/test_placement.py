"""Placement planning from config (pure), placement groups on a real local Ray cluster, and the colocation order.

GPU layouts are planned here without GPUs: planning is pure. Creating GPU placement groups needs GPUs; the same code
is exercised with CPU-only bundles, which Ray schedules identically.
"""

from __future__ import annotations

import pytest

from omni_ray.config import ConfigError, load_config
from omni_ray.placement import (
    ActorSlot,
    GroupPlan,
    PlacementError,
    PlacementPlan,
    actor_options,
    check_cluster_fits,
    create_placement_groups,
    plan_placement,
    remove_placement_groups,
    rollout_backend_options,
)
from tests.conftest import ONE_RANK

GPU_SPLIT = [
    "rollout.num_workers=2", "rollout.num_gpus=1", "rollout.tensor_parallel_size=2", "rollout.num_cpus=2",
    "learner.num_workers=4", "learner.num_gpus=1", "learner.num_cpus=4", "learner.batch_size=64",
]  # fmt: skip
COLOCATED = [
    "rollout.num_workers=2", "rollout.num_gpus=1", "learner.num_workers=2", "learner.num_gpus=1",
    "placement.colocate=true", "learner.batch_size=32",
]  # fmt: skip


def test_cpu_config_gets_no_placement_groups_and_the_plain_resource_requests():
    cfg = load_config(None, ["rollout.num_workers=2", "rollout.num_cpus=0.5", "learner.num_cpus=0.25"])
    plan = plan_placement(cfg)
    assert not plan.uses_placement_groups and not plan.colocated
    assert plan.rollout == (ActorSlot(0.5, 0.0), ActorSlot(0.5, 0.0))
    assert plan.learner == (ActorSlot(0.25, 0.0),) * cfg.learner.num_workers
    # exactly the options the driver used before placement existed
    assert actor_options(plan.rollout[0], {}, {"A": "1"}) == {
        "num_cpus": 0.5,
        "num_gpus": 0.0,
        "runtime_env": {"env_vars": {"A": "1"}},
    }
    assert rollout_backend_options(cfg, plan) == {}


def test_tensor_parallel_engines_get_one_strict_pack_group_each_and_learners_one_pack_group():
    plan = plan_placement(load_config(None, GPU_SPLIT))
    groups = {g.name: g for g in plan.groups}
    assert set(groups) == {"rollout_0", "rollout_1", "learner"}
    assert groups["rollout_0"].strategy == "STRICT_PACK"
    assert groups["rollout_0"].bundles == ({"CPU": 2.0, "GPU": 1.0}, {"GPU": 1.0})
    assert groups["learner"].strategy == "PACK" and len(groups["learner"].bundles) == 4
    assert plan.total("GPU") == 8 and plan.total("CPU") == 2 * 2 + 4 * 4
    engine = plan.rollout[1]
    # TP > 1: the engine actor holds no GPU; vLLM's Ray executor puts its workers on the engine's bundles
    assert (engine.group, engine.bundle_index, engine.num_gpus) == ("rollout_1", 0, 0.0)
    assert engine.env == {"VLLM_RAY_BUNDLE_INDICES": "0,1", "VLLM_RAY_PER_WORKER_GPUS": "1.0"}
    assert [(s.group, s.bundle_index, s.num_gpus) for s in plan.learner] == [("learner", r, 1.0) for r in range(4)]
    assert plan.rollout_engine_kwargs() == {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}


def test_single_gpu_engine_holds_its_gpu_itself():
    plan = plan_placement(load_config(None, ["rollout.num_gpus=1", "learner.num_gpus=1"]))
    assert plan.rollout[0] == ActorSlot(1.0, 1.0, "rollout_0", 0)
    assert plan.rollout_engine_kwargs() == {}


def test_learner_strategy_comes_from_config():
    plan = plan_placement(load_config(None, [*GPU_SPLIT, "placement.learner_strategy=STRICT_SPREAD"]))
    assert {g.name: g.strategy for g in plan.groups}["learner"] == "STRICT_SPREAD"


def test_colocated_roles_share_whole_gpu_bundles_with_split_accounting():
    cfg = load_config(None, COLOCATED)
    plan = plan_placement(cfg)
    assert plan.colocated and len(plan.groups) == 1
    (group,) = plan.groups
    assert [b["GPU"] for b in group.bundles] == [1.0, 1.0]
    assert [(s.bundle_index, s.num_gpus) for s in plan.rollout] == [(0, 0.5), (1, 0.5)]
    assert [(s.bundle_index, s.num_gpus) for s in plan.learner] == [(0, 0.5), (1, 0.5)]
    assert rollout_backend_options(cfg, plan)["engine_kwargs"]["enable_sleep_mode"] is True


def test_colocated_tensor_parallel_engines_start_on_every_tp_th_bundle():
    cfg = load_config(None, [*COLOCATED, "rollout.tensor_parallel_size=2", "learner.num_workers=4"])
    plan = plan_placement(cfg)
    assert [s.bundle_index for s in plan.rollout] == [0, 2]
    assert plan.rollout[1].env["VLLM_RAY_BUNDLE_INDICES"] == "2,3"
    assert plan.rollout[1].env["VLLM_RAY_PER_WORKER_GPUS"] == "0.5"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ([*COLOCATED, "learner.num_workers=4", "learner.batch_size=32"], r"rollout\.num_workers \* .* learner\.num_"),
        ([*COLOCATED, "sync.strategy=nccl"], "NCCL cannot connect two ranks on one GPU"),
        (["rollout.tensor_parallel_size=2"], r"tensor_parallel_size > 1 needs GPUs"),
        (["rollout.num_gpus=2", "learner.num_gpus=1"], "one GPU per worker at most"),
        (["rollout.num_gpus=0.5", "learner.num_gpus=0.5"], "placement.colocate=true instead"),
        (["rollout.num_gpus=0.5", "rollout.tensor_parallel_size=2"], "needs rollout.num_gpus=1"),
    ],
)
def test_layouts_that_cannot_work_are_refused_with_the_keys_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        plan_placement(load_config(None, overrides))


def test_vllm_engine_options_are_refused_for_the_hf_backend():
    cfg = load_config(None, ["rollout.num_gpus=1", "rollout.backend=hf"])
    with pytest.raises(ConfigError, match="rollout.backend=hf"):
        rollout_backend_options(cfg, plan_placement(cfg))


def test_cluster_check_names_what_is_missing():
    plan = plan_placement(load_config(None, GPU_SPLIT))
    eight = {"CPU": 64.0, "GPU": 8.0}
    check_cluster_fits(plan, [eight])
    check_cluster_fits(plan, [{"CPU": 32.0, "GPU": 4.0}] * 2)  # TP-2 engines fit on 4-GPU nodes
    with pytest.raises(PlacementError, match="needs 8 GPU but the cluster has 4"):
        check_cluster_fits(plan, [{"CPU": 64.0, "GPU": 4.0}])
    with pytest.raises(PlacementError, match="ONE node"):
        check_cluster_fits(plan, [{"CPU": 8.0, "GPU": 1.0}] * 8)
    spread = PlacementPlan((GroupPlan("g", ({"CPU": 1.0},) * 3, "STRICT_SPREAD"),), (), (), False, 1)
    with pytest.raises(PlacementError, match="STRICT_SPREAD over 2"):
        check_cluster_fits(spread, [{"CPU": 8.0}] * 2)


class _WhereAmI:
    def where(self) -> str | None:
        import ray

        pg = ray.util.get_current_placement_group()
        return None if pg is None else pg.id.hex()


@pytest.mark.integration
def test_actors_land_in_their_placement_group_bundles(ray_local):
    """The GPU path's Ray calls with CPU-only bundles (same scheduling code; no GPU needed)."""
    ray = ray_local
    plan = PlacementPlan(
        groups=(GroupPlan("learner", ({"CPU": 0.25},) * 2, "PACK"),),
        rollout=(),
        learner=(ActorSlot(0.25, 0.0, "learner", 0), ActorSlot(0.25, 0.0, "learner", 1)),
        colocated=False,
        tensor_parallel_size=1,
    )
    pgs = create_placement_groups(plan, timeout_s=60)
    try:
        actors = [ray.remote(_WhereAmI).options(**actor_options(s, pgs)).remote() for s in plan.learner]
        assert ray.get([a.where.remote() for a in actors], timeout=60) == [pgs["learner"].id.hex()] * 2
        for a in actors:
            ray.kill(a)
    finally:
        remove_placement_groups(pgs)


@pytest.mark.integration
def test_a_plan_the_cluster_cannot_host_raises_instead_of_waiting(ray_local):
    plan = PlacementPlan((GroupPlan("huge", ({"CPU": 1000.0},), "PACK"),), (), (), False, 1)
    with pytest.raises(PlacementError, match="needs 1000 CPU"):
        create_placement_groups(plan, timeout_s=5)


class _Recorder:
    """Stands in for what colocation needs of a handle and records each call, in one log shared by all of them:
    vLLM's sleep mode needs CUDA, so the engines here are fakes; the learner is the real group, recorded on the way."""

    def __init__(self, name: str, log: list[str], target=None) -> None:
        self.name, self.log, self.target = name, log, target

    def __getattr__(self, method: str):
        recorder = self

        class _Method:
            def remote(self, *args):  # a fake engine: its call is done at once
                import ray

                recorder.log.append(f"{recorder.name}.{method}{list(args)}")
                return ray.put(None)

            def __call__(self, *args, **kwargs):  # the real learner group, called through
                recorder.log.append(f"{recorder.name}.{method}")
                return getattr(recorder.target, method)(*args, **kwargs)

        return _Method()


@pytest.mark.integration
def test_a_colocated_round_sleeps_the_engines_before_training_and_wakes_weights_then_cache_after_export(
    ray_local, tmp_path, tiny_model_dir
):
    """A real driver round (CPU, so the engines' sleep mode is recorded, not run): the engines sleep before the
    learner trains, the new weights are exported while they sleep, the learner's states leave the GPU before the
    engines wake their weights, and the KV cache comes back last."""
    from omni_ray.driver import Driver
    from omni_ray.driver.roles import Colocation

    cfg = load_config("configs/local_tiny.yaml", [
        f"run.output_dir={tmp_path}", "run.name=coloc", "run.rounds=1", f"model.path={tiny_model_dir}",
        "rollout.backend=hf", "data.prompts_per_round=16", "data.eval_prompts=16", "rollout.samples_per_prompt=4",
        "learner.batch_size=16", "learner.epochs=1", "run.save_checkpoints=false", "logging.console=false", ONE_RANK,
    ])  # fmt: skip
    driver = Driver(cfg)
    try:
        roles = driver.start_roles()
        log: list[str] = []
        learner = _Recorder("learner", log, roles.learner)
        roles.learner = roles.sync.learner = learner
        roles.colocation = Colocation([_Recorder("engine0", log), _Recorder("engine1", log)], learner, level=2,
                                      timeout_s=60)  # fmt: skip
        row = driver.run_round(0)
        events = list(log)
    finally:
        driver.close()
    assert row["pairs_kept"] > 0 and not row.get("skipped")
    assert events == [
        "engine0.sleep[2]", "engine1.sleep[2]", "learner.reload_states", "learner.train_round",
        "learner.export_weight_buckets", "learner.offload_states", "engine0.wake[['weights']]",
        "engine1.wake[['weights']]", "engine0.wake[['kv_cache']]", "engine1.wake[['kv_cache']]",
    ]  # fmt: skip


def test_the_scorers_gpu_counts_in_what_the_cluster_must_have():
    """A reward model on its own GPU: a cluster with exactly the rollout and learner GPUs is one short, and is refused
    with the numbers instead of leaving the scoring actor pending forever."""
    cfg = load_config(None, [*GPU_SPLIT, "placement.scoring_num_gpus=1"])
    plan = plan_placement(cfg)
    assert plan.total("GPU") == 8 and plan.needs("GPU") == 9
    node = {"CPU": 64.0, "GPU": 8.0}
    with pytest.raises(PlacementError, match="needs 9 GPU but the cluster has 8"):
        check_cluster_fits(plan, [node])
    check_cluster_fits(plan, [{"CPU": 64.0, "GPU": 9.0}])
