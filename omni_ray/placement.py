"""Where role actors run: per-role resources from the config, Ray placement groups on GPU clusters, colocation.

Planning is pure (`plan_placement(cfg)` -> `PlacementPlan`, `check_cluster_fits(plan, nodes)`), so every rule is
tested on a CPU machine; only `create_placement_groups` and `actor_options` touch Ray.

Layout decisions (and why):

- CPU-only runs (no role asks for GPUs, no colocation) get no placement groups at all: actors are plain
  ``num_cpus`` / ``num_gpus`` requests, exactly as before this module existed, so the CPU path does not change.
- Learner ranks: one placement group with a bundle per rank, ``placement.learner_strategy`` (PACK by default: fill
  a node's GPUs first so ZeRO-3's all-gathers stay on NVLink, spill to the next node when needed; STRICT_SPREAD puts
  one rank per node). Rank i is pinned to bundle i.
- Rollout engines: one placement group per engine with ``tensor_parallel_size`` GPU bundles, STRICT_PACK by default
  (tensor parallelism all-reduces every layer; it must not cross nodes). With TP 1 the engine actor holds the GPU
  itself (vLLM's in-process executor); with TP > 1 the actor holds no GPU and vLLM's Ray executor starts one worker
  per bundle of the actor's placement group (``VLLM_RAY_BUNDLE_INDICES``, child tasks captured).
- Colocation (``placement.colocate``): one placement group of whole-GPU bundles, shared. Learner rank i and the
  engine worker that owns GPU i sit on bundle i with fractional GPU shares (Ray accounting only: memory is shared
  in time, vLLM sleeps while the learner trains). Engines and learner must then cover the same GPUs:
  ``rollout.num_workers * rollout.tensor_parallel_size == learner.num_workers``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omni_ray.config import ConfigError, OmniRayConfig

#: Ray resource names used in bundles.
CPU, GPU = "CPU", "GPU"


class PlacementError(RuntimeError):
    """The cluster cannot host the plan, or a placement group did not become ready in time."""


@dataclass(frozen=True)
class GroupPlan:
    """One placement group: its name, bundles ({"CPU": x, "GPU": y}) and Ray strategy."""

    name: str
    bundles: tuple[dict[str, float], ...]
    strategy: str


@dataclass(frozen=True)
class ActorSlot:
    """Where one actor goes and what it reserves.

    group / bundle_index: None for an unplaced actor (CPU runs). env: variables the actor must see before its engine
    starts (vLLM reads VLLM_RAY_* when it builds its Ray executor).
    """

    num_cpus: float
    num_gpus: float
    group: str | None = None
    bundle_index: int | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacementPlan:
    """Every role's slot. The scoring actor is unplaced (plain requests) but counts in what the cluster must have."""

    groups: tuple[GroupPlan, ...]
    rollout: tuple[ActorSlot, ...]
    learner: tuple[ActorSlot, ...]
    colocated: bool
    tensor_parallel_size: int
    scoring: ActorSlot = ActorSlot(0.0, 0.0)

    @property
    def uses_placement_groups(self) -> bool:
        return bool(self.groups)

    def total(self, resource: str) -> float:
        """Resources the plan reserves for rollout and learner (bundles, or the unplaced actors' requests)."""
        if self.groups:
            return sum(b.get(resource, 0.0) for g in self.groups for b in g.bundles)
        key = "num_gpus" if resource == GPU else "num_cpus"
        return sum(getattr(s, key) for s in (*self.rollout, *self.learner))

    def needs(self, resource: str) -> float:
        """What the cluster must have: the reservations plus the scoring actor (a reward model may hold a GPU)."""
        return self.total(resource) + (self.scoring.num_gpus if resource == GPU else self.scoring.num_cpus)

    def rollout_engine_kwargs(self) -> dict[str, Any]:
        """vLLM `LLM(...)` arguments implied by the layout: the TP size and, for TP > 1, the Ray executor."""
        kwargs: dict[str, Any] = {}
        if self.tensor_parallel_size > 1:
            kwargs.update(tensor_parallel_size=self.tensor_parallel_size, distributed_executor_backend="ray")
        return kwargs


def rollout_backend_options(cfg: OmniRayConfig, plan: PlacementPlan) -> dict[str, Any]:
    """Backend keyword arguments of every RolloutWorker implied by the config and the plan.

    Empty for CPU runs with default knobs (the CPU path stays what it was). The vLLM-only knobs are refused for the
    HF backend rather than silently dropped.
    """
    rc = cfg.rollout
    options: dict[str, Any] = {}
    if rc.enforce_eager != "auto":
        options["enforce_eager"] = rc.enforce_eager == "true"
    if rc.num_gpus > 0 or plan.colocated:
        engine = {"gpu_memory_utilization": rc.gpu_memory_utilization, **plan.rollout_engine_kwargs()}
        if plan.colocated:
            engine["enable_sleep_mode"] = True
        options["engine_kwargs"] = engine
    if options and rc.backend == "hf":
        raise ConfigError(f"rollout.backend=hf takes none of the vLLM engine options {sorted(options)}")
    return options


