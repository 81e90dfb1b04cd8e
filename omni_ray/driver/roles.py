"""Start-up and shutdown of every role's actors, and the colocation of rollout engines with learner ranks.

Every role is a plain class wrapped with `ray.remote` here, the one place that knows their actor options: rollout
workers, the scoring service and the PoP estimator restart on failure (`max_restarts`; the driver retries their
calls), learner ranks do not (a collective cannot lose a member). Roles that share GPUs start one after the other:
vLLM profiles free memory at start-up and refuses to start when it changes under it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from omni_ray.config import OmniRayConfig
from omni_ray.driver.calls import FaultLog, wait_restarted
from omni_ray.learner.group import LearnerGroup
from omni_ray.learner.objective import POP_LOSSES
from omni_ray.models.adapters import rollout_settings
from omni_ray.placement import (
    PlacementError,
    actor_options,
    create_placement_groups,
    plan_placement,
    remove_placement_groups,
    rollout_backend_options,
)
from omni_ray.pop import PopEstimator
from omni_ray.rollout.worker import RolloutWorker
from omni_ray.scoring import ScoringService
from omni_ray.weight_sync import WeightSync, make_weight_sync


class Colocation:
    """Rollout engines and learner ranks on the same GPUs take turns (placement.colocate).

    Per round: generate (engines awake, the learner's optimizer states and weights offloaded to CPU) ->
    `before_training`: engines sleep (level 2 by default: the weights are replaced right after training anyway, so
    vLLM need not copy them back from CPU), the learner's states come back -> train -> the sync exports the new weights
    (ZeRO-3 gathers run while the engines still sleep) -> `before_load`: the learner offloads, engines wake their
    weights -> the weights load -> `after_load`: engines wake the KV cache. `log` lists what was done, in order.
    """

    def __init__(self, rollout: list[Any], learner: LearnerGroup, *, level: int, timeout_s: float) -> None:
        self.rollout, self.learner, self.level, self.timeout_s = rollout, learner, level, timeout_s
        self.log: list[str] = []

    def _engines(self, method: str, *args: Any) -> None:
        refs = [getattr(w, method).remote(*args) for w in self.rollout]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            raise PlacementError(f"{len(pending)} rollout engines did not {method} within {self.timeout_s:.0f}s")
        ray.get(done)

    def before_training(self) -> None:
        self._engines("sleep", self.level)
        self.log.append(f"engines sleep(level={self.level})")
        self.learner.reload_states()
        self.log.append("learner reload_states")

    def before_load(self) -> None:
        self.learner.offload_states()
        self.log.append("learner offload_states")
        self._engines("wake", ["weights"])
        self.log.append("engines wake(weights)")

    def after_load(self) -> None:
        self._engines("wake", ["kv_cache"])
        self.log.append("engines wake(kv_cache)")


@dataclass
class Roles:
    """The run's role actors (public handles: the driver calls their public methods, nothing else)."""

    rollout: list[Any]
    scorer: Any
    pop: Any | None
    learner: LearnerGroup
    sync: WeightSync
    colocation: Colocation | None
    rollout_backend: str
    placement_groups: dict[str, Any] = field(default_factory=dict)

    def stateful_actors(self) -> list[Any]:
        """Actors that report busy time (BusyClock)."""
        return [*self.rollout, self.scorer, *([self.pop] if self.pop is not None else [])]

    def close(self) -> None:
        """Stop every actor (a driver inside a long-lived cluster must not leak them) and release the placement."""
        self.sync.close()
        for actor in self.stateful_actors():
            ray.kill(actor)
        self.learner.shutdown()
        remove_placement_groups(self.placement_groups)


def start_roles(
    cfg: OmniRayConfig,
    model_path: str,
    run_dir: Path,
    env: dict[str, str],
    *,
    faults: FaultLog,
    on_restart: Callable[[int], None] = lambda j: None,
) -> Roles:
    """Every role up and ready, and the weight sync opened. `on_restart(j)` runs after rollout worker j came back
    from a restart during a weight push (the sync pushes to it again itself)."""
    rc = cfg.rollout
    plan = plan_placement(cfg)
    # LoRA: adapters alone travel to the workers, which then hold the base model plus the adapter; the nccl
    # broadcast sends the merged weights instead.
    adapter = rollout_settings(cfg, model_path)  # also refuses unknown target modules before any actor starts
    lora = adapter if cfg.sync.strategy != "nccl" else None
    pgs = create_placement_groups(plan, cfg.placement.timeout_s)
    options = {**rollout_backend_options(cfg, plan), **({"lora": lora} if lora else {})}
    rollout = [
        ray.remote(RolloutWorker)
        .options(**actor_options(slot, pgs, env), max_restarts=rc.max_retries)
        .remote(
            model_path,
            backend=rc.backend,
            seed=cfg.run.seed + i,
            dtype=cfg.model.dtype,
            max_model_len=rc.max_model_len or cfg.model.tiny.max_position_embeddings,
            trust_remote_code=cfg.model.trust_remote_code,
            **options,
        )
        for i, slot in enumerate(plan.rollout)
    ]
    if plan.colocated:  # engines profile GPU memory while nothing else moves on it
        info = ray.get([w.ready.remote() for w in rollout], timeout=rc.timeout_s)
    scorer = (
        ray.remote(ScoringService)
        .options(
            num_cpus=plan.scoring.num_cpus,
            num_gpus=plan.scoring.num_gpus,
            runtime_env={"env_vars": env},
            max_restarts=cfg.scoring.max_retries,
        )  # fmt: skip
        .remote(
            list(cfg.scoring.scorers),
            rescale=cfg.scoring.rescale,
            rescale_low=cfg.scoring.rescale_low,
            rescale_high=cfg.scoring.rescale_high,
            device="cuda" if plan.scoring.num_gpus > 0 else "cpu",
            trust_remote_code=cfg.model.trust_remote_code,
        )
    )
    p = cfg.pop
    pop = (
        ray.remote(PopEstimator)
        .options(num_cpus=p.num_cpus, runtime_env={"env_vars": env}, max_restarts=p.max_retries)
        .remote(**PopEstimator.kwargs_from_config(p, seed=cfg.run.seed, trust_remote_code=cfg.model.trust_remote_code))
        if cfg.loss.name in POP_LOSSES
        else None
    )
    learner = LearnerGroup(cfg, model_path, env, placement=(plan.learner, pgs))
    if not plan.colocated:
        info = ray.get([w.ready.remote() for w in rollout], timeout=rc.timeout_s)
    colocation = None
    if plan.colocated:
        learner.offload_states()  # the engines generate first
        colocation = Colocation(rollout, learner, level=cfg.placement.sleep_level, timeout_s=rc.timeout_s)

    def restart(j: int) -> None:
        wait_restarted(rollout[j], rc.timeout_s)
        on_restart(j)

    s = cfg.sync
    sync = make_weight_sync(
        s.strategy,
        learner,
        rollout,
        bucket_mb=s.bucket_mb,
        timeout_s=s.timeout_s,
        restart=restart,
        max_retries=rc.max_retries,
        on_fault=faults.add,
        directory=str(run_dir / "weights"),
        tensor_parallel_size=plan.tensor_parallel_size,
        collective_backend=s.collective_backend,
        adapter_only=lora is not None,
    )
    sync.open()
    return Roles(rollout, scorer, pop, learner, sync, colocation, info[0]["backend"], pgs)
