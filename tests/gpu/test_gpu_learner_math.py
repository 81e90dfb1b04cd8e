"""GPU checks that need only torch and transformers (no Ray, vLLM or DeepSpeed): what the learner computes on CUDA.

- selective log-probs of bf16 logits against the naive float32 values (models/logprobs.py);
- gradients with and without activation checkpointing on a small HF Llama;
- `omni-ray plan`'s activation and logits terms for one micro-batch against `torch.cuda.max_memory_allocated`;
- the accelerator DeepSpeed would be given, and bucketed weight serialization of CUDA bf16 tensors.

`pytest -m gpu tests/gpu/test_gpu_learner_math.py` on a bare CUDA box. Without CUDA every test is skipped with the
reason. Models are random-weight HF Llamas built in the test, so no model hub is needed.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False"),
]

VOCAB = 32000


def _llama(hidden: int = 256, layers: int = 2, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=1024, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config).to("cuda", dtype)


def _batch(pairs: int, prompt: int, response: int, seed: int = 0):
    """Ragged prompts and responses (one a token shorter than the other), one response of length 1."""
    from omni_ray.models.logprobs import pack

    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    prompts = [ids(prompt - i % 2) for i in range(2 * pairs)]
    responses = [ids(1 if i == 0 else response - i % 2) for i in range(2 * pairs)]
    return pack(prompts, responses, pad_id=0, device="cuda")


def test_selective_logprobs_of_bf16_logits_equal_the_naive_float32_values():
    from omni_ray.models.logprobs import selective_log_softmax

    torch.manual_seed(0)
    logits = (4 * torch.randn(4, 33, VOCAB, device="cuda")).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, VOCAB, (4, 33), device="cuda")
    # A chunk of 5 positions, so several chunks and a ragged last one are exercised.
    got = selective_log_softmax(logits, targets, chunk_bytes=5 * 4 * VOCAB)
    naive = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive, rtol=0, atol=1e-4)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_naive,) = torch.autograd.grad(naive.sum(), logits)
    # bf16 gradients: one bf16 rounding of the same float32 values.
    torch.testing.assert_close(g_got.float(), g_naive.float(), rtol=1e-2, atol=1e-3)


def test_response_logprobs_in_bf16_are_close_to_float32():
    from omni_ray.models.logprobs import response_logprobs

    batch = _batch(pairs=2, prompt=24, response=16)
    fp32 = response_logprobs(_llama(), batch)
    bf16 = response_logprobs(_llama(dtype=torch.bfloat16), batch)
    mask = batch.response_mask.bool()
    assert torch.equal(fp32[~mask], torch.zeros_like(fp32[~mask])) and torch.equal(bf16[~mask], fp32[~mask])
    # Same weights (seeded), bf16 forward: per-token log-probs of a random model near log(1/32000) = -10.4.
    assert (bf16[mask] - fp32[mask]).abs().max().item() < 0.25


def test_gradient_checkpointing_gives_the_same_gradients_on_cuda():
    from omni_ray.models.logprobs import response_logprobs

    batch = _batch(pairs=2, prompt=24, response=16)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _llama()
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        response_logprobs(model, batch).sum().backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_planned_activation_and_logits_terms_match_cuda_peak(checkpointing):
    """One bf16 micro-batch's forward + backward; the peak above the resting weights and gradients against the
    plan's larger phase. The CPU calibration's tolerance is 25% (docs/gpu.md); CUDA kernels keep other workspaces
    (cuBLAS, SDPA), so this gets 40%: a check that the plan's terms are of the right size on the real device."""
    from omni_ray.models.logprobs import response_logprobs
    from omni_ray.plan import ModelShape, StepShape, activation_phases

    model = _llama(hidden=512, layers=4, dtype=torch.bfloat16)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    pairs, prompt, response = 4, 128, 128
    batch = _batch(pairs=pairs, prompt=prompt, response=response)
    for p in model.parameters():  # the gradients are resting memory in the plan, not activations
        p.grad = torch.zeros_like(p)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resting = torch.cuda.memory_allocated()
    response_logprobs(model, batch).sum().backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - resting
    shape = ModelShape.from_config(model.config)
    step = StepShape(sequences=2 * pairs, width=prompt + response, response=response)
    planned = max(phase.total for phase in activation_phases(shape, step, 2, checkpointing=checkpointing))
    print(f"checkpointing={checkpointing}: measured {measured / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB")
    assert planned == pytest.approx(measured, rel=0.4)


def test_deepspeed_is_given_cuda_where_there_is_a_cuda_device(monkeypatch):
    from omni_ray.learner.worker import select_accelerator

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert select_accelerator() == "cuda"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # a user's explicit choice wins
    assert select_accelerator() == "cpu"


def test_bucketed_serialization_of_cuda_bf16_weights_round_trips_within_the_bucket_size():
    from omni_ray.weight_sync.base import buckets_of, deserialize_state_dict, serialize_state_dict

    model = _llama(hidden=512, layers=4, dtype=torch.bfloat16)
    state = dict(model.state_dict())
    bucket_bytes = 8 << 20
    got: dict[str, torch.Tensor] = {}
    for bucket in buckets_of(state.items(), bucket_bytes):
        blob = serialize_state_dict(bucket)
        largest = max(t.numel() * t.element_size() for t in bucket.values())
        assert len(blob) <= max(bucket_bytes, largest) + (1 << 16), list(bucket)
        got.update(deserialize_state_dict(blob))
    assert got.keys() == state.keys()
    for name, tensor in state.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor.cpu()), name
