"""Sequence log-probabilities of responses given prompts, from token ids (never re-tokenized text).

Memory is what shapes this module: at the papers' scale (Gemma-2-9B, a 256k vocabulary, 2k-token responses) the
logits of one micro-batch are the largest tensor of a learner step, and a float32 log-softmax of all of them would
not fit on the GPU (docs/gpu.md, memory plan). So:

- Only the response positions get logits. Prompts are left-padded and responses right-padded to a common width,
  [pad.. prompt | response ..pad], so every row's response starts at the same column and the model is asked for the
  last `R + 1` positions only (HF's `logits_to_keep`); `position_ids` count real tokens, so left padding does not
  shift a row's positions.
- The log-softmax is *selective*: per chunk of positions, the target token's logit minus a float32 logsumexp. Under
  autograd each chunk is recomputed in the backward pass (`torch.utils.checkpoint`), so no float32 copy of the
  logits is ever kept; the model-dtype logits and their gradient are the only [B, R, V] tensors alive.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

#: float32 bytes of logits processed at once by the selective log-softmax (256 MiB: 256 positions of Gemma's 256k
#: vocabulary, 2k of a 32k one). `omni_ray.plan` counts the same chunk.
LOGITS_CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class PackedSequences:
    """A batch of (prompt, response) token sequences laid out as [left pad | prompt | response | right pad].

    input_ids / attention_mask / position_ids: (B, P + R). targets / response_mask: (B, R), the response tokens and
    which of them are real; the logits that predict them are those of positions P - 1 .. P + R - 2.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor

    @property
    def response_width(self) -> int:
        return int(self.targets.shape[1])


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> PackedSequences:
    """Lay out (prompt, response) pairs of token ids; every prompt and every response needs at least one token."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("pack needs at least one sequence")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"sequence {i}: empty prompt (every prompt needs at least one token)")
        if not r:
            raise ValueError(f"sequence {i}: empty response: every response needs at least one token (the EOS counts)")
    width_p, width_r = max(map(len, prompts)), max(map(len, responses))
    b = len(prompts)
    input_ids = torch.full((b, width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width_p + width_r), dtype=torch.long)
    targets = torch.full((b, width_r), pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        start = width_p - len(p)
        input_ids[i, start:width_p] = torch.as_tensor(list(p), dtype=torch.long)
        input_ids[i, width_p : width_p + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        attention[i, start : width_p + len(r)] = 1
        targets[i, : len(r)] = input_ids[i, width_p : width_p + len(r)]
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    response_mask = attention[:, width_p:].to(torch.float32)
    return PackedSequences(
        input_ids.to(device), attention.to(device), positions.to(device), targets.to(device), response_mask.to(device)
    )


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    return x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = LOGITS_CHUNK_BYTES):
    """log_softmax(logits)[..., target] in float32 for logits (B, T, V) and targets (B, T), one chunk of positions
    at a time; equal to the naive computation in value and gradient."""
    b, t, v = logits.shape
    chunk = max(1, chunk_bytes // (4 * v))
    grad = torch.is_grad_enabled() and logits.requires_grad
    rows = []
    for i in range(b):
        parts = []
        for s in range(0, t, chunk):
            x, y = logits[i, s : s + chunk], targets[i, s : s + chunk]
            parts.append(checkpoint(_target_logprobs, x, y, use_reentrant=False) if grad else _target_logprobs(x, y))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def response_logprobs(model: torch.nn.Module, batch: PackedSequences) -> torch.Tensor:
    """(B, R) float32 log-probs of the response tokens (0 at padding)."""
    width = batch.response_width
    kwargs = {"logits_to_keep": width + 1} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, **kwargs
    )
    logits = out.logits[:, -(width + 1) : -1]
    return selective_log_softmax(logits, batch.targets) * batch.response_mask


def sequence_logprobs(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob L(y) per sequence and the response lengths |y| (so l(y) = L(y)/|y|)."""
    device = next(model.parameters()).device
    batch = pack(prompts, responses, pad_id, device)
    return response_logprobs(model, batch).sum(1), batch.response_mask.sum(1)
