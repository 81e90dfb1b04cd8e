"""The driver: the single controller that runs the round loop (loop.py), with the run's cluster and environment
(cluster.py), its roles' start-up (roles.py), fault-tolerant calls (calls.py), the round's record (record.py) and its
run directory, checkpoints and resume (run_dir.py). The round's prompts come from omni_ray/data/rounds.py."""

from omni_ray.driver.cluster import MEMORY_ENV, actor_env, ensure_model, init_ray
from omni_ray.driver.loop import Driver, train

__all__ = ["MEMORY_ENV", "Driver", "actor_env", "ensure_model", "init_ray", "train"]
