"""Learner -> rollout weight sync: one strategy object per run, chosen by `sync.strategy` (base.py says how they
work; blob.py: object_store and disk; broadcast.py: nccl)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from omni_ray.weight_sync.base import (
    SyncResult,
    WeightSync,
    WeightSyncTimeout,
    blob_tensor_names,
    deserialize_state_dict,
    serialize_state_dict,
)
from omni_ray.weight_sync.blob import DiskSync, ObjectStoreSync
from omni_ray.weight_sync.broadcast import BroadcastSync

#: `sync.strategy` -> its class.
STRATEGIES: dict[str, type[WeightSync]] = {cls.name: cls for cls in (ObjectStoreSync, DiskSync, BroadcastSync)}


def make_weight_sync(
    strategy: str,
    learner: Any,
    rollout: Sequence[Any],
    *,
    bucket_mb: float,
    timeout_s: float,
    restart: Callable[[int], None],
    max_retries: int,
    on_fault: Callable[[str], None] = lambda role: None,
    directory: str = "",
    tensor_parallel_size: int = 1,
    collective_backend: str = "auto",
    adapter_only: bool = False,
) -> WeightSync:
    """The `sync.strategy` named, not yet opened. `adapter_only` (LoRA, blob strategies): the adapter alone travels;
    the nccl broadcast always sends the merged weights."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown weight sync strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    common = dict(bucket_bytes=int(bucket_mb * (1 << 20)), timeout_s=timeout_s, restart=restart,
                  max_retries=max_retries, on_fault=on_fault)  # fmt: skip
    extra: dict[str, Any] = {}
    if strategy == "disk":
        extra = {"directory": directory, "adapter_only": adapter_only}
    elif strategy == "object_store":
        extra = {"adapter_only": adapter_only}
    elif strategy == "nccl":
        extra = {"tensor_parallel_size": tensor_parallel_size, "backend": collective_backend}
    return STRATEGIES[strategy](learner, rollout, **common, **extra)


__all__ = [
    "STRATEGIES",
    "SyncResult",
    "WeightSync",
    "WeightSyncTimeout",
    "blob_tensor_names",
    "deserialize_state_dict",
    "make_weight_sync",
    "serialize_state_dict",
]