def uses_gpus(cfg: OmniRayConfig) -> bool:
    """True when any role asks for GPUs or colocation is on: the placement-group path."""
    return cfg.rollout.num_gpus > 0 or cfg.learner.num_gpus > 0 or cfg.placement.colocate


def plan_placement(cfg: OmniRayConfig) -> PlacementPlan:
    """The placement of every rollout engine and learner rank implied by the config (pure; raises ConfigError).

    Rules a single config field cannot state are checked here, so a GPU config is validated on a CPU machine by
    planning it.
    """
    plan = _plan_roles(cfg)
    return dataclasses.replace(plan, scoring=ActorSlot(cfg.scoring.num_cpus, cfg.placement.scoring_num_gpus))


def _plan_roles(cfg: OmniRayConfig) -> PlacementPlan:
    rc, lc, pc = cfg.rollout, cfg.learner, cfg.placement
    tp = rc.tensor_parallel_size
    if not uses_gpus(cfg):
        if tp > 1:
            raise ConfigError("rollout.tensor_parallel_size > 1 needs GPUs (rollout.num_gpus > 0)")
        return PlacementPlan(
            groups=(),
            rollout=tuple(ActorSlot(rc.num_cpus, rc.num_gpus) for _ in range(rc.num_workers)),
            learner=tuple(ActorSlot(lc.num_cpus, lc.num_gpus) for _ in range(lc.num_workers)),
            colocated=False,
            tensor_parallel_size=tp,
        )
    if cfg.placement.colocate:
        return _plan_colocated(cfg)
    for key, value in (("rollout.num_gpus", rc.num_gpus), ("learner.num_gpus", lc.num_gpus)):
        if value > 1:
            raise ConfigError(f"{key} = {value}: one GPU per worker at most (use rollout.tensor_parallel_size)")
    if rc.num_gpus > 0 and lc.num_gpus > 0 and (rc.num_gpus < 1 or lc.num_gpus < 1):
        raise ConfigError("fractional GPUs for both roles share GPUs: set placement.colocate=true instead")
    if tp > 1 and rc.num_gpus != 1:
        raise ConfigError(f"rollout.tensor_parallel_size={tp} needs rollout.num_gpus=1 (one GPU per TP rank)")
    groups: list[GroupPlan] = []
    rollout: list[ActorSlot] = []
    for i in range(rc.num_workers):
        if rc.num_gpus == 0:  # e.g. a GPU learner with CPU rollout (HF backend, debugging)
            rollout.append(ActorSlot(rc.num_cpus, 0.0))
            continue
        name = f"rollout_{i}"
        bundles = tuple({CPU: rc.num_cpus if j == 0 else 0.0, GPU: 1.0} for j in range(tp))
        groups.append(GroupPlan(name, _drop_zero(bundles), pc.rollout_strategy if tp > 1 else "PACK"))
        rollout.append(_engine_slot(name, 0, rc.num_cpus, tp, gpu_share=rc.num_gpus))
    learner: list[ActorSlot] = []
    if lc.num_gpus > 0:
        bundles = tuple({CPU: lc.num_cpus, GPU: lc.num_gpus} for _ in range(lc.num_workers))
        groups.append(GroupPlan("learner", bundles, pc.learner_strategy))
        learner = [ActorSlot(lc.num_cpus, lc.num_gpus, "learner", r) for r in range(lc.num_workers)]
    else:
        learner = [ActorSlot(lc.num_cpus, 0.0) for _ in range(lc.num_workers)]
    return PlacementPlan(tuple(groups), tuple(rollout), tuple(learner), colocated=False, tensor_parallel_size=tp)


def _plan_colocated(cfg: OmniRayConfig) -> PlacementPlan:
    rc, lc, pc = cfg.rollout, cfg.learner, cfg.placement
    tp = rc.tensor_parallel_size
    gpus = rc.num_workers * tp
    if gpus != lc.num_workers:
        raise ConfigError(
            f"placement.colocate: rollout.num_workers * rollout.tensor_parallel_size ({rc.num_workers} * {tp}) must "
            f"equal learner.num_workers ({lc.num_workers}): engines and learner ranks share the same GPUs"
        )
    if rc.num_gpus != 1 or lc.num_gpus != 1:
        raise ConfigError(
            "placement.colocate: set rollout.num_gpus=1 and learner.num_gpus=1 (each role uses the whole GPU in its "
            "turn; Ray's accounting is split by placement.colocate_rollout_gpu_share)"
        )
    if cfg.sync.strategy == "nccl":
        raise ConfigError(
            "placement.colocate with sync.strategy=nccl: NCCL cannot connect two ranks on one GPU; "
            "use sync.strategy=object_store (or disk) when colocated"
        )
    share = pc.colocate_rollout_gpu_share
    bundles = tuple({CPU: lc.num_cpus + (rc.num_cpus if g % tp == 0 else 0.0), GPU: 1.0} for g in range(gpus))
    group = GroupPlan("colocated", bundles, pc.learner_strategy)
    rollout = tuple(_engine_slot("colocated", e * tp, rc.num_cpus, tp, gpu_share=share) for e in range(rc.num_workers))
    learner = tuple(ActorSlot(lc.num_cpus, 1.0 - share, "colocated", r) for r in range(lc.num_workers))
    return PlacementPlan((group,), rollout, learner, colocated=True, tensor_parallel_size=tp)


