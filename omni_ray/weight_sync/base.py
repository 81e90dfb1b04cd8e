"""The weight-sync interface (learner -> rollout workers) and what every strategy shares.

A strategy is opened once per run, pushes the learner's current policy into the rollout workers after each
training round (or into one restarted worker), and is closed at the end, as NeMo-RL's `WeightSynchronizer` and
verl's checkpoint engines are. The payload is always HF-named tensors, because every rollout backend loads HF
checkpoints by name (vLLM maps, fuses and repacks them itself); strategies differ in how the tensors travel.

Every push has a deadline: a worker that does not answer in `sync.timeout_s` makes the push raise
`WeightSyncTimeout` naming it, instead of hanging the round (the failure mode peers report most). A worker that
dies during a push is restarted by Ray and pushed to again, like a failed generate call, at most
`rollout.max_retries` times.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import safetensors.torch
import torch


class WeightSyncTimeout(TimeoutError):
    """Some participants did not confirm a weight load before the deadline."""

    def __init__(self, message: str, pending: list[int]) -> None:
        super().__init__(message)
        self.pending = pending  # rollout worker indices


@dataclass(frozen=True)
class SyncResult:
    """What a push did, for the round's metrics."""

    version: int
    strategy: str
    num_bytes: int
    buckets: int
    seconds: float


def serialize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of (part of) a state dict: detached, contiguous CPU tensors.

    Tied weights (embed_tokens / lm_head sharing storage) are cloned, because safetensors refuses tensors that share
    memory; receivers load both names, which is what an HF state dict contains.
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


def buckets_of(
    tensors: Iterable[tuple[str, torch.Tensor | None]], bucket_bytes: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive (name, tensor) pairs grouped into buckets of at most `bucket_bytes`; a larger tensor goes alone.
    None tensors are skipped, but the input is consumed to its end (a collective gather may be producing it)."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        if tensor is None:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = tensor
        size += nbytes
    if bucket:
        yield bucket


def deserialize_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `serialize_state_dict` (CPU tensors)."""
    return safetensors.torch.load(bytes(blob))


def blob_tensor_names(blob: bytes) -> set[str]:
    """Tensor names in a safetensors blob, read from its header without deserializing the tensors."""
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(bytes(blob[8 : 8 + header_len]))
    header.pop("__metadata__", None)
    return set(header)


def wait_all(calls: Sequence[Any], names: Sequence[str], *, deadline: float, what: str) -> list[Any]:
    """Results of every call (Ray refs) by `deadline` (perf_counter time); `WeightSyncTimeout` names the late ones,
    and a participant's error is raised as it is. `names[i]` names `calls[i]`."""
    import ray

    remaining = max(0.0, deadline - time.perf_counter())
    done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=remaining)
    done_set = set(done)
    pending = [i for i, c in enumerate(calls) if c not in done_set]
    if pending:
        late = ", ".join(names[i] for i in pending)
        raise WeightSyncTimeout(f"{what}: {len(pending)}/{len(calls)} did not confirm in time: {late}", pending)
    return ray.get(list(calls))


class WeightSync(abc.ABC):
    """Learner -> rollout transport for one run.

    Args:
        learner: the LearnerGroup (exports buckets, or sends the broadcast).
        rollout: the rollout workers' actor handles (a restarted actor keeps its handle).
        bucket_bytes: no single object in flight is larger (a tensor larger than this travels alone).
        timeout_s: deadline of one push, of opening, of each retry.
        restart: `restart(j)` blocks until Ray has restarted worker j (the driver's fault handling).
        max_retries: pushes to a worker that died, per worker and push.
        on_fault: called with "rollout" for every worker failure survived (the round's `faults_rollout`).
    """

    name: ClassVar[str]

    def __init__(
        self,
        learner: Any,
        rollout: Sequence[Any],
        *,
        bucket_bytes: int,
        timeout_s: float,
        restart: Callable[[int], None],
        max_retries: int,
        on_fault: Callable[[str], None] = lambda role: None,
    ) -> None:
        self.learner, self.rollout = learner, list(rollout)
        self.bucket_bytes, self.timeout_s = int(bucket_bytes), timeout_s
        self.restart, self.max_retries, self.on_fault = restart, max_retries, on_fault

    def open(self) -> None:
        """Set-up before the first push (the broadcast group); nothing for the blob strategies."""
        return None

    @abc.abstractmethod
    def push(
        self, version: int, workers: Sequence[int] | None = None, *, before_load: Callable[[], None] | None = None
    ) -> SyncResult:
        """Load the learner's current weights into `workers` (default: all) as policy `version`. `before_load` runs
        after the learner has exported and before any worker loads (colocation wakes the engines' weights there)."""

    def worker_restarted(self, index: int) -> None:
        """Worker `index` came back from a restart outside a push (it holds the model dir's weights)."""
        return None

    def close(self) -> None:
        return None
