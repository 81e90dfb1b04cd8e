"""HF `generate` backend: the fallback when vLLM is not installed, and the reference implementation in tests.

Prompts arrive as token ids, so batching is done here: left padding (decoder-only models continue from the last
position), `prompts_per_batch` prompts per `generate` call with `num_return_sequences=n`. Sampling knobs mirror
vLLM's defaults (top_k disabled, no repetition penalty) so the two backends sample from the same distribution.

Determinism: each batch runs under `torch.random.fork_rng` seeded with `derive_seed(seed, batch_index)`, so a call
does not disturb (or depend on) the process' global RNG, and the same (seed, weights, prompts, prompts_per_batch)
repeats its samples exactly. Changing the batch composition changes which random numbers a prompt consumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from omni_ray.rollout.base import GenerationBackend, derive_seed, resolve_threads


class HFBackend(GenerationBackend):
    """`transformers` AutoModelForCausalLM + `generate`.

    Args (beyond the shared ones):
        prompts_per_batch: prompts per `generate` call (rows = prompts_per_batch * n); bounds activation memory.
        device: torch device for the model ("cpu" default; "cuda" works for debugging on a GPU).
    """

    name = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        dtype: str = "float32",
        max_model_len: int = 64,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        prompts_per_batch: int = 64,
        device: str = "cpu",
        lora: Mapping[str, Any] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        super().__init__(model_path, max_model_len=max_model_len, trust_remote_code=trust_remote_code, lora=lora)
        threads = resolve_threads(num_threads)
        if threads is not None:
            torch.set_num_threads(threads)
        self.seed = seed
        self.prompts_per_batch = prompts_per_batch
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device)
        if self.lora:  # adapter updates load into peft's LoRA layers (B = 0 at first: the base model)
            import peft

            from omni_ray.models.adapters import peft_config

            self.model = peft.get_peft_model(self.model, peft_config(self.lora, self.lora["target_modules"]))
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else min(self.eos_token_ids)

    def _generate_ids(
        self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> list[list[list[int]]]:
        from transformers import GenerationConfig

        sample = temperature > 0
        config = GenerationConfig(
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=0 if sample else None,  # HF defaults to 50; vLLM to disabled
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_token_ids),
        )
        return generate_batched(self.model, prompts, config, prompts_per_batch=self.prompts_per_batch, seed=seed)

    def _begin_update(self) -> None:
        self._pending = set(self.update_tensor_names if self.lora else self.model.state_dict())

    def _load_bucket(self, tensors: Mapping[str, Any]) -> None:
        """An unexpected name is an error, never a silently ignored weight."""
        if self.lora:
            import peft

            result = peft.set_peft_model_state_dict(self.model, dict(tensors))
        else:
            result = self.model.load_state_dict(dict(tensors), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"weights the model does not have: {sorted(result.unexpected_keys)[:5]}")
        self._pending -= set(tensors)

    def _finish_update(self) -> None:
        """Strict as a whole: every weight of the model arrived in some bucket."""
        if self._pending:
            missing = sorted(self._pending)
            raise ValueError(f"weight update lacks {len(missing)} model weights, e.g. {missing[:5]}")


@torch.inference_mode()
def generate_batched(
    model: Any, prompts: list[list[int]], config: Any, *, prompts_per_batch: int, seed: int
) -> list[list[list[int]]]:
    """``model.generate`` over left-padded batches of ``prompts_per_batch`` prompts, each batch under its own seed
    (``derive_seed(seed, batch_index)``, in a forked RNG); returns each prompt's ``config.num_return_sequences``
    generated token streams (prompt tokens cut off, padding after EOS left in)."""
    n = config.num_return_sequences or 1
    device = next(model.parameters()).device
    out: list[list[list[int]]] = []
    for b, start in enumerate(range(0, len(prompts), prompts_per_batch)):
        batch = prompts[start : start + prompts_per_batch]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, b))
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        new = seqs[:, width:].tolist()  # rows are prompt-major: prompt 0's n samples first
        out.extend(new[i * n : (i + 1) * n] for i in range(len(batch)))
    return out
