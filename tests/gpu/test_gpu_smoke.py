"""GPU smoke tests: one full round (generate -> score -> pairs -> PoP -> train -> sync -> eval) on real GPUs.

`pytest -m gpu` on a CUDA machine with the official vllm wheel, Ray and DeepSpeed (docs/gpu.md). Without CUDA every
test here is reported as skipped with the reason. The model is the offline tiny Llama, so no model hub is needed:
these tests check the GPU path's wiring (placement groups, vLLM on CUDA, NCCL broadcast, sleep / wake), not model
quality.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False"),
]

# bf16 and CUDA graphs (rollout.enforce_eager=auto), as every shipped GPU config runs: vLLM's FlashAttention takes no
# float32, so a float32 smoke test would exercise a backend no real run uses. The tiny model's head_dim 32 is one of
# FlashAttention's sizes.
SMALL_ROUND = [
    "run.rounds=1", "run.save_checkpoints=false", "data.prompts_per_round=64", "data.eval_prompts=64",
    "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6", "rollout.backend=vllm", "rollout.enforce_eager=auto",
    "model.dtype=bfloat16", "rollout.gpu_memory_utilization=0.3", "learner.batch_size=16", "learner.epochs=1",
    "logging.console=false",
]  # fmt: skip


def _needs_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs, found {torch.cuda.device_count()}")


def _run(tmp_path, tiny_model_dir, overrides: list[str]) -> dict:
    from omni_ray.config import load_config
    from omni_ray.driver import train

    cfg = load_config(None, [*SMALL_ROUND, f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", *overrides])
    summary = train(cfg)
    assert summary["rounds_completed"] == 1
    assert summary["rollout_backend"] == "vllm"
    rounds = [json.loads(line) for line in (tmp_path / cfg.run.name / "metrics.jsonl").read_text().splitlines()]
    round_rows = [r for r in rounds if r.get("kind") == "round"]
    assert round_rows and round_rows[0]["pairs_kept"] > 0 and not round_rows[0].get("skipped")
    return summary


def test_one_gpu_colocated_bf16_round_with_cuda_graphs_sleeps_and_wakes_vllm(ray_local, tmp_path, tiny_model_dir):
    """Engine and ZeRO-3 learner rank share GPU 0 (the Llama config's layout): the roles start one after the other,
    vLLM sleeps at level 2 while the learner trains, the learner offloads its states before the weights wake."""
    _run(tmp_path, tiny_model_dir, [
        "run.name=gpu1_colocated", "rollout.num_workers=1", "rollout.num_gpus=1", "learner.num_workers=1",
        "learner.num_gpus=1", "learner.zero_stage=3", "placement.colocate=true", "placement.sleep_level=2",
        "sync.strategy=object_store", "sync.bucket_mb=1",
    ])  # fmt: skip


def test_zero3_learner_ranks_broadcast_weights_over_nccl(ray_local, tmp_path, tiny_model_dir):
    """Engine on GPU 0, two ZeRO-3 ranks on GPUs 1-2 (one with 2 GPUs): every rank gathers each bucket's shards, rank
    0 broadcasts it over NCCL in 1 MB buckets (the Gemma and Qwen configs' path)."""
    _needs_gpus(2)
    ranks = min(2, torch.cuda.device_count() - 1)
    _run(tmp_path, tiny_model_dir, [
        "run.name=gpu_zero3_nccl", "rollout.num_workers=1", "rollout.num_gpus=1", f"learner.num_workers={ranks}",
        "learner.num_gpus=1", "learner.zero_stage=3", "sync.strategy=nccl", "sync.collective_backend=nccl",
        "sync.bucket_mb=1",
    ])  # fmt: skip


def test_tensor_parallel_2_engine_receives_the_nccl_broadcast(ray_local, tmp_path, tiny_model_dir):
    """An engine at TP 2 (vLLM's Ray executor in its placement group) and one learner rank: each TP worker is a
    member of the broadcast group and shards what it receives."""
    _needs_gpus(3)
    _run(tmp_path, tiny_model_dir, [
        "run.name=gpu_tp2", "rollout.num_workers=1", "rollout.num_gpus=1", "rollout.tensor_parallel_size=2",
        "learner.num_workers=1",
        "learner.num_gpus=1", "learner.zero_stage=3", "sync.strategy=nccl", "sync.collective_backend=nccl",
    ])  # fmt: skip
