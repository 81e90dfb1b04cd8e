"""`omni-ray plot RUN_DIR`: one PNG of a run's curves from its `metrics.jsonl` (matplotlib, Agg backend).

Panels: held-out accuracy per round (round 0 = the initial eval), mean sample reward per round (train samples and
the eval's), the loss per optimizer step with the per-round mean, and the distributions across rounds of the
Omni-DPO weights `w_qual` / `w_perf` and the applied PoP `margin` (box plots of the per-step batch means of each
round, from the `step` lines; the round means when a run logged no steps).

`metrics.jsonl` is appended to: a round logged twice (a resumed run) keeps its last line, and an initial eval
(`kind: eval`, round 0) after other lines marks a fresh run under the same name, so only the newest run is plotted.
A line that is not JSON (a run killed mid-write) is skipped with a warning naming its line number.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MetricsError", "RunMetrics", "plot_run", "read_metrics"]

WEIGHT_KEYS = ("w_qual", "w_perf", "margin")


class MetricsError(ValueError):
    """metrics.jsonl is missing, empty, or has nothing to plot (the message names the file)."""


@dataclass
class RunMetrics:
    """The parsed lines of one metrics.jsonl. `rounds` / `evals` are keyed by round number (last line wins)."""

    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    skipped_lines: list[int] = field(default_factory=list)
    restarts: int = 0  # earlier runs appended to the same file (discarded)


def metrics_path(run: str | Path) -> Path:
    """`RUN_DIR/metrics.jsonl`, or the path itself when it is a file."""
    p = Path(run)
    return p if p.is_file() else p / "metrics.jsonl"


def read_metrics(run: str | Path) -> RunMetrics:
    """Parse a run's metrics.jsonl; MetricsError when it is missing or has no step / round / eval line."""
    path = metrics_path(run)
    if not path.is_file():
        raise MetricsError(f"{path}: no such file (is {run} a run dir, runs/<name>/?)")
    m = RunMetrics(path=path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                m.skipped_lines.append(lineno)
                continue
            if not isinstance(rec, dict):
                m.skipped_lines.append(lineno)
                continue
            kind = rec.get("kind")
            if kind == "eval" and rec.get("round") == 0 and (m.steps or m.rounds or m.evals):
                m.steps, m.rounds, m.evals = [], {}, {}
                m.restarts += 1
            if kind == "step":
                m.steps.append(rec)
            elif kind == "round" and _is_num(rec.get("round")):
                m.rounds[int(rec["round"])] = rec
            elif kind == "eval" and _is_num(rec.get("round")):
                m.evals[int(rec["round"])] = rec
    if m.skipped_lines:
        print(f"[omni-ray] {path}: skipped unparseable lines {m.skipped_lines[:10]}", file=sys.stderr)
    if not (m.steps or m.rounds or m.evals):
        raise MetricsError(f"{path}: no step / round / eval lines to plot (empty or not an omni-ray metrics file)")
    return m


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: dict[int, dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs = sorted(r for r, rec in rows.items() if _is_num(rec.get(key)))
    return xs, [float(rows[r][key]) for r in xs]


def plot_run(run: str | Path, out: str | Path | None = None, *, title: str | None = None) -> Path:
    """Write the PNG (default `RUN_DIR/plot.png`) and return its path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    m = read_metrics(run)
    out_path = Path(out) if out is not None else m.path.parent / "plot.png"
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    fig.suptitle(title or f"omni-ray run: {m.path.parent.name}")
    _eval_and_train_panel(axes[0, 0], m, "accuracy", "accuracy", "sample_accuracy")
    _eval_and_train_panel(axes[0, 1], m, "reward (mean score)", "reward_mean", "reward_mean")
    _loss_panel(axes[0, 2], m)
    for ax, key in zip(axes[1], WEIGHT_KEYS):
        _distribution_panel(ax, m, key)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def _eval_and_train_panel(ax: Any, m: RunMetrics, title: str, key: str, train_key: str) -> None:
    """Held-out (greedy) `key` per round, from eval records and rounds' `eval_<key>`, beside the train samples'
    `train_key`."""
    ax.set_title(title)
    ev = {r: rec.get(key) for r, rec in m.evals.items()}
    ev.update({r: rec.get(f"eval_{key}") for r, rec in m.rounds.items()})
    xe = sorted(r for r, v in ev.items() if _is_num(v))
    xs, ys = _series(m.rounds, train_key)
    if xe:
        ax.plot(xe, [ev[r] for r in xe], marker="o", label="eval (greedy)")
    if xs:
        ax.plot(xs, ys, marker="s", linestyle="--", label="train samples")
    if not (xe or xs):
        _empty(ax, title)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("round")


def _loss_panel(ax: Any, m: RunMetrics) -> None:
    ax.set_title("loss")
    steps = [s for s in m.steps if _is_num(s.get("loss"))]
    if steps:
        ax.plot(range(1, len(steps) + 1), [s["loss"] for s in steps], lw=0.8, alpha=0.6, label="per step")
        ax.set_xlabel("optimizer step (all rounds)")
        # round means at the step where each round ends
        ends: dict[int, int] = {}
        for i, s in enumerate(steps, start=1):
            if _is_num(s.get("round")):
                ends[int(s["round"])] = i
        xr, yr = _series(m.rounds, "loss")
        pts = [(ends[r], y) for r, y in zip(xr, yr) if r in ends]
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="-", label="round mean")
        ax.legend(fontsize=8)
        return
    xr, yr = _series(m.rounds, "loss")
    if xr:
        ax.plot(xr, yr, marker="o", label="round mean")
        ax.set_xlabel("round")
        ax.legend(fontsize=8)
    else:
        _empty(ax, "loss")


def _distribution_panel(ax: Any, m: RunMetrics, key: str) -> None:
    ax.set_title(f"{key} across rounds")
    ax.set_xlabel("round")
    by_round: dict[int, list[float]] = defaultdict(list)
    for s in m.steps:
        if _is_num(s.get(key)) and _is_num(s.get("round")):
            by_round[int(s["round"])].append(float(s[key]))
    if by_round:
        rounds = sorted(by_round)
        ax.boxplot([by_round[r] for r in rounds], positions=rounds, widths=0.6, showfliers=True)
        ax.plot(rounds, [sum(v) / len(v) for v in (by_round[r] for r in rounds)], marker="o", label="mean of steps")
        ax.set_xticks(rounds)
        ax.set_xticklabels([str(r) for r in rounds])
        ax.set_ylabel("per-step batch mean")
        ax.legend(fontsize=8)
        return
    xr, yr = _series(m.rounds, key)
    if xr:
        ax.plot(xr, yr, marker="o", label="round mean")
        ax.legend(fontsize=8)
    else:
        _empty(ax, key)
