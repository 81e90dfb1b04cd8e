"""Response log-probs (omni_ray/models/logprobs.py): the chunked selective log-softmax equals the naive
log_softmax-then-gather in value and gradient, padded rows and length-1 responses included, and checkpointing
does not change a model's gradients."""

from __future__ import annotations

import pytest
import torch

from omni_ray.models.logprobs import pack, response_logprobs, selective_log_softmax, sequence_logprobs


def _naive(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_positions", [1, 3, 7, 1000])
def test_selective_log_softmax_equals_the_naive_values_and_gradients(chunk_positions):
    torch.manual_seed(0)
    vocab = 50
    logits = (3 * torch.randn(3, 7, vocab, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, vocab, (3, 7))
    got = selective_log_softmax(logits, targets, chunk_bytes=chunk_positions * 4 * vocab)
    want = _naive(logits, targets)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
    upstream = torch.randn(3, 7)
    (g_got,) = torch.autograd.grad((got * upstream).sum(), logits)
    (g_want,) = torch.autograd.grad((want * upstream.double()).sum(), logits)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-6)


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


# Ragged: prompts of 1-4 tokens, responses of 1-5 (a length-1 response among them), so rows are left- and
# right-padded differently.
PROMPTS = [[5, 6, 7, 8], [9], [10, 11], [12, 13, 14]]
RESPONSES = [[20], [21, 22, 23, 24, 25], [26, 27], [28, 29, 30]]


def test_response_logprobs_equal_each_sequence_scored_alone_and_padding_is_zero():
    model = _model()
    batch = pack(PROMPTS, RESPONSES, pad_id=0)
    got = response_logprobs(model, batch)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : len(p) + len(r) - 1]
        alone = _naive(logits, torch.tensor(r))
        torch.testing.assert_close(got[i, : len(r)], alone, rtol=0, atol=1e-5)
        assert torch.equal(got[i, len(r) :], torch.zeros(batch.response_width - len(r)))
    summed, lengths = sequence_logprobs(model, PROMPTS, RESPONSES, pad_id=0)
    torch.testing.assert_close(summed, got.sum(1))
    assert lengths.tolist() == [1.0, 5.0, 2.0, 3.0]


def test_gradient_checkpointing_on_and_off_gives_the_same_gradients():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _model().train()
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sequence_logprobs(model, PROMPTS, RESPONSES, pad_id=0)[0].sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_pack_refuses_empty_prompts_and_responses_naming_the_row():
    with pytest.raises(ValueError, match="sequence 1: empty prompt"):
        pack([[1], []], [[2], [3]], pad_id=0)
    with pytest.raises(ValueError, match="sequence 0: empty response"):
        pack([[1]], [[]], pad_id=0)
