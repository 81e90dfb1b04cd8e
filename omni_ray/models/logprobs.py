"""Sequence log-probabilities of responses given prompts, from token ids (never re-tokenized text)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and a response mask aligned with the *targets* (positions 1..T)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    target_mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        target_mask[i, len(p) - 1 : len(s) - 1] = 1.0  # target t+1 is a response token
    return input_ids.to(device), attention.to(device), target_mask.to(device)


def sequence_logprobs(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob L(y) per sequence and the response lengths |y| (so l(y) = L(y)/|y|)."""
    device = next(model.parameters()).device
    input_ids, attention, mask = pack(prompts, responses, pad_id, device)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    token_logp = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(2)
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("empty response: every response needs at least one token (the EOS counts)")
    return (token_logp * mask).sum(1), lengths
