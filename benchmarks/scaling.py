"""Scaling: round time at 1x, 2x, 4x prompts per round (target: linear within 15%) and memory over 20 rounds
(RSS of the driver and every actor; target: growth under 5%).

    .venv/bin/python benchmarks/scaling.py --quick    # 1x = 64 prompts x 8 samples (~4-5 min)
    .venv/bin/python benchmarks/scaling.py            # 1x = 256 prompts x 8 samples (2x = the demo's 512)

Three `omni_ray.driver.train` runs of configs/local_tiny.yaml (sync), one Ray session:
- 1x for 20 rounds: its rounds 2..20 give the 1x round time, and the process tree is sampled at the end of every
  round (benchmarks/common.py: the driver is this process, the actors are its Ray cluster's `ray::<Class>`
  processes, each role's RSS summed over its processes);
- 2x and 4x for 3 rounds each (rounds 2..3 timed).
Round 1 of each run is left out of the times (one-time warm-up). Linearity is t(k) / (k * t(1x)) for the round's
work (round time without the held-out eval and the checkpoint, which are the same size at every k); <= 1.15 meets
the target ("no worse than linear within 15%"); values well under 1 mean fixed per-round costs still dominate.
Memory growth is (RSS after round 20 - RSS after round 1) / RSS after round 1, per role and in total, with a
least-squares MiB-per-round slope; the same for private memory (RSS minus shared pages: Ray's object store is
shared memory that every process reading an object maps, and its pages count in RSS once touched).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

NAME = "scaling"
LINEAR_TARGET = 1.15
MEMORY_TARGET = 0.05


def _total(rss: dict[str, float]) -> float:
    """The driver and every actor (with its child processes); Ray's own processes are reported on their own."""
    return sum(v for r, v in rss.items() if r != "ray system")


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _growth(trace: list[dict[str, Any]], kind: str, role: str, total: str) -> dict[str, Any]:
    """First / last / peak of one role's series (`kind`: rss_mib or private_mib), relative growth, MiB per round."""
    series = [_total(t[kind]) if role == total else t[kind].get(role) for t in trace]
    first, last = series[0], series[-1]
    return {
        "first": first,
        "last": last,
        "peak": max(x or 0.0 for x in series),
        "growth": (last - first) / first if first and last is not None else None,
        "per_round": _slope(series),
        "series": series,
    }


def _slope(series: list[float | None]) -> float | None:
    """Least-squares MiB per round of a per-round RSS series (None when a round has no sample of that role)."""
    if len(series) < 2 or any(x is None for x in series):
        return None
    n = len(series)
    xm, ym = (n - 1) / 2, sum(series) / n  # type: ignore[arg-type]
    return sum((i - xm) * (y - ym) for i, y in enumerate(series)) / sum((i - xm) ** 2 for i in range(n))  # type: ignore[operator]


def main() -> None:
    p = common.parser(NAME, __doc__)
    p.add_argument("--base", type=int, help="1x prompts per round; default 64 quick, 256 full")
    p.add_argument("--memory-rounds", type=int, default=20, help="rounds of the 1x run (the memory trace)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the 2x and 4x runs")
    args = p.parse_args()
    common.setup()
    started = time.perf_counter()
    info = common.machine()
    base = args.base or (64 if args.quick else 256)
    eval_prompts = 100 if args.quick else 500
    shared = [f"data.eval_prompts={eval_prompts}", "pipeline.mode=sync", "run.keep_checkpoints=1"]

    runs: dict[int, dict[str, Any]] = {}
    with common.ProcessTreeMonitor(interval_s=5.0) as monitor:
        for k in (1, 2, 4):
            rounds = args.memory_rounds if k == 1 else args.rounds
            cfg = common.config(NAME, f"x{k}", [*shared, f"data.prompts_per_round={base * k}", f"run.rounds={rounds}"])
            runs[k] = common.train(cfg, monitor if k == 1 else None)
    common.shutdown_ray()

    # --- time
    time_rows, per_k = [], {}
    for k, run in runs.items():
        steady = [r for r in run["rounds"] if r["round"] > 1] or run["rounds"]
        per_k[k] = {
            "prompts_per_round": base * k,
            "rounds_timed": len(steady),
            "round_s": common.mean(r["time_round"] for r in steady),
            "work_s": common.mean(common.work_time(r) for r in steady),
            "generate_s": common.mean(r.get("time_generate", 0.0) for r in steady),
            "train_s": common.mean(r.get("time_train", 0.0) for r in steady),
        }
    for k, s in per_k.items():
        s["linearity"] = s["work_s"] / (k * per_k[1]["work_s"])
        s["linearity_round"] = s["round_s"] / (k * per_k[1]["round_s"])
        s["target_met"] = bool(s["linearity"] <= LINEAR_TARGET)
        time_rows.append([f"{k}x", s["prompts_per_round"], s["rounds_timed"], s["round_s"], s["work_s"],
                          s["generate_s"], s["train_s"], s["work_s"] / s["prompts_per_round"] * 1000,
                          s["linearity"], s["linearity_round"], s["target_met"]])  # fmt: skip

    # --- memory
    trace = [t for t in monitor.per_round if t["run"] == "x1"]
    roles = sorted({role for t in trace for role in t["rss_mib"]})
    mem_rows, growth = [], {}
    total = "total (driver + actors)"
    for role in [*roles, total] if trace else []:
        growth[role] = {kind: _growth(trace, kind, role, total) for kind in ("rss_mib", "private_mib")}
        g, gp = growth[role]["rss_mib"], growth[role]["private_mib"]
        met = None if g["growth"] is None or role == "ray system" else bool(g["growth"] < MEMORY_TARGET)
        mem_rows.append([role, g["first"], g["last"], g["peak"], _pct(g["growth"]), g["per_round"],
                         gp["first"], gp["last"], _pct(gp["growth"]), gp["per_round"], met])  # fmt: skip
    total_growth = growth.get(total, {}).get("rss_mib", {}).get("growth")
    last_round = trace[-1]["round"] if trace else 0

    time_headers = ["scale", "prompts/round", "rounds timed", "round s", "work s", "generate s", "train s",
                    "work ms/prompt", "work t(k)/(k t1)", "round t(k)/(k t1)", f"<= {LINEAR_TARGET}"]  # fmt: skip
    mem_headers = ["process(es)", "RSS round 1", f"RSS round {last_round}", "RSS peak", "RSS growth %",
                   "RSS MiB/round", "private round 1", f"private round {last_round}", "private growth %",
                   "private MiB/round", "RSS < 5%"]  # fmt: skip
    tables = [
        "### round time vs prompts per round (sync, 8 samples per prompt, rounds >= 2)\n\n"
        + common.markdown_table(time_headers, time_rows),
        f"### memory over {last_round} rounds (1x run), MiB summed over a role's processes; private = RSS - shared\n\n"
        + common.markdown_table(mem_headers, mem_rows, 1),
    ]
    results = {
        "time": per_k,
        "memory": {"growth": growth, "total_growth": total_growth, "trace": trace, "target": MEMORY_TARGET},
        "runs": {k: {"wall_s": r["wall_s"], "summary": r["summary"]} for k, r in runs.items()},
        "samples": monitor.samples,
    }
    common.write_result(args.out, NAME, quick=args.quick,
                        settings={"base": base, "memory_rounds": args.memory_rounds, "rounds": args.rounds,
                                  "eval_prompts": eval_prompts, "overrides": shared},
                        results=results, tables=tables, machine_info=info, started=started)  # fmt: skip


if __name__ == "__main__":
    main()
