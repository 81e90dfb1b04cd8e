"""The rollout interface: `Completion`, the `GenerationBackend` contract, and the rules every engine shares.

Everything that does not depend on the engine lives here, once, so every backend returns byte-identical structures
for identical token streams:

- argument validation and the prompt-length contract (prompt + max_new_tokens must fit in max_model_len, checked
  up front so every engine fails the same way instead of one truncating silently);
- greedy decoding (temperature == 0) generates ONE sequence per prompt and repeats it n times: greedy samples are
  identical by definition, and vLLM rejects n > 1 with greedy sampling;
- EOS trimming and `Completion` building. `token_ids` INCLUDE the EOS token when generation stopped on EOS, so the
  learner trains the model to stop; `finished` is False when the completion hit max_new_tokens instead;
  `text` is the decoded completion without special tokens;
- per-prompt seed derivation, so prompt i's samples do not depend on which other prompts share the call;
- a weight update as a session (begin, buckets of HF-named tensors, finish) that refuses to finish while any tensor
  of the model's checkpoint is missing: a partly updated policy never generates.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
    """What a generation engine provides; the shared behaviour is implemented here once.

    Subclasses implement `_generate_ids` (raw generated token streams, n per prompt) and `_load_bucket`; engines
    that can free their accelerator memory implement `sleep` / `wake_up`, engines that can join the nccl weight
    broadcast implement its four methods.
    """

    name: ClassVar[str]

    def __init__(self, model_path: str, *, max_model_len: int, trust_remote_code: bool,
                 lora: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        from transformers import AutoTokenizer

        self.model_path = str(model_path)
        self.max_model_len = max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        self.eos_token_ids = eos_token_ids_of(self.model_path, self.tokenizer)
        self.checkpoint_tensor_names = checkpoint_tensor_names(self.model_path)
        # With LoRA (`lora`: rank, alpha, dropout, target_modules) an update carries the adapter alone, on top of the
        # model dir's weights, which stay: the policy is base + adapter.
        self.lora = dict(lora) if lora else None
        self.update_tensor_names = self.checkpoint_tensor_names
        if self.lora:
            from omni_ray.models.adapters import adapter_tensor_names

            self.update_tensor_names = adapter_tensor_names(self.checkpoint_tensor_names, self.lora["target_modules"])
        self._received: set[str] | None = None

    # -- generation

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

    # -- weight updates: begin, any number of buckets (HF names), finish

    def begin_weight_update(self) -> None:
        """Open an update session; the engine must not generate until `finish_weight_update`."""
        self._received = set()
        self._begin_update()

    def load_weight_bucket(self, tensors: Mapping[str, Any]) -> int:
        """Load one bucket of HF-named tensors of the new policy; returns how many."""
        if self._received is None:
            raise RuntimeError("load_weight_bucket outside a weight update: call begin_weight_update first")
        self._received.update(tensors)
        self._load_bucket(tensors)
        return len(tensors)

    def note_received(self, names: Sequence[str]) -> None:
        """Record tensors that arrived without `load_weight_bucket` (a broadcast the engine received itself)."""
        if self._received is None:
            raise RuntimeError("weights received outside a weight update: call begin_weight_update first")
        self._received.update(names)

    def finish_weight_update(self) -> None:
        """Close the session. Every tensor of the model's checkpoint must have arrived: an engine only warns about
        weights it did not reload, which would leave a silently stale policy."""
        received, self._received = self._received, None
        if received is None:
            raise RuntimeError("finish_weight_update without begin_weight_update")
        missing = self.update_tensor_names - received
        if missing:
            raise ValueError(
                f"weight update lacks {len(missing)} of the {'adapter' if self.lora else 'checkpoint'}'s "
                f"{len(self.update_tensor_names)} tensors, e.g. {sorted(missing)[:5]}"
            )
        self._finish_update()

    def _begin_update(self) -> None:
        return None

    @abc.abstractmethod
    def _load_bucket(self, tensors: Mapping[str, Any]) -> None:
        """Load validated tensors into the engine."""

    def _finish_update(self) -> None:
        return None

    # -- optional capabilities

    def sleep(self, level: int) -> None:
        """Free accelerator memory for a colocated learner (level 1: weights to CPU, 2: weights discarded)."""
        raise NotImplementedError(f"the {self.name} backend cannot sleep (placement.colocate needs vLLM on GPU)")

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what `sleep` freed ("weights", "kv_cache"; None: all)."""
        raise NotImplementedError(f"the {self.name} backend cannot sleep (placement.colocate needs vLLM on GPU)")

    def param_names(self) -> list[str]:
        """The engine's own parameter names (what learner tensors must cover for the nccl weight broadcast)."""
        raise TypeError(f"sync.strategy=nccl needs the vLLM rollout backend, not {self.name}")

    def open_broadcast(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                       timeout_s: float) -> int:  # fmt: skip
        """Join the weight-broadcast group; returns this engine's first rank."""
        raise TypeError(f"sync.strategy=nccl needs the vLLM rollout backend, not {self.name}")

    def receive_broadcast(self, wire_buckets: list) -> None:
        """Receive one full set of weights from learner rank 0, inside an update session."""
        raise TypeError(f"sync.strategy=nccl needs the vLLM rollout backend, not {self.name}")

    def close_broadcast(self) -> None:
        raise TypeError(f"sync.strategy=nccl needs the vLLM rollout backend, not {self.name}")

    def close(self) -> None:
        """Release engine resources (processes, process groups). The backend is unusable afterwards."""
        return None
