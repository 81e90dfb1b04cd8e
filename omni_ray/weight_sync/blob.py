"""The blob strategies: the policy travels as safetensors buckets of at most `sync.bucket_mb` each.

Learner rank 0 gathers the weights one parameter at a time (ZeRO-3) and cuts them into buckets; each bucket is
handed to the strategy's `put`, and every rollout worker loads the buckets one call at a time inside one update
session (begin, bucket, ..., finish), so no single object in flight, and no vLLM RPC, is larger than a bucket:

- "object_store": `ray.put` per bucket; every worker reads the same objects (Ray moves each to a node once). Works
  everywhere, CPU-only clusters included; the object store holds the buckets until the push is done.
- "disk": a safetensors file per bucket under `<run dir>/weights/`, written atomically; workers read the files.
  Needs a filesystem shared by the learner and the workers (one node, NFS); for object stores smaller than a model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omni_ray.weight_sync.base import SyncResult, WeightSync, WeightSyncTimeout


class BlobSync(WeightSync):
    """Export buckets through `put`, then drive each worker's update session, retrying a worker that died.
    `adapter_only`: with LoRA, only the adapter travels (the workers hold the base model)."""

    def __init__(self, *args: Any, adapter_only: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter_only = adapter_only

    def _put(self, version: int) -> Callable[[bytes], Any]:
        raise NotImplementedError

    def _discard(self, handles: Sequence[Any]) -> None:
        return None

    def push(
        self, version: int, workers: Sequence[int] | None = None, *, before_load: Callable[[], None] | None = None
    ) -> SyncResult:
        t0 = time.perf_counter()
        handles, num_bytes = self.learner.export_weight_buckets(self.bucket_bytes, self._put(version),
                                                                self.adapter_only)  # fmt: skip
        try:
            if before_load is not None:
                before_load()
            self._deliver(handles, version, list(range(len(self.rollout))) if workers is None else list(workers))
        finally:
            self._discard(handles)
        return SyncResult(version, self.name, num_bytes, len(handles), time.perf_counter() - t0)

    def _start(self, j: int, handles: Sequence[Any], version: int) -> list[Any]:
        w = self.rollout[j]
        return [w.begin_weight_update.remote(), *(w.load_weight_bucket.remote(h) for h in handles),
                w.finish_weight_update.remote(version)]  # fmt: skip

    def _deliver(self, handles: Sequence[Any], version: int, targets: list[int]) -> None:
        import ray

        calls = {j: self._start(j, handles, version) for j in targets}
        failures = dict.fromkeys(targets, 0)
        deadline = time.perf_counter() + self.timeout_s
        while calls:
            finals = {calls[j][-1]: j for j in calls}
            ready, _ = ray.wait(list(finals), num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                late = sorted(calls)
                raise WeightSyncTimeout(f"weight sync v{version} ({self.name}): rollout workers {late} did not "
                                        f"confirm within {self.timeout_s:.0f} s", late)  # fmt: skip
            j = finals[ready[0]]
            try:
                ray.get(calls.pop(j))
            except ray.exceptions.RayActorError as exc:
                failures[j] += 1
                self.on_fault("rollout")
                if failures[j] > self.max_retries:
                    raise RuntimeError(f"rollout worker {j} died {failures[j]} times during weight sync v{version}; "
                                       f"last error: {exc}") from exc  # fmt: skip
                self.restart(j)
                calls[j] = self._start(j, handles, version)
                deadline = time.perf_counter() + self.timeout_s


class ObjectStoreSync(BlobSync):
    name = "object_store"

    def _put(self, version: int) -> Callable[[bytes], Any]:
        import ray

        return ray.put


class BucketFiles:
    """`put` of the disk strategy: writes bucket i of policy `version` to `dir` atomically; returns its path."""

    def __init__(self, directory: str, version: int) -> None:
        self.directory, self.version, self.count = directory, version, 0

    def __call__(self, blob: bytes) -> str:
        path = Path(self.directory) / f"policy_v{self.version:08d}_{self.count:05d}.safetensors"
        self.count += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        return str(path)


class DiskSync(BlobSync):
    name = "disk"

    def __init__(self, *args: Any, directory: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.directory = directory

    def _put(self, version: int) -> Callable[[bytes], Any]:
        return BucketFiles(self.directory, version)

    def _discard(self, handles: Sequence[Any]) -> None:
        for path in handles:  # every worker has read them
            Path(path).unlink(missing_ok=True)
