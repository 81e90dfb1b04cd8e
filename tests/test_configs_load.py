"""Every shipped config loads, validates, and (for GPU configs) plans a placement, on a CPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_ray.config import load_config
from omni_ray.placement import check_cluster_fits, plan_placement, rollout_backend_options, uses_gpus

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))

#: GPUs each paper-setting config assumes (docs/gpu.md's table says the same; this test keeps them in step).
GPU_COUNTS = {"gemma2_9b_ultrafeedback": 8, "qwen25_math_7b": 8, "llama3_8b_instruct": 5}


def test_the_paper_settings_are_shipped():
    assert set(GPU_COUNTS) <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_validates_and_plans(path):
    cfg = load_config(path)
    plan = plan_placement(cfg)
    rollout_backend_options(cfg, plan)
    if path.stem in GPU_COUNTS:
        assert uses_gpus(cfg)
        gpus = plan.total("GPU") + cfg.placement.scoring_num_gpus
        assert gpus == GPU_COUNTS[path.stem]
        check_cluster_fits(plan, [{"CPU": 96.0, "GPU": 8.0}])  # one 8-GPU node hosts it
