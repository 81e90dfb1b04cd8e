"""Rollout role: `RolloutWorker` (plain class, wrapped by the driver with `ray.remote`) over a `GenerationBackend`.

Backends are imported lazily by `make_backend` (the `BACKENDS` registry): importing this package must not import
vLLM (~11 s).
"""

from omni_ray.rollout.base import Completion, GenerationBackend
from omni_ray.rollout.worker import BACKENDS, RolloutWorker, StaleWeightsError, make_backend

__all__ = ["BACKENDS", "Completion", "GenerationBackend", "RolloutWorker", "StaleWeightsError", "make_backend"]
