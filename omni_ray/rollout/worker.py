"""The rollout role: a plain class that samples completions from the current policy and accepts new weights.

`RolloutWorker` is deliberately not a Ray actor: tests and debugging sessions call it in-process, and the driver
wraps it with `ray.remote(RolloutWorker)`. The generation engine is a `GenerationBackend` (vLLM by default, HF
`generate` as the fallback); everything that does not depend on the engine lives here, once, so both backends
return byte-identical structures for identical token streams:

- argument validation and the prompt-length contract (prompt + max_new_tokens must fit in max_model_len, checked
  up front so both engines fail the same way instead of one truncating silently);
- greedy decoding (temperature == 0) generates ONE sequence per prompt and repeats it n times: greedy samples are
  identical by definition, and vLLM rejects n > 1 with greedy sampling;
- EOS trimming and `Completion` building. `token_ids` INCLUDE the EOS token when generation stopped on EOS, so the
  learner trains the model to stop; `finished` is False when the completion hit max_new_tokens instead;
  `text` is the decoded completion without special tokens;
- per-prompt seed derivation, so prompt i's samples do not depend on which other prompts share the call.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omni_ray.tracking import BusyClock
from omni_ray.weight_sync import blob_tensor_names

logger = logging.getLogger(__name__)

#: Env var read when `num_threads` is not passed: intra-op threads of the generation engine in this process.
THREADS_ENV = "OMNI_RAY_ROLLOUT_THREADS"


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt.

    token_ids: generated ids only (no prompt), including the EOS token when `finished`.
    finished: True when generation stopped on EOS, False when it ran into max_new_tokens.
    """

    text: str
    token_ids: list[int]
    finished: bool


def derive_seed(seed: int, index: int) -> int:
    """A 56-bit seed for prompt `index` of a call seeded with `seed`.

    Hashing (rather than seed + index) keeps the streams of consecutive calls (seed, seed + 1, ...) disjoint, and
    leaves room for vLLM's per-sample offsets (sample k of a prompt uses seed + k).
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def trim_completion(token_ids: Sequence[int], eos_token_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Cut a raw generated stream after its first EOS (kept) and report whether it finished.

    HF pads finished rows of a batch with pad tokens after EOS (pad may even equal EOS); vLLM stops at EOS. Cutting
    at the first EOS makes both streams identical.
    """
    ids = [int(t) for t in token_ids]
    for i, tok in enumerate(ids):
        if tok in eos_token_ids:
            return ids[: i + 1], True
    return ids, False


def eos_token_ids_of(model_path: str | Path, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a completion: the tokenizer's EOS plus generation_config.json's eos_token_id(s)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        gen_eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except OSError:  # no generation_config.json
        gen_eos = None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(t) for t in gen_eos)
    if not ids:
        raise ValueError(f"{model_path}: neither the tokenizer nor generation_config.json defines an EOS token")
    return frozenset(ids)


