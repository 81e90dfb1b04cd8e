"""The rollout role: a plain class that samples completions from the current policy and accepts new weights.

`RolloutWorker` is deliberately not a Ray actor: tests and debugging sessions call it in-process, and the driver
wraps it with `ray.remote(RolloutWorker)`. Its public methods are everything other roles may ask of it (generate,
the weight-update session, the nccl broadcast, sleep / wake); the engine behind it is a `GenerationBackend`
(rollout/base.py) chosen by `rollout.backend` from `BACKENDS`, imported only when chosen.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

from omni_ray.rollout.base import Completion, GenerationBackend
from omni_ray.tracking import BusyClock

logger = logging.getLogger(__name__)

#: `rollout.backend` -> the backend class, "module:Class" (vLLM alone takes ~11 s to import).
BACKENDS = {
    "vllm": "omni_ray.rollout.vllm_backend:VLLMBackend",
    "hf": "omni_ray.rollout.hf_backend:HFBackend",
}


def vllm_import_error() -> str | None:
    """Why vLLM cannot be imported here, or None when it can (a broken install raises more than ImportError)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def choose_backend(backend: str) -> str:
    """`auto` resolves to vllm when it imports, else hf, and says which and why (a silent fallback would hide a
    broken vLLM behind a ~2x slower engine)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown rollout backend {backend!r}; expected 'auto' or one of {sorted(BACKENDS)}")
        return backend
    error = vllm_import_error()
    chosen = "vllm" if error is None else "hf"
    why = "vllm imports" if error is None else f"vllm cannot be imported ({error})"
    print(f"[omni-ray] rollout.backend=auto: using {chosen}: {why}", flush=True)
    return chosen


def make_backend(model_path: str, *, backend: str = "auto", **options: Any) -> GenerationBackend:
    """Build a backend by name (`BACKENDS`, or "auto"); options go to its constructor."""
    module, _, cls = BACKENDS[choose_backend(backend)].partition(":")
    return getattr(importlib.import_module(module), cls)(model_path, **options)


class StaleWeightsError(RuntimeError):
    """The worker holds another policy version than the caller expects (e.g. it was restarted from the model dir)."""


def read_weight_bucket(blob: bytes | str) -> dict[str, Any]:
    """One bucket of HF-named tensors from safetensors bytes, or from a safetensors file path (the disk strategy)."""
    import safetensors.torch

    if isinstance(blob, str):
        return safetensors.torch.load_file(blob)
    return safetensors.torch.load(bytes(blob))


class RolloutWorker:
    """Samples completions from the current policy and accepts new policy weights.

    A plain class: the driver runs it as `ray.remote(RolloutWorker)`; Ray runs an actor's methods one at a time and in
    order, so a weight update never overlaps a generation.

    Args:
        model_path: HF model directory (config, weights, tokenizer).
        backend: a key of `BACKENDS`, or "auto" (vllm when importable, else hf).
        seed: engine seed (vLLM global seed; HF uses per-call seeds only).
        dtype: "float32" | "bfloat16" | "float16".
        max_model_len: prompt + completion budget in tokens; longer requests raise ValueError.
        trust_remote_code: passed to HF / vLLM loaders.
        num_threads: intra-op threads of the engine in this process (default: $OMNI_RAY_ROLLOUT_THREADS, else the
            process default, which under Ray is the actor's num_cpus).
        **backend_options: backend-specific options, see `VLLMBackend` / `HFBackend`.
    """

    def __init__(
        self,
        model_path: str,
        *,
        backend: str = "auto",
        seed: int = 0,
        dtype: str = "float32",
        max_model_len: int = 64,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        **backend_options: Any,
    ) -> None:
        t0 = time.perf_counter()
        self.model_path = str(model_path)
        self._backend = make_backend(
            self.model_path,
            backend=backend,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
            num_threads=num_threads,
            **backend_options,
        )
        self.backend_name: str = self._backend.name
        self.max_model_len = max_model_len
        self.policy_version = 0
        self.clock = BusyClock()  # "generate" (train samples and eval), "sync" (weight loads)
        self.startup_s = time.perf_counter() - t0

    @property
    def tokenizer(self) -> Any:
        return self._backend.tokenizer

    def ready(self) -> dict[str, Any]:
        """Start-up handshake for the driver (`ray.get(worker.ready.remote(), timeout=...)`)."""
        return {
            "backend": self.backend_name,
            "model_path": self.model_path,
            "policy_version": self.policy_version,
            "startup_s": round(self.startup_s, 2),
            "pid": os.getpid(),
        }

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int,
        seed: int,
        expect_version: int | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt (a list per prompt, in prompt order).

        Greedy when temperature == 0 (the n completions are then identical). Same seed + same weights + same
        prompts -> same outputs; see the backend docstrings for what the engines guarantee beyond that.
        `expect_version`: refuse (StaleWeightsError) unless this worker holds that policy version, so a worker that
        Ray restarted from the model dir never answers with the wrong weights.
        """
        if expect_version is not None and expect_version != self.policy_version:
            raise StaleWeightsError(f"holds policy version {self.policy_version}, the driver expects {expect_version}")
        with self.clock.timing("generate"):
            return self._backend.generate(
                prompt_token_ids, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
            )

    # -- weight updates (omni_ray/weight_sync/): begin, buckets, finish

    def begin_weight_update(self) -> None:
        """Start loading a new policy; until `finish_weight_update` the worker holds no usable version."""
        with self.clock.timing("sync"):
            self.policy_version = -1
            self._backend.begin_weight_update()

    def load_weight_bucket(self, blob: bytes | str) -> int:
        """One bucket of the new policy: safetensors bytes (object store) or a safetensors file (disk)."""
        with self.clock.timing("sync"):
            return self._backend.load_weight_bucket(read_weight_bucket(blob))

    def finish_weight_update(self, version: int) -> int:
        """Check that every weight arrived and record the learner's version number; returns it."""
        with self.clock.timing("sync"):
            self._backend.finish_weight_update()
        self.policy_version = int(version)
        return self.policy_version

    def load_weights(self, blob: bytes | str, version: int) -> int:
        """A whole update from one bucket (a full safetensors state dict): begin, load, finish."""
        self.begin_weight_update()
        self.load_weight_bucket(blob)
        return self.finish_weight_update(version)

    # -- the nccl strategy: this worker's engine joins a broadcast group of its own

    def param_names(self) -> list[str]:
        return self._backend.param_names()

    def open_weight_broadcast(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                              timeout_s: float) -> int:  # fmt: skip
        return self._backend.open_broadcast(host, port, rank_offset, world_size, backend, timeout_s)

    def receive_weight_broadcast(self, wire_buckets: list, version: int) -> int:
        """Receive a full set of weights from learner rank 0 and take its version."""
        self.begin_weight_update()
        with self.clock.timing("sync"):
            self._backend.receive_broadcast(wire_buckets)
        return self.finish_weight_update(version)

    def close_weight_broadcast(self) -> None:
        self._backend.close_broadcast()

    # -- colocation (placement.colocate): free the GPU while the learner trains

    def sleep(self, level: int) -> None:
        self._backend.sleep(level)

    def wake(self, tags: list[str] | None = None) -> None:
        self._backend.wake_up(tags)

    def busy(self) -> dict[str, float]:
        """Seconds spent generating and loading weights since start-up (`BusyClock.totals`)."""
        return self.clock.totals()

    def close(self) -> None:
        """Shut the engine down (frees vLLM's process group, so the process can start another engine)."""
        self._backend.close()


__all__ = ["BACKENDS", "Completion", "RolloutWorker", "StaleWeightsError", "make_backend", "read_weight_bucket"]
