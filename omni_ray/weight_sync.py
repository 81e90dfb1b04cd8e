"""Learner -> rollout weight transport.

The payload is always one safetensors blob of the HF state dict (HF parameter names), because both rollout
backends already know how to load HF checkpoints by name: vLLM maps and repacks them itself (`reload_weights`),
HF takes them as a state dict. Strategies differ only in how the blob reaches the workers:

- "object_store": `ray.put` once, every worker's `load_weights` receives the same object (Ray moves it to each
  node once). Works everywhere, including CPU-only clusters; costs one copy of the weights in the object store.
- "disk": the blob is written atomically to `disk_dir` and workers read the file. Needs a filesystem shared by
  the learner and all workers (single node, NFS); useful when the object store is too small for the model.

- "nccl": no blob at all. Learner rank 0 broadcasts the weights over a process group of its own that every vLLM
  worker of every engine joins (rank 0 = learner, then engine e's TP worker t at 1 + e * tp + t), in flat buckets of
  at most `bucket_mb` (one collective per bucket, bounded memory on both sides). Under ZeRO-3 all learner ranks
  gather a bucket's shards together, then rank 0 sends it. The receiving vLLM worker feeds the unpacked tensors, by
  HF name, into the same `reload_weights(weights_iterator=...)` as the blob strategies: only the transport differs.
  The transport is NCCL on GPU; with gloo (`collective_backend`) the identical protocol runs on CPU, which is how it
  is tested here. `BroadcastWeightSync` opens the group once (start-up) and pushes every round.

Every push has a deadline: a worker that does not answer in `timeout_s` makes `push_weights` raise
`WeightSyncTimeout` naming it, instead of hanging the round (the failure mode peers report most). The pending call
is not cancelled (Ray cannot interrupt a running actor method); the caller should restart that worker.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

STRATEGIES = ("object_store", "disk", "nccl")


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
        blob_or_ref: safetensors bytes, or a Ray ObjectRef to them (e.g. put by the learner itself); for "nccl" an
            open `BroadcastWeightSync` (the learner sends, the workers receive; no blob exists).
        version: policy version recorded by the workers.
        timeout_s: deadline for all workers together.
        strategy: "object_store", "disk" or "nccl".
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
    if (strategy == "nccl") != isinstance(blob_or_ref, BroadcastWeightSync):
        raise ValueError("strategy='nccl' takes an open BroadcastWeightSync as its source (and only it does)")
    t0 = time.perf_counter()
    path: Path | None = None
    if isinstance(blob_or_ref, BroadcastWeightSync):
        num_bytes = blob_or_ref.num_bytes
        calls = blob_or_ref.start_push(version)
    elif strategy == "object_store":
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

    _wait_all(calls, [repr(w) for w in workers], deadline=t0 + timeout_s, what=f"weight sync v{version} ({strategy})")
    if path is not None:
        path.unlink(missing_ok=True)  # every worker has read it
    return SyncResult(version=version, strategy=strategy, num_bytes=num_bytes, seconds=time.perf_counter() - t0)


def _wait_all(calls: list[Any], names: list[str], *, deadline: float, what: str) -> list[Any]:
    """Wait for every call until `deadline` (perf_counter time); raise WeightSyncTimeout naming the late ones.

    `calls[i]` belongs to `names[i]`; extra calls beyond `names` (e.g. the learner's send) are named "learner".
    """
    import ray

    remaining = max(0.0, deadline - time.perf_counter())
    done, _ = ray.wait(calls, num_returns=len(calls), timeout=remaining)
    done_set = set(done)
    pending = [i for i, c in enumerate(calls) if c not in done_set]
    if pending:
        late = ", ".join(f"#{i} {names[i] if i < len(names) else 'learner'}" for i in pending)
        noun = "rollout workers" if len(calls) == len(names) else "participants (rollout workers, then learner ranks)"
        raise WeightSyncTimeout(
            f"{what}: {len(pending)}/{len(calls)} {noun} did not confirm in time: {late}",
            [i for i in pending if i < len(names)],
        )
    return ray.get(calls)  # re-raises a participant's error


def _write_atomic(path: Path, blob: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The "nccl" strategy: bucket planning, HF -> vLLM names, a process group of its own, sender and driver side.

#: Byte alignment of every tensor inside a flat bucket, so each slice can be viewed as its dtype without a copy.
BUCKET_ALIGN = 16


class WeightNameError(ValueError):
    """Learner and engine disagree on parameter names: a sync would leave some engine weights stale."""


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver needs to allocate one tensor of a bucket: HF name, shape, torch dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= int(d)
        return numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def to_wire(self) -> list[Any]:
        """Plain lists survive every RPC layer (vLLM's msgpack between its processes included)."""
        return [self.name, list(self.shape), self.dtype]

    @classmethod
    def from_wire(cls, item: Sequence[Any]) -> TensorSpec:
        return cls(str(item[0]), tuple(int(d) for d in item[1]), str(item[2]))


def _aligned(n: int) -> int:
    return -(-n // BUCKET_ALIGN) * BUCKET_ALIGN


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into buckets of at most `bucket_bytes` (aligned sizes); a larger tensor goes alone.

    Order is kept because vLLM's layer-wise reload finishes a layer as soon as all its weights arrived: sending in
    model order keeps at most about a bucket of unprocessed weights on the receiver.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        n = _aligned(spec.nbytes)
        if buckets and buckets[-1] and size + n <= bucket_bytes:
            buckets[-1].append(spec)
            size += n
        else:
            buckets.append([spec])
            size = n
    return buckets


def bucket_layout(bucket: Sequence[TensorSpec]) -> tuple[list[int], int]:
    """Byte offset of each tensor in the flat bucket, and the bucket's total size."""
    offsets, pos = [], 0
    for spec in bucket:
        offsets.append(pos)
        pos += _aligned(spec.nbytes)
    return offsets, pos


def pack_bucket(tensors: Sequence[torch.Tensor], bucket: Sequence[TensorSpec], device: torch.device) -> torch.Tensor:
    """One flat uint8 buffer holding the bucket's tensors (cast to the spec dtype) at `bucket_layout` offsets."""
    offsets, total = bucket_layout(bucket)
    flat = torch.zeros(total, dtype=torch.uint8, device=device)
    for t, spec, off in zip(tensors, bucket, offsets):
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"{spec.name}: tensor shape {tuple(t.shape)} != planned {spec.shape}")
        src = t.detach().to(device=device, dtype=getattr(torch, spec.dtype)).contiguous().reshape(-1)
        flat[off : off + spec.nbytes].copy_(src.view(torch.uint8))
    return flat


def unpack_bucket(flat: torch.Tensor, bucket: Sequence[TensorSpec]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `pack_bucket`: (name, view) pairs into `flat` (no copies; keep `flat` alive while using them)."""
    offsets, total = bucket_layout(bucket)
    if flat.numel() != total:
        raise ValueError(f"bucket buffer has {flat.numel()} bytes, the plan says {total}")
    return [
        (spec.name, flat[off : off + spec.nbytes].view(getattr(torch, spec.dtype)).view(spec.shape))
        for spec, off in zip(bucket, offsets)
    ]


#: Prefixes that wrappers add to HF parameter names (DeepSpeed/DDP, torch.compile, FSDP, PEFT).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "base_model.model.")

#: HF projections that vLLM fuses into one parameter: (HF piece, vLLM parameter, shard id). vLLM's own
#: `load_weights` applies the same stacking when it receives HF names (Llama, Qwen2, Gemma2, Mistral share it).
STACKED_PARAMS = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


def normalize_hf_name(name: str) -> str:
    """The checkpoint name of a learner parameter: wrapper prefixes removed (repeatedly, they nest)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        name = name.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")
    return name


def hf_to_vllm_name(name: str) -> tuple[str, str | int | None]:
    """vLLM parameter that an HF checkpoint tensor lands in, and its shard id within a fused parameter (or None).

    The receiver hands vLLM HF names (vLLM maps them itself); this mapping exists to check, once at start-up, that
    every engine parameter is covered by some learner tensor, so a mismatch fails loudly instead of leaving stale
    weights (vLLM only logs unloaded weights).
    """
    name = normalize_hf_name(name)
    for hf_piece, vllm_piece, shard in STACKED_PARAMS:
        token = f".{hf_piece}."
        if token in name:
            return name.replace(token, f".{vllm_piece}."), shard
    return name, None


def check_name_coverage(hf_names: Sequence[str], vllm_names: Sequence[str]) -> None:
    """Raise WeightNameError unless the learner's tensors map onto exactly the engine's parameters.

    Every vLLM parameter must receive something (else it stays stale) and every HF tensor must land somewhere (else
    the learner trains weights the engine never sees). Tied weights appear once on both sides.
    """
    mapped: dict[str, set[Any]] = {}
    for n in hf_names:
        vname, shard = hf_to_vllm_name(n)
        mapped.setdefault(vname, set()).add(shard)
    engine = set(vllm_names)
    unplaced = sorted(set(mapped) - engine)
    stale = sorted(engine - set(mapped))
    if unplaced or stale:
        raise WeightNameError(
            f"learner -> vLLM parameter names disagree: {len(unplaced)} learner tensors map to no engine parameter "
            f"(e.g. {unplaced[:4]}), {len(stale)} engine parameters receive nothing (e.g. {stale[:4]})"
        )


class BroadcastGroup:
    """A process group of its own (TCPStore + ProcessGroupGloo / ProcessGroupNCCL) for weight broadcasts.

    It does not touch torch's default group: learner ranks already use theirs for DeepSpeed, and an in-process vLLM
    engine has one too. Rank 0 hosts the store. Every wait is bounded by `timeout_s` and raises.
    """

    def __init__(
        self, host: str, port: int, rank: int, world_size: int, *, backend: str, timeout_s: float, device: Any
    ) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        if backend not in ("nccl", "gloo"):
            raise ValueError(f"collective backend must be nccl or gloo, got {backend!r}")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = timedelta(seconds=timeout_s)
        self.device = torch.device(device)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=self.timeout)
        store = dist.PrefixStore("omni_ray_weights", store)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, self.timeout)
        self._store = store  # the master store must outlive the group

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        work = self.pg.broadcast([tensor], opts)
        if self.backend == "gloo":
            work.wait(self.timeout)  # raises on timeout
        else:  # NCCL: the wait orders the stream; the group's watchdog aborts a collective past its timeout
            work.wait()
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)
        if shutdown is not None:
            shutdown()


