"""Where the run happens: the Ray cluster it joins or starts, the environment its actors get, the policy's model dir."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from omni_ray.config import OmniRayConfig

QUIET_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
# On CPU, oneDNN compiles and caches a kernel per tensor shape (1024 by default, never freed). Every generate call
# brings new batch shapes, so a rollout worker's RSS grew ~430 MiB over its first 160 calls on the tiny model, most
# of it in the first 20 rounds (docs/benchmarks.md, memory). 64 entries hold it flat after ~40 calls at the same
# speed; a value set in the driver's environment wins.
MEMORY_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
#: Variables forwarded to every actor when the driver's environment sets them. DS_ACCELERATOR only as the user set
#: it: the learner picks cuda or cpu from the hardware itself (learner/worker.py, select_accelerator).
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                 "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE")  # fmt: skip


def init_ray(cfg: OmniRayConfig) -> None:
    """Join the cluster of a `ray job submit` job (RAY_ADDRESS is set) or `ray.address`; else start a local one.

    Resources are declared only when starting a local cluster: an entrypoint that passes them to an existing
    cluster fails under `ray job submit`.
    """
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or None, include_dashboard=False, log_to_driver=True)


def actor_env() -> dict[str, str]:
    """Environment every role's actor needs, passed explicitly (actors do not inherit the driver's env on a cluster)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Quiet actors: one table row per round is the signal; engine chatter (vLLM INFO lines, weight-loading bars)
    # would bury it, in a terminal and in job logs alike. Errors and warnings still come through.
    for k, v in {**QUIET_ENV, **MEMORY_ENV}.items():
        env.setdefault(k, os.environ.get(k, v))
    return env


def ensure_model(cfg: OmniRayConfig) -> str:
    """The policy dir; built by make-tiny (deterministic from the seed) when missing and allowed."""
    path = Path(cfg.model.path)
    if (path / "config.json").is_file():
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"model.path={path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
        return str(path)
    if not cfg.model.build_tiny_if_missing:
        raise FileNotFoundError(
            f"model.path={path} is not a model dir (no config.json) and build_tiny_if_missing is false"
        )
    from omni_ray.models.tiny import make_tiny

    print(f"[omni-ray] building the tiny model at {path} (seed {cfg.run.seed}) ...", flush=True)
    t = cfg.model.tiny
    make_tiny(
        path,
        seed=cfg.run.seed,
        max_operand=cfg.data.max_operand,
        eval_prompts=cfg.data.eval_prompts,
        hidden_size=t.hidden_size,
        num_layers=t.num_layers,
        num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        sft_target_accuracy=t.sft_target_accuracy,
        sft_max_steps=t.sft_max_steps,
        sft_check_every=t.sft_check_every,
        sft_lr=t.sft_lr,
        sft_batch_size=t.sft_batch_size,
    )
    return str(path)
