"""The nccl strategy's parts: bucket planning, flat packing, HF -> vLLM names, a process group of its own.

Learner rank 0 broadcasts the weights over a process group that every vLLM worker of every engine joins (rank 0 =
learner, then engine e's TP worker t at 1 + e * tp + t), in flat buckets of at most `sync.bucket_mb` (one collective
per bucket, bounded memory on both sides). Under ZeRO-3 all learner ranks gather a bucket's shards together, then
rank 0 sends it. The receiving vLLM worker feeds the unpacked tensors, by HF name, into the same update session as
the blob strategies: only the transport differs. The transport is NCCL on GPU; with gloo (`sync.collective_backend`)
the identical protocol runs on CPU, which is how it is tested here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omni_ray.weight_sync.base import SyncResult, WeightSync, WeightSyncTimeout, wait_all

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
    engine has one too. Rank 0 hosts the store (`host_store`, opened first on a port the OS picks and held, so the
    port cannot be taken in between) and passes it in. Every wait is bounded by `timeout_s`: gloo raises; for NCCL,
    torch's watchdog handles a collective past its timeout, which under its default
    (TORCH_NCCL_ASYNC_ERROR_HANDLING=3) ends the process rather than raising.
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        *,
        backend: str,
        timeout_s: float,
        device: Any,
        store: Any = None,
    ) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        if backend not in ("nccl", "gloo"):
            raise ValueError(f"collective backend must be nccl or gloo, got {backend!r}")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = timedelta(seconds=timeout_s)
        self.device = torch.device(device)
        if store is None:
            store = dist.TCPStore(host, port, world_size, is_master=False, timeout=self.timeout)
        store = dist.PrefixStore("omni_ray_weights", store)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout  # torch's only way to give a ProcessGroupNCCL its own timeout
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


def host_store(world_size: int, timeout_s: float) -> Any:
    """The group's TCPStore, listening on a port the OS picks (`.port`); the master rank keeps it for the group."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)  # fmt: skip


def receive_buckets(group: BroadcastGroup, buckets: Sequence[Sequence[TensorSpec]]) -> Iterator[tuple[str, Any]]:
    """Receiver side: (HF name, tensor) bucket by bucket as the broadcasts arrive, for the engine's load_weights."""
    for bucket in buckets:
        _, total = bucket_layout(bucket)
        flat = torch.empty(total, dtype=torch.uint8, device=group.device)
        group.broadcast(flat, src=0)
        yield from unpack_bucket(flat, bucket)


class BroadcastSync(WeightSync):
    """Driver side of the "nccl" strategy: forms the group, then each push is one broadcast round.

    The group's members are learner rank 0 and every worker of every engine. A restarted engine is not a member, so
    after a restart the group is re-formed (every member leaves, a new group opens with the new worker) before the
    next broadcast; a push during which a member died is retried the same way, after Ray's restart.
    """

    name = "nccl"

    def __init__(self, *args: Any, tensor_parallel_size: int = 1, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tp = tensor_parallel_size
        self.backend = backend
        self.buckets: list[list[list[Any]]] = []
        self.num_bytes = 0
        self.formed = False

    @property
    def world_size(self) -> int:
        return 1 + len(self.rollout) * self.tp

    def open(self) -> None:
        """Plan buckets from learner rank 0's parameters, check them against engine 0's names, form the group."""
        import ray

        if self.backend == "auto":
            self.backend = "nccl" if ray.cluster_resources().get("GPU", 0) > 0 else "gloo"
        deadline = time.perf_counter() + self.timeout_s
        wire, engine_names = wait_all(
            [self.learner.start("weight_specs")[0], self.rollout[0].param_names.remote()],
            ["learner rank 0", "rollout worker 0"],
            deadline=deadline,
            what="nccl sync: reading parameter names",
        )
        specs = [TensorSpec.from_wire(w) for w in wire]
        check_name_coverage([s.name for s in specs], engine_names)
        self.buckets = [[s.to_wire() for s in b] for b in plan_buckets(specs, self.bucket_bytes)]
        self.num_bytes = sum(s.nbytes for s in specs)
        self._form()

    def _form(self) -> None:
        deadline = time.perf_counter() + self.timeout_s
        hosting = self.learner.start("host_weight_broadcast", self.world_size, self.timeout_s)
        ((host, port),) = wait_all(hosting[:1], ["learner rank 0"], deadline=deadline, what="nccl sync: the store")
        calls = [w.open_weight_broadcast.remote(host, port, 1 + i * self.tp, self.world_size, self.backend,
                                                self.timeout_s) for i, w in enumerate(self.rollout)]  # fmt: skip
        calls += self.learner.start("join_weight_broadcast", self.backend, self.world_size, self.timeout_s)
        wait_all(calls, self._names(len(calls)), deadline=deadline, what="nccl sync: forming the group")
        self.formed = True

    def _names(self, count: int) -> list[str]:
        names = [f"rollout worker {i}" for i in range(len(self.rollout))]
        return names + [f"learner rank {r}" for r in range(count - len(names))]

    def _leave(self) -> None:
        """Every member that is still alive leaves the group (best effort: one of them just died)."""
        import ray

        refs = [w.close_weight_broadcast.remote() for w in self.rollout] + self.learner.start("close_weight_broadcast")
        ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        self.formed = False

    def worker_restarted(self, index: int) -> None:
        if self.formed:
            self._leave()

    def close(self) -> None:
        if self.formed:
            self._leave()

    def push(
        self, version: int, workers: Sequence[int] | None = None, *, before_load: Callable[[], None] | None = None
    ) -> SyncResult:
        """A broadcast reaches every engine, so `workers` only says who must end up on `version`: all of them do."""
        import ray

        if not self.buckets:
            raise RuntimeError("BroadcastSync.open() was not called")
        t0 = time.perf_counter()
        if before_load is not None:
            before_load()
        attempt = 0
        while True:
            if not self.formed:
                self._form()
            calls = [w.receive_weight_broadcast.remote(self.buckets, version) for w in self.rollout]
            calls += self.learner.start("send_weight_broadcast", self.buckets)
            try:
                wait_all(calls, self._names(len(calls)), deadline=time.perf_counter() + self.timeout_s,
                         what=f"weight sync v{version} (nccl)")  # fmt: skip
                return SyncResult(version, self.name, self.num_bytes, len(self.buckets), time.perf_counter() - t0)
            except (ray.exceptions.RayActorError, WeightSyncTimeout):
                dead = [j for j, ref in enumerate(calls[: len(self.rollout)]) if _died(ref)]
                attempt += 1
                if not dead or attempt > self.max_retries:
                    raise
            ray.wait(calls, num_returns=len(calls), timeout=self.timeout_s)  # the other members fail or time out
            for j in dead:
                self.on_fault("rollout")
                self.restart(j)
            self._leave()


def _died(ref: Any) -> bool:
    import ray

    done, _ = ray.wait([ref], timeout=0)
    if not done:
        return False
    try:
        ray.get(ref)
    except ray.exceptions.RayActorError:
        return True
    except Exception:
        return False
    return False