def receive_buckets(group: BroadcastGroup, buckets: Sequence[Sequence[TensorSpec]]) -> Iterator[tuple[str, Any]]:
    """Receiver side: yield (HF name, tensor) bucket by bucket as broadcasts arrive (what `reload_weights` eats)."""
    for bucket in buckets:
        _, total = bucket_layout(bucket)
        flat = torch.empty(total, dtype=torch.uint8, device=group.device)
        group.broadcast(flat, src=0)
        yield from unpack_bucket(flat, bucket)


# -- learner side: run inside a LearnerWorker actor through Ray's `__ray_call__` (fn(actor_instance, *args)).


def learner_tensor_specs(worker: Any) -> list[list[Any]]:
    """The learner's parameters in model order, HF names, full shapes (ZeRO-3 keeps them in `ds_shape`)."""
    specs = []
    for name, p in worker.engine.module.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        specs.append(TensorSpec(normalize_hf_name(name), tuple(int(d) for d in shape), str(p.dtype)[6:]).to_wire())
    return specs


def learner_open(worker: Any, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> int:
    """Rank 0 joins the broadcast group as its root (and hosts the store); other ranks only take part in gathers."""
    if worker.rank == 0:
        worker._omni_broadcast = BroadcastGroup(
            host, port, 0, world_size, backend=backend, timeout_s=timeout_s, device=worker.device
        )
    return worker.rank


def learner_send(worker: Any, wire_buckets: list[list[list[Any]]]) -> int:
    """Every learner rank: gather each bucket's ZeRO-3 shards (collective), rank 0 packs and broadcasts it."""
    import deepspeed

    params = {normalize_hf_name(n): p for n, p in worker.engine.module.named_parameters()}
    sent = 0
    for wire in wire_buckets:
        bucket = [TensorSpec.from_wire(w) for w in wire]
        tensors = [params[s.name] for s in bucket]
        with torch.no_grad(), deepspeed.zero.GatheredParameters(tensors, enabled=bool(worker.zero3)):
            if worker.rank == 0:
                flat = pack_bucket(tensors, bucket, worker.device)
                worker._omni_broadcast.broadcast(flat, src=0)
                sent += flat.numel()
    return sent


def learner_close(worker: Any) -> None:
    group = getattr(worker, "_omni_broadcast", None)
    if group is not None:
        group.close()
        worker._omni_broadcast = None


# -- rollout side: run inside a RolloutWorker actor; the engine (VLLMBackend) does the receiving.


def _engine(worker: Any) -> Any:
    backend = getattr(worker, "_backend", None)
    if backend is None or not hasattr(backend, "open_broadcast"):
        raise TypeError(
            f"sync.strategy=nccl needs the vLLM rollout backend, not {getattr(worker, 'backend_name', '?')}"
        )
    return backend


def rollout_param_names(worker: Any) -> list[str]:
    return _engine(worker).param_names()


def rollout_open(
    worker: Any, host: str, port: int, rank_offset: int, world_size: int, backend: str, timeout_s: float
) -> int:
    return _engine(worker).open_broadcast(host, port, rank_offset, world_size, backend, timeout_s)


def rollout_receive(worker: Any, wire_buckets: list[list[list[Any]]], version: int) -> int:
    with worker.clock.timing("sync"):
        _engine(worker).receive_broadcast(wire_buckets)
    worker.policy_version = int(version)
    return worker.policy_version


def rollout_close(worker: Any) -> None:
    _engine(worker).close_broadcast()


class BroadcastWeightSync:
    """Driver side of the "nccl" strategy: opens the group once, then each `push_weights` is one broadcast round.

    Args:
        learner_workers: the LearnerGroup's actor handles (rank order).
        rollout_workers: RolloutWorker actor handles (vLLM backend), each an engine of `tensor_parallel_size` workers.
        backend: "nccl" or "gloo" ("auto": nccl when the driver sees CUDA devices in the cluster, else gloo).
        bucket_mb: bucket size; bounds the extra memory per side to one bucket.
        timeout_s: deadline for opening the group and for each push.
    """

    def __init__(
        self,
        learner_workers: Sequence[Any],
        rollout_workers: Sequence[Any],
        *,
        tensor_parallel_size: int = 1,
        backend: str = "auto",
        bucket_mb: float = 512.0,
        timeout_s: float = 120.0,
    ) -> None:
        self.learners, self.rollout = list(learner_workers), list(rollout_workers)
        self.tp = tensor_parallel_size
        self.backend = backend
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.timeout_s = timeout_s
        self.buckets: list[list[list[Any]]] = []
        self.num_bytes = 0

    def open(self) -> None:
        """Plan buckets from rank 0's parameters, check names against engine 0, join every process to the group."""
        import ray

        if self.backend == "auto":
            self.backend = "nccl" if ray.cluster_resources().get("GPU", 0) > 0 else "gloo"
        t0 = time.perf_counter()
        deadline = t0 + self.timeout_s
        lead = self.learners[0]
        host, port = ray.get(lead.node_address.remote(), timeout=self.timeout_s)
        specs_ref = lead.__ray_call__.remote(learner_tensor_specs)
        names_ref = self.rollout[0].__ray_call__.remote(rollout_param_names)
        wire, engine_names = _wait_all(
            [specs_ref, names_ref],
            ["learner rank 0", "rollout #0"],
            deadline=deadline,
            what="nccl sync: reading parameter names",
        )
        specs = [TensorSpec.from_wire(w) for w in wire]
        check_name_coverage([s.name for s in specs], engine_names)
        self.buckets = [[s.to_wire() for s in b] for b in plan_buckets(specs, self.bucket_bytes)]
        self.num_bytes = sum(s.nbytes for s in specs)
        world = 1 + len(self.rollout) * self.tp
        calls = [
            w.__ray_call__.remote(rollout_open, host, port, 1 + i * self.tp, world, self.backend, self.timeout_s)
            for i, w in enumerate(self.rollout)
        ] + [lead.__ray_call__.remote(learner_open, host, port, world, self.backend, self.timeout_s)]
        _wait_all(calls, [repr(w) for w in self.rollout], deadline=deadline, what="nccl sync: opening the group")

    def start_push(self, version: int) -> list[Any]:
        """Start one broadcast round: every rollout worker receives, every learner rank sends (ZeRO-3 gathers)."""
        if not self.buckets:
            raise RuntimeError("BroadcastWeightSync.open() was not called")
        receivers = [w.__ray_call__.remote(rollout_receive, self.buckets, version) for w in self.rollout]
        senders = [w.__ray_call__.remote(learner_send, self.buckets) for w in self.learners]
        return receivers + senders

    def close(self) -> None:
        """Best-effort teardown (actors are usually killed right after)."""
        import ray

        refs = [w.__ray_call__.remote(rollout_close) for w in self.rollout]
        refs += [w.__ray_call__.remote(learner_close) for w in self.learners]
        ray.wait(refs, num_returns=len(refs), timeout=10)
