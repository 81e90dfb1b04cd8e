"""The learner group: N `LearnerWorker` ranks as Ray actors, called by the driver as if they were one object.

Rank 0 is started first and reports its node address and a free port; the other ranks join its process group
(as OpenRLHF's and verl's actor groups do). Every call fans out to all ranks (collectives need everyone) and
returns rank 0's answer; every wait has a timeout that raises instead of hanging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ray

from omni_ray.config import OmniRayConfig
from omni_ray.learner.worker import LearnerWorker, RoundData
from omni_ray.placement import ActorSlot, actor_options


class LearnerGroupError(RuntimeError):
    """A learner rank failed or timed out; the run stops (a lost rank cannot be replaced mid-collective)."""


class LearnerGroup:
    """Args:
    placement: (slots, placement groups) from `omni_ray.placement`: rank i goes to slots[i] (a bundle of the
        learner's or the colocated placement group). None: plain num_cpus / num_gpus requests (CPU runs).
    """

    def __init__(
        self,
        cfg: OmniRayConfig,
        model_path: str,
        env: dict[str, str] | None = None,
        placement: tuple[Sequence[ActorSlot], Mapping[str, Any]] | None = None,
    ):
        lc = cfg.learner
        self.cfg = cfg
        self.timeout_s = lc.timeout_s
        if placement is None:
            slots, pgs = [ActorSlot(lc.num_cpus, lc.num_gpus)] * lc.num_workers, {}
        else:
            slots, pgs = placement
        if len(slots) != lc.num_workers:
            raise ValueError(f"{len(slots)} placement slots for {lc.num_workers} learner ranks")
        self.workers = [
            ray.remote(LearnerWorker).options(**actor_options(slot, pgs, env)).remote(cfg, model_path, rank, len(slots))
            for rank, slot in enumerate(slots)
        ]
        # Rank 0's node hosts the rendezvous, wherever Ray placed it; its store holds the port from the start.
        master_addr, master_port = ray.get(self.workers[0].rendezvous.remote(), timeout=self.timeout_s)
        self._all("init_process_group", master_addr, master_port)

    def _all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        try:
            return ray.get(refs, timeout=timeout or self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise LearnerGroupError(
                f"learner.{method} did not finish within {timeout or self.timeout_s:.0f} s (learner.timeout_s)"
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise LearnerGroupError(f"a learner rank died during {method}: {exc}") from exc

    def train_round(self, data: RoundData) -> dict:
        ref = ray.put(data)  # one object-store copy shared by all ranks
        return self._all("train_round", ref)[0]

    def start(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        """Call `method` on every rank without waiting (the weight broadcast runs alongside the engines' receives);
        rank 0's ref first."""
        return [getattr(w, method).remote(*args) for w in self.workers]

    def export_weight_buckets(self, bucket_bytes: int, put: Any, adapter_only: bool = False) -> tuple[list[Any], int]:
        """Rank 0's weight buckets, each passed through `put` inside the rank (see `LearnerWorker`)."""
        return self._all("export_weight_buckets", bucket_bytes, put, adapter_only)[0]

    def save_pretrained(self, path: str) -> str:
        return self._all("save_pretrained", path)[0]

    def save_state(self, path: str) -> None:
        """Optimizer, scheduler, ZeRO shards, EMA, RNG and step counter (see `LearnerWorker.save_state`)."""
        self._all("save_state", path)

    def load_state(self, path: str) -> int:
        """Restore what `save_state` wrote; returns the optimizer step the learner continues from."""
        return self._all("load_state", path)[0]

    def offload_states(self) -> None:
        """Colocation: free the GPU of the optimizer states and weights while the engines generate."""
        self._all("offload_states")

    def reload_states(self) -> None:
        self._all("reload_states")

    def parameter_checksums(self) -> list[float]:
        return self._all("parameter_checksum")

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
