"""Metrics sinks: `metrics.jsonl` (always; a line per optimizer step and per round, with a `kind`), the console
round table, and W&B (`logging.wandb.mode`: online / offline / disabled; no key needed unless online)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from omni_ray.config import LoggingConfig

ROUND_COLUMNS = [  # (metric key, header, format)
    ("round", "round", "{:>5d}"),
    ("eval_accuracy", "acc", "{:>6.3f}"),
    ("reward_mean", "reward", "{:>6.2f}"),
    ("pairs_kept", "kept", "{:>5d}"),
    ("pairs_dropped", "drop", "{:>5d}"),
    ("loss", "loss", "{:>7.4f}"),
    ("w_qual", "w_qual", "{:>6.3f}"),
    ("w_perf", "w_perf", "{:>6.3f}"),
    ("margin", "margin", "{:>7.4f}"),
    ("time_generate", "gen_s", "{:>6.1f}"),
    ("time_score", "score_s", "{:>7.1f}"),
    ("time_pop", "pop_s", "{:>5.1f}"),
    ("time_train", "train_s", "{:>7.1f}"),
    ("time_sync", "sync_s", "{:>6.1f}"),
    ("time_eval", "eval_s", "{:>6.1f}"),
    ("time_round", "round_s", "{:>7.1f}"),
]


def _cell(fmt: str, value: Any, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return fmt.format(value)


class Tracker:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict, run_name: str):
        self.path = run_dir / "metrics.jsonl"
        self.console = cfg.console
        self._file = self.path.open("a")
        self._header_printed = False
        self.wandb = None
        if cfg.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity or None,
                name=run_name,
                mode=cfg.wandb.mode,
                tags=list(cfg.wandb.tags),
                config=config_dict,
                dir=str(run_dir),
            )

    def log(self, kind: str, record: dict) -> None:
        line = {"kind": kind, **record}
        self._file.write(json.dumps(line, default=float) + "\n")
        self._file.flush()
        if self.wandb is not None:
            step = record.get("step") if kind == "step" else None
            self.wandb.log({f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def round_row(self, row: dict) -> None:
        if not self.console:
            return
        widths = [max(len(h), len(f.format(0) if "d" in f else f.format(0.0))) for _, h, f in ROUND_COLUMNS]
        if not self._header_printed:
            print(" ".join(h.rjust(w) for (_, h, _), w in zip(ROUND_COLUMNS, widths)), flush=True)
            self._header_printed = True
        cells = [_cell(f, row.get(k), w) for (k, _, f), w in zip(ROUND_COLUMNS, widths)]
        print(" ".join(cells), file=sys.stdout, flush=True)

    def close(self) -> None:
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
