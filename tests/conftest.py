"""Shared fixtures: a tiny model built offline once per session, and one local Ray cluster per session."""

from __future__ import annotations

import os

import pytest

# Same environment `make test` exports, so a bare `pytest` works too.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test clusters
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A briefly warm-started tiny Llama (emits digits then EOS); random-ish but valid for every role."""
    from omni_ray.models.tiny import make_tiny

    return str(make_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0, sft_steps=60, sft_batch_size=32))


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory) -> str:
    """A second tiny model with different weights (weight-sync tests)."""
    from omni_ray.models.tiny import make_tiny

    return str(make_tiny(tmp_path_factory.mktemp("models") / "tiny_b", seed=1, sft_steps=60, sft_batch_size=32))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for all integration tests (start-up costs seconds; pay it once)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}},
        )
    yield ray
    ray.shutdown()
