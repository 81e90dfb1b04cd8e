"""Learner -> rollout weight transport.

The payload is always one safetensors blob of the HF state dict (HF parameter names), because both rollout
backends already know how to load HF checkpoints by name: vLLM maps and repacks them itself (`reload_weights`),
HF takes them as a state dict. Strategies differ only in how the blob reaches the workers:

- "object_store": `ray.put` once, every worker's `load_weights` receives the same object (Ray moves it to each
  node once). Works everywhere, including CPU-only clusters; costs one copy of the weights in the object store.
- "disk": the blob is written atomically to `disk_dir` and workers read the file. Needs a filesystem shared by
  the learner and all workers (single node, NFS); useful when the object store is too small for the model.

Every push has a deadline: a worker that does not answer in `timeout_s` makes `push_weights` raise
`WeightSyncTimeout` naming it, instead of hanging the round (the failure mode peers report most). The pending call
is not cancelled (Ray cannot interrupt a running actor method); the caller should restart that worker.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

STRATEGIES = ("object_store", "disk")


class WeightSyncTimeout(TimeoutError):
    """Some rollout workers did not confirm a weight load before the deadline."""

    def __init__(self, message: str, pending: list[int]) -> None:
        super().__init__(message)
        self.pending = pending  # indices into the `workers` list


@dataclass(frozen=True)
class SyncResult:
    """What a push did, for the driver's metrics. num_bytes is -1 when the caller passed an ObjectRef."""

    version: int
    strategy: str
    num_bytes: int
    seconds: float


def serialize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a state dict: detached, contiguous CPU tensors.

    Tied weights (e.g. embed_tokens / lm_head sharing storage) are cloned, because safetensors refuses tensors that
    share memory; receivers load both names, which is what an HF state dict contains.
    """
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return safetensors.torch.save(out)


def deserialize_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `serialize_state_dict` (CPU tensors)."""
    return safetensors.torch.load(bytes(blob))


def blob_tensor_names(blob: bytes) -> set[str]:
    """Tensor names in a safetensors blob, read from its header without deserializing the tensors."""
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(bytes(blob[8 : 8 + header_len]))
    header.pop("__metadata__", None)
    return set(header)


def push_weights(
    workers: Sequence[Any],
    blob_or_ref: Any,
    version: int,
    timeout_s: float = 120.0,
    *,
    strategy: str = "object_store",
    disk_dir: str | os.PathLike[str] | None = None,
) -> SyncResult:
    """Load one weight blob into every rollout worker (Ray actor handles of `RolloutWorker`) and wait for all.

    Args:
        workers: actor handles exposing `load_weights(blob, version)` / `load_weights_from_file(path, version)`.
        blob_or_ref: safetensors bytes, or a Ray ObjectRef to them (e.g. put by the learner itself).
        version: policy version recorded by the workers.
        timeout_s: deadline for all workers together.
        strategy: "object_store" or "disk".
        disk_dir: directory for the "disk" strategy (must be visible to every worker).

    Raises:
        WeightSyncTimeout: a worker did not answer in time (the message lists which).
        ray.exceptions.RayTaskError: a worker failed to load (e.g. mismatched parameter names).
    """
    import ray

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown weight sync strategy {strategy!r}; expected one of {STRATEGIES}")
    if not workers:
        raise ValueError("push_weights needs at least one rollout worker")
    t0 = time.perf_counter()
    path: Path | None = None
    if strategy == "object_store":
        ref = blob_or_ref if isinstance(blob_or_ref, ray.ObjectRef) else ray.put(blob_or_ref)
        num_bytes = len(blob_or_ref) if isinstance(blob_or_ref, bytes | bytearray) else -1
        calls = [w.load_weights.remote(ref, version) for w in workers]
    else:
        if disk_dir is None:
            raise ValueError("strategy='disk' needs disk_dir")
        blob = ray.get(blob_or_ref, timeout=timeout_s) if isinstance(blob_or_ref, ray.ObjectRef) else blob_or_ref
        num_bytes = len(blob)
        path = _write_atomic(Path(disk_dir) / f"policy_v{version:08d}.safetensors", blob)
        calls = [w.load_weights_from_file.remote(str(path), version) for w in workers]

    remaining = max(0.0, timeout_s - (time.perf_counter() - t0))
    done, _ = ray.wait(calls, num_returns=len(calls), timeout=remaining)
    done_set = set(done)
    pending = [i for i, c in enumerate(calls) if c not in done_set]
    if pending:
        names = ", ".join(f"#{i} {workers[i]!r}" for i in pending)
        raise WeightSyncTimeout(
            f"weight sync v{version} ({strategy}): {len(pending)}/{len(workers)} rollout workers did not confirm "
            f"within {timeout_s:.1f}s: {names}",
            pending,
        )
    ray.get(calls)  # re-raises a worker's load error
    if path is not None:
        path.unlink(missing_ok=True)  # every worker has read it
    return SyncResult(version=version, strategy=strategy, num_bytes=num_bytes, seconds=time.perf_counter() - t0)


def _write_atomic(path: Path, blob: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return path
