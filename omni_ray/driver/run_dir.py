"""The run directory `runs/<run.name>/`: a fresh run sets an earlier one aside, a resumed run finds its newest good
checkpoint (checked against the config), and every round's checkpoint is staged and committed atomically
(omni_ray/checkpoint.py)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omni_ray import checkpoint
from omni_ray.config import OmniRayConfig, to_yaml
from omni_ray.tracking import json_safe, read_records, write_json

#: Config values a resumed run must share with the checkpoint: round r's prompts are a pure function of them.
RESUME_KEYS = (("seed", "run.seed"), ("prompts_per_round", "data.prompts_per_round"))


@dataclass
class DriverState:
    """What the driver itself must carry across a resume (driver_state.json); the learner's state is its own."""

    round: int
    policy_version: int
    global_step: int
    seed: int
    prompts_per_round: int
    wandb_run_id: str | None
    initial_eval: dict[str, Any] | None


class RunDir:
    def __init__(self, cfg: OmniRayConfig):
        self.cfg = cfg
        self.path = Path(cfg.run.output_dir) / cfg.run.name
        self.checkpoints = self.path / "checkpoints"

    def prepare(self) -> tuple[Path, DriverState] | None:
        """`run.resume=auto`: the resume point (and metrics.jsonl cut back to it), or None with a message when there
        is no usable checkpoint; a fresh run moves an earlier run of the same name aside. Writes config.yaml."""
        found = self.resume_point() if self.cfg.run.resume == "auto" else None
        if found is None:
            self.set_aside_previous()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(to_yaml(self.cfg))
        return found

    def resume_point(self) -> tuple[Path, DriverState] | None:
        """The newest good checkpoint, checked against the config; metrics.jsonl is cut back to it, so the rounds
        redone after it are logged once."""
        found = checkpoint.latest_good(self.checkpoints)
        if found is None:
            print(f"[omni-ray] run.resume=auto: no usable checkpoint under {self.path}; starting from round 1",
                  flush=True)  # fmt: skip
            return None
        path, raw = found
        state = DriverState(**{k: raw[k] for k in DriverState.__dataclass_fields__})
        for key, config_key in RESUME_KEYS:
            now = _get(self.cfg, config_key)
            if getattr(state, key) != now:
                raise ValueError(
                    f"run.resume=auto: {path} was written with {key}={getattr(state, key)}, the config says {now}; "
                    "the prompt stream would differ (set it back, or start a new run.name)"
                )
        metrics = self.path / "metrics.jsonl"
        kept = [r for r in read_records(metrics) if r.get("kind") != "summary" and r.get("round", 0) <= state.round]
        tmp = metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(metrics)
        return path, state

    def set_aside_previous(self) -> None:
        """A fresh run never mixes with, or overwrites, an earlier run of the same name: that one is renamed aside."""
        if self.path.exists() and any(self.path.iterdir()):
            aside = self.path.with_name(f"{self.path.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(aside)
            print(f"[omni-ray] {self.path} held an earlier run: moved to {aside} (run.resume=auto continues a run)",
                  flush=True)  # fmt: skip

    def save_checkpoint(self, learner: Any, state: DriverState) -> Path:
        """checkpoints/round_NNNN/: the policy in HF layout at the top (eval and serving read it as a model dir), the
        learner's full training state under learner/, the driver's state in driver_state.json; staged and committed
        atomically with a checksum manifest, then older ones pruned."""
        final = self.checkpoints / f"round_{state.round:04d}"
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = checkpoint.staging_dir(final)
        learner.save_pretrained(str(stage))
        learner.save_state(str(stage / "learner"))
        meta = json_safe(asdict(state))
        write_json(stage / "driver_state.json", meta)
        checkpoint.commit(stage, final, meta)
        checkpoint.prune(self.checkpoints, self.cfg.run.keep_checkpoints)
        return final

    def newest_checkpoint(self) -> Path | None:
        found = checkpoint.latest_good(self.checkpoints, log=lambda _m: None)
        return found[0] if found else None

    def write_round_file(self, round_number: int, name: str, records: Any) -> Path:
        """rounds/round_NNNN/<name>: one strict-JSON record per line."""
        d = self.path / "rounds" / f"round_{round_number:04d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        with path.open("w") as f:
            for rec in records:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
        return path


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