def checkpoint_tensor_names(model_path: str | Path) -> frozenset[str]:
    """Tensor names of the model's safetensors checkpoint (headers only); empty when it has no safetensors files."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return frozenset(names)


def resolve_threads(num_threads: int | None) -> int | None:
    """The requested engine thread count: the argument, else $OMNI_RAY_ROLLOUT_THREADS, else None (leave as is)."""
    if num_threads is None and os.environ.get(THREADS_ENV):
        num_threads = int(os.environ[THREADS_ENV])
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return num_threads


class GenerationBackend(abc.ABC):
    """What a generation engine must provide; the shared behaviour is implemented here once.

    Subclasses implement `_generate_ids` (raw generated token streams, n per prompt) and `load_weights`.
    """

    name: ClassVar[str]

    def __init__(self, model_path: str, *, max_model_len: int, trust_remote_code: bool) -> None:
        from transformers import AutoTokenizer

        self.model_path = str(model_path)
        self.max_model_len = max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        self.eos_token_ids = eos_token_ids_of(self.model_path, self.tokenizer)
        self.checkpoint_tensor_names = checkpoint_tensor_names(self.model_path)

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[list[Completion]]:
        """n completions per prompt, in prompt order. temperature == 0 means greedy (n identical completions)."""
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature=}, {top_p=}")
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; + max_new_tokens={max_new_tokens} exceeds "
                    f"max_model_len={self.max_model_len}"
                )
        if not prompts:
            return []
        greedy = temperature == 0
        raw = self._generate_ids(
            prompts,
            n=1 if greedy else n,
            temperature=temperature,
            top_p=1.0 if greedy else top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
        if len(raw) != len(prompts):
            raise RuntimeError(f"{self.name} backend returned {len(raw)} results for {len(prompts)} prompts")
        out = [[self._completion(ids) for ids in streams] for streams in raw]
        return [row * n for row in out] if greedy else out

    def _completion(self, raw_ids: Sequence[int]) -> Completion:
        ids, finished = trim_completion(raw_ids, self.eos_token_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(text=text, token_ids=ids, finished=finished)

    @abc.abstractmethod
    def _generate_ids(
        self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> list[list[list[int]]]:
        """Raw generated ids, [prompt][sample] -> ids (EOS and any padding after it may be present).

        Sampling must be seeded from `seed` so that a repeated call with the same weights repeats its output.
        temperature == 0 is greedy and comes with n == 1.
        """

    def load_weights(self, blob: bytes) -> None:
        """Replace the policy weights with a safetensors blob of an HF state dict (HF parameter names).

        Every tensor of the model's checkpoint must be in the blob: vLLM only logs a warning for weights it did not
        reload, which would leave a silently stale policy. Extra names (e.g. a tied lm_head.weight that
        save_pretrained drops) are left to the engine.
        """
        if self.checkpoint_tensor_names:
            missing = self.checkpoint_tensor_names - blob_tensor_names(blob)
            if missing:
                raise ValueError(
                    f"weight blob lacks {len(missing)} of the checkpoint's {len(self.checkpoint_tensor_names)} "
                    f"tensors, e.g. {sorted(missing)[:5]}"
                )
        self._load_weights(blob)

    @abc.abstractmethod
    def _load_weights(self, blob: bytes) -> None:
        """Load a validated blob into the engine."""

    def close(self) -> None:
        """Release engine resources (processes, process groups). The backend is unusable afterwards."""
        return None  # nothing to release by default (the HF backend's model is freed by garbage collection)


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError (e.g. torchvision mismatch)
        logger.warning("vllm is not importable (%s: %s); falling back to the HF backend", type(exc).__name__, exc)
        return False
    return True


def make_backend(
    model_path: str,
    *,
    backend: str = "auto",
    seed: int = 0,
    dtype: str = "float32",
    max_model_len: int = 64,
    trust_remote_code: bool = False,
    num_threads: int | None = None,
    **options: Any,
) -> GenerationBackend:
    """Build a backend by name ("vllm", "hf", or "auto" = vllm when importable, else hf)."""
    if backend == "auto":
        backend = "vllm" if _vllm_importable() else "hf"
    common: dict[str, Any] = {
        "seed": seed,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "trust_remote_code": trust_remote_code,
        "num_threads": num_threads,
    }
    if backend == "vllm":
        from omni_ray.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(model_path, **common, **options)
    if backend == "hf":
        from omni_ray.rollout.hf_backend import HFBackend

        return HFBackend(model_path, **common, **options)
    raise ValueError(f"unknown rollout backend {backend!r}; expected 'auto', 'vllm' or 'hf'")


class StaleWeightsError(RuntimeError):
    """The worker holds another policy version than the caller expects (e.g. it was restarted from the model dir)."""


class RolloutWorker:
    """Samples completions from the current policy and accepts new policy weights.

    A plain class: the driver runs it as `ray.remote(RolloutWorker)`; Ray runs an actor's methods one at a time,
    so a weight load never overlaps a generation.

    Args:
        model_path: HF model directory (config, weights, tokenizer).
        backend: "vllm", "hf", or "auto" (vllm when importable, else hf).
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

    def load_weights(self, blob: bytes, version: int | None = None) -> int:
        """Load new policy weights (safetensors bytes of an HF state dict); returns the new policy version.

        `version` is the learner's version number; without it the worker's counter is incremented.
        """
        with self.clock.timing("sync"):
            self._backend.load_weights(blob)
        self.policy_version = self.policy_version + 1 if version is None else int(version)
        return self.policy_version

    def load_weights_from_file(self, path: str, version: int | None = None) -> int:
        """`load_weights` from a safetensors file (the disk sync strategy; needs a filesystem shared with the
        learner)."""
        return self.load_weights(Path(path).read_bytes(), version)

    def busy(self) -> dict[str, float]:
        """Seconds spent generating and loading weights since start-up (`BusyClock.totals`)."""
        return self.clock.totals()

    def close(self) -> None:
        """Shut the engine down (frees vLLM's process group, so the process can start another engine)."""
        self._backend.close()
