"""GPU smoke tests: one full round (generate -> score -> pairs -> PoP -> train -> sync -> eval) on real GPUs.

`pytest -m gpu` on a CUDA machine with the official vllm wheel (docs/gpu.md). Without CUDA every test here is
reported as skipped with the reason. The model is the offline tiny Llama, so no model hub is needed: these tests
check the GPU path's wiring (placement groups, vLLM on CUDA, NCCL broadcast, sleep / wake), not model quality.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False"),
]

SMALL_ROUND = [
    "run.rounds=1", "run.save_checkpoints=false", "data.prompts_per_round=64", "data.eval_prompts=64",
    "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6", "rollout.backend=vllm", "rollout.enforce_eager=true",
    "rollout.gpu_memory_utilization=0.3", "learner.batch_size=16", "learner.epochs=1", "logging.console=false",
]  # fmt: skip


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


def test_one_gpu_colocated_round_sleeps_and_wakes_vllm(ray_local, tmp_path, tiny_model_dir):
    """Rollout engine and learner rank share GPU 0; vLLM sleeps while training, wakes weights then KV cache."""
    _run(tmp_path, tiny_model_dir, [
        "run.name=gpu1_colocated", "rollout.num_workers=1", "rollout.num_gpus=1", "learner.num_workers=1",
        "learner.num_gpus=1", "placement.colocate=true", "sync.strategy=object_store",
    ])  # fmt: skip


def test_two_gpu_round_broadcasts_weights_over_nccl(ray_local, tmp_path, tiny_model_dir):
    """Engine on one GPU, learner rank on the other, weights broadcast over NCCL in several buckets."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    _run(tmp_path, tiny_model_dir, [
        "run.name=gpu2_nccl", "rollout.num_workers=1", "rollout.num_gpus=1", "learner.num_workers=1",
        "learner.num_gpus=1", "sync.strategy=nccl", "sync.collective_backend=nccl", "sync.bucket_mb=1",
    ])  # fmt: skip