def _engine_slot(group: str, first_bundle: int, num_cpus: float, tp: int, *, gpu_share: float) -> ActorSlot:
    """An engine actor on `first_bundle`. TP 1: the actor holds its GPU share. TP > 1: the actor holds no GPU and
    vLLM's Ray executor places one worker (gpu_share each) on each of the engine's bundles."""
    if tp == 1:
        return ActorSlot(num_cpus, gpu_share, group, first_bundle)
    env = {
        "VLLM_RAY_BUNDLE_INDICES": ",".join(str(first_bundle + j) for j in range(tp)),
        "VLLM_RAY_PER_WORKER_GPUS": str(gpu_share),
    }
    return ActorSlot(num_cpus, 0.0, group, first_bundle, env)


def _drop_zero(bundles: tuple[dict[str, float], ...]) -> tuple[dict[str, float], ...]:
    return tuple({k: v for k, v in b.items() if v > 0} for b in bundles)


def check_cluster_fits(plan: PlacementPlan, nodes: Sequence[Mapping[str, float]]) -> None:
    """Raise PlacementError when the cluster (a resource dict per alive node) cannot host the plan.

    Checked up front because an unsatisfiable placement group waits forever in Ray: totals per resource, and every
    STRICT_PACK group on some single node. (A necessary check, not a full bin-packing proof.)
    """
    for res in (CPU, GPU):
        need, have = plan.needs(res), sum(n.get(res, 0.0) for n in nodes)
        if need > have + 1e-9:
            raise PlacementError(f"the plan needs {need:g} {res} but the cluster has {have:g}")
    for g in plan.groups:
        need = {res: sum(b.get(res, 0.0) for b in g.bundles) for res in (CPU, GPU)}
        if g.strategy == "STRICT_PACK" and not any(all(n.get(r, 0.0) >= v for r, v in need.items()) for n in nodes):
            raise PlacementError(f"placement group {g.name} needs {need} on ONE node (STRICT_PACK); no node has it")
        if g.strategy == "STRICT_SPREAD" and len(g.bundles) > len(nodes):
            raise PlacementError(f"placement group {g.name}: {len(g.bundles)} bundles STRICT_SPREAD over {len(nodes)}")


def cluster_nodes() -> list[dict[str, float]]:
    """Alive nodes' total resources, as `check_cluster_fits` takes them."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def create_placement_groups(plan: PlacementPlan, timeout_s: float) -> dict[str, Any]:
    """Create the plan's placement groups and wait until all are ready; raise PlacementError after `timeout_s`.

    A group that can never be scheduled would otherwise leave every actor pending forever. On failure the groups
    already created are removed, so a retry starts clean.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if not plan.groups:
        return {}
    check_cluster_fits(plan, cluster_nodes())
    pgs = {g.name: placement_group(list(g.bundles), strategy=g.strategy, name="") for g in plan.groups}
    t0 = time.monotonic()
    ready, pending = ray.wait([pg.ready() for pg in pgs.values()], num_returns=len(pgs), timeout=timeout_s)
    if pending:
        names = [name for name, pg in pgs.items() if not _is_ready(pg)]
        for pg in pgs.values():
            remove_placement_group(pg)
        raise PlacementError(
            f"placement groups {names} not ready after {time.monotonic() - t0:.0f}s (placement.timeout_s); "
            f"cluster: {ray.available_resources()}"
        )
    return pgs


def _is_ready(pg: Any) -> bool:
    import ray

    done, _ = ray.wait([pg.ready()], timeout=0)
    return bool(done)


def actor_options(slot: ActorSlot, pgs: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Ray `.options(...)` for an actor in `slot`. Unplaced slots give exactly the pre-placement options."""
    options: dict[str, Any] = {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus}
    merged = {**(env or {}), **slot.env}
    if merged:
        options["runtime_env"] = {"env_vars": merged}
    if slot.group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pgs[slot.group],
            placement_group_bundle_index=slot.bundle_index,
            # vLLM's Ray executor (TP > 1) starts its workers from inside the engine actor: they must land in the
            # same placement group, on the bundles VLLM_RAY_BUNDLE_INDICES names.
            placement_group_capture_child_tasks=True,
        )
    return options


def remove_placement_groups(pgs: Mapping[str, Any]) -> None:
    """Release the plan's reservations (after the actors are killed)."""
    from ray.util.placement_group import remove_placement_group

    for pg in pgs.values():
        remove_placement_group(pg)
