"""Rollout role: `RolloutWorker` (plain class, wrapped by the driver with `ray.remote`) and its engines.

Backends are imported lazily by `make_backend`: importing this package must not import vLLM (~11 s).
"""

from omni_ray.rollout.worker import Completion, GenerationBackend, RolloutWorker, make_backend

__all__ = ["Completion", "GenerationBackend", "RolloutWorker", "make_backend"]
