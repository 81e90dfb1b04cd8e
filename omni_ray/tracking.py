"""Metrics sinks: `metrics.jsonl` (always; one line per optimizer step, round, eval, with a `kind`), the console
round table, W&B (`logging.wandb.mode`: online / offline / disabled; no key needed unless online) and TensorBoard.

W&B gets scalars per step and per round, histograms of the per-pair Omni-DPO weights and PoP margins, a table of
sample pairs each round, and the resolved config. Passing the previous run's id resumes the same W&B run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omni_ray.config import LoggingConfig

ROUND_COLUMNS = [  # (metric key, header, format)
    ("round", "round", "{:>5d}"),
    ("eval_accuracy", "acc", "{:>6.3f}"),
    ("eval_reward_mean", "eval_r", "{:>6.2f}"),
    ("reward_mean", "reward", "{:>6.2f}"),
    ("pairs_kept", "kept", "{:>5d}"),
    ("pairs_dropped", "drop", "{:>5d}"),
    ("pop_uncompared", "uncmp", "{:>5d}"),
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
SAMPLE_COLUMNS = ["prompt_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin"]


def _cell(fmt: str, value: Any, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return fmt.format(value)


def json_safe(x: Any) -> Any:
    """`x` as strict JSON data: a non-finite float becomes None (`null`), numpy scalars plain numbers. A reader that
    refuses NaN (jq, browsers, strict parsers) reads every file omni-ray writes."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / torch scalars
        return json_safe(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def dumps(record: Any, **kwargs: Any) -> str:
    """Strict JSON text of `record` (see `json_safe`)."""
    return json.dumps(json_safe(record), allow_nan=False, **kwargs)


def write_json(path: str | Path, record: Any) -> None:
    Path(path).write_text(dumps(record, indent=2) + "\n")


def _scalars(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def read_records(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or any jsonl the run writes), in order; only those of `kind` when given.
    A missing file has none. For plots of hand-edited or damaged files, `omni_ray.plot.read_metrics` is the tolerant
    reader."""
    path = Path(path)
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records if kind is None else [r for r in records if r.get("kind") == kind]


class BusyClock:
    """Seconds an actor has spent inside its work, per stage, since it started (measured in the actor itself).

    The driver reads `totals()` from every actor at the end of each round; `busy_between` turns two reads into the
    busy time within that round's wall time, whatever the round overlapped (async prefetch, eval).
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        return dict(self._seconds)


def busy_between(before: Sequence[dict[str, float]], after: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per stage, the largest busy time any one actor accrued between two `BusyClock.totals()` reads (actor i's
    read is `before[i]` / `after[i]`). The largest, not the sum: parallel actors (rollout workers on their shards)
    share the wall time, and the slowest one bounds the stage. A total that went down belongs to an actor Ray
    restarted in between, whose clock began again at zero: its whole new total counts."""
    out: dict[str, float] = {}
    for old, new in zip(before, after, strict=True):
        for stage, total in new.items():
            spent = total - old.get(stage, 0.0)
            out[stage] = max(out.get(stage, 0.0), spent if spent >= 0 else total)
    return out


class Tracker:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict, run_name: str,
                 wandb_run_id: str | None = None):  # fmt: skip
        self.cfg = cfg
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._header_printed = False
        self._bar: Any = None  # tqdm over rounds, only on a terminal (jobs and pipes get the round table alone)
        self.wandb = None
        self.tensorboard = None
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
                id=wandb_run_id,
                resume="allow" if wandb_run_id else None,
            )
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(self, kind: str, record: dict, step: int | None = None) -> None:
        """One metrics.jsonl line; scalars also to W&B / TensorBoard under `kind/` (x axis: the optimizer step)."""
        self._file.write(dumps({"kind": kind, **record}) + "\n")
        self._file.flush()
        scalars = {f"{kind}/{k}": v for k, v in _scalars(record).items()}
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.tensorboard is not None and step is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)

    def log_distributions(self, values: dict[str, list[float]], pairs: list[dict], step: int) -> None:
        """Per-pair weight / margin distributions and a sample table of the round's pairs."""
        values = {k: v for k, v in values.items() if v}
        if self.wandb is not None:
            import wandb

            payload: dict[str, Any] = {f"dist/{k}": wandb.Histogram(v) for k, v in values.items()}
            rows = pairs[: self.cfg.sample_rows]
            if rows:
                payload["samples/pairs"] = wandb.Table(
                    columns=SAMPLE_COLUMNS, data=[[p.get(c) for c in SAMPLE_COLUMNS] for p in rows]
                )
            self.wandb.log(payload, step=step)
        if self.tensorboard is not None:
            import numpy as np

            for k, v in values.items():
                self.tensorboard.add_histogram(f"dist/{k}", np.asarray(v), step)

    def start_progress(self, rounds: int, done: int) -> None:
        """A bar over the run's rounds that names the running stage (`logging.progress`: auto = only on a TTY)."""
        on = self.cfg.progress == "always" or (self.cfg.progress == "auto" and sys.stdout.isatty())
        if on and done < rounds:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=rounds, initial=done, unit="round", dynamic_ncols=True, leave=False)

    def stage(self, round_number: int, name: str) -> None:
        """Which stage of which round is running: the bar's label (no-op without a bar)."""
        if self._bar is not None:
            self._bar.set_description_str(f"round {round_number}: {name}")

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)  # above the bar, which is redrawn below it
        else:
            print(line, file=sys.stdout, flush=True)

    def round_row(self, row: dict) -> None:
        if self.cfg.console:
            widths = [max(len(h), len(f.format(0) if "d" in f else f.format(0.0))) for _, h, f in ROUND_COLUMNS]
            if not self._header_printed:
                self._print(" ".join(h.rjust(w) for (_, h, _), w in zip(ROUND_COLUMNS, widths)))
                self._header_printed = True
            self._print(" ".join(_cell(f, row.get(k), w) for (k, _, f), w in zip(ROUND_COLUMNS, widths)))
        if self._bar is not None and row.get("round", 0) > 0:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
