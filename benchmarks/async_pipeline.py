"""Async pipeline: steady-state round time vs max(generate + score, train) (target <= 1.15), and speedup over sync.

    .venv/bin/python benchmarks/async_pipeline.py --quick    # 4 rounds x 128 prompts x 8 samples per mode (~4 min)
    .venv/bin/python benchmarks/async_pipeline.py            # 8 rounds x 512 prompts x 8 samples per mode

Two `omni_ray.driver.train` runs of configs/local_tiny.yaml, identical but for `pipeline.mode` (sync, then async:
round r+1 is generated and scored while round r trains), in one Ray session. Steady state = rounds >= 2 (round 1
of async has nothing to overlap with). Per mode, the mean over those rounds of:

- round s: time_round; work s: the same without the held-out eval and the checkpoint (fixed-size extras that the
  overlap does not target);
- ideal s: max(time_generate + time_score, time_train), the round time of a perfect overlap. Two versions: from
  the async run's own stage times (on 2 shared cores, overlapped stages slow each other down, so this ideal is
  itself inflated) and from the sync run's (each stage alone on the machine: the stricter bound);
- async ratio: work s / ideal s (target <= 1.15); speedup: sync round s / async round s.
Final held-out accuracy of both runs is shown: async trains one policy version off.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

NAME = "async_pipeline"
TARGET = 1.15


def steady(run: dict[str, Any]) -> dict[str, float]:
    rows = [r for r in run["rounds"] if r["round"] > 1] or run["rounds"]
    return {
        "rounds_timed": len(rows),
        "round_s": common.mean(r["time_round"] for r in rows),
        "work_s": common.mean(common.work_time(r) for r in rows),
        "gen_score_s": common.mean(r.get("time_generate", 0.0) + r.get("time_score", 0.0) for r in rows),
        "train_s": common.mean(r.get("time_train", 0.0) for r in rows),
        "ideal_s": common.mean(
            max(r.get("time_generate", 0.0) + r.get("time_score", 0.0), r.get("time_train", 0.0)) for r in rows
        ),
        "final_accuracy": run["rounds"][-1].get("eval_accuracy") if run["rounds"] else None,
    }


def main() -> None:
    p = common.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, help="default: 4 quick, 8 full")
    p.add_argument("--prompts", type=int, help="prompts per round; default 128 quick, 512 full")
    args = p.parse_args()
    common.setup()
    started = time.perf_counter()
    info = common.machine()
    rounds = args.rounds or (4 if args.quick else 8)
    prompts = args.prompts or (128 if args.quick else 512)
    shared = [f"run.rounds={rounds}", f"data.prompts_per_round={prompts}", "run.keep_checkpoints=1"]
    runs = {mode: common.train(common.config(NAME, mode, [*shared, f"pipeline.mode={mode}"]))
            for mode in ("sync", "async")}  # fmt: skip
    common.shutdown_ray()

    s, a = steady(runs["sync"]), steady(runs["async"])
    summary = {
        "async_ratio_own_stages": a["work_s"] / a["ideal_s"],
        "async_ratio_sync_stages": a["work_s"] / s["ideal_s"],
        "speedup_round": s["round_s"] / a["round_s"],
        "speedup_work": s["work_s"] / a["work_s"],
        "target": TARGET,
    }
    summary["target_met"] = bool(summary["async_ratio_own_stages"] <= TARGET)
    summary["target_met_vs_sync_stages"] = bool(summary["async_ratio_sync_stages"] <= TARGET)
    headers = ["mode", "rounds timed", "round s", "work s", "generate+score s", "train s", "ideal s",
               "work / ideal", "final acc"]  # fmt: skip
    rows = [[m, x["rounds_timed"], x["round_s"], x["work_s"], x["gen_score_s"], x["train_s"], x["ideal_s"],
             x["work_s"] / x["ideal_s"], x["final_accuracy"]] for m, x in (("sync", s), ("async", a))]  # fmt: skip
    tables = [
        f"### sync vs async ({prompts} prompts x 8 samples, {rounds} rounds, rounds >= 2)\n\n"
        + common.markdown_table(headers, rows, 3),
        common.markdown_table(
            ["", "value", "target", "met"],
            [
                [
                    "async work / max(gen+score, train), async's stage times",
                    summary["async_ratio_own_stages"],
                    f"<= {TARGET}",
                    summary["target_met"],
                ],
                [
                    "async work / max(gen+score, train), sync's stage times",
                    summary["async_ratio_sync_stages"],
                    f"<= {TARGET}",
                    summary["target_met_vs_sync_stages"],
                ],
                ["speedup over sync (round time)", summary["speedup_round"], "-", "-"],
                ["speedup over sync (work time)", summary["speedup_work"], "-", "-"],
            ],
            3,
        ),  # fmt: skip
    ]
    results = {"sync": s, "async": a, "summary": summary,
               "rounds": {m: r["rounds"] for m, r in runs.items()}}  # fmt: skip
    common.write_result(args.out, NAME, quick=args.quick, settings={"rounds": rounds, "prompts_per_round": prompts,
                        "overrides": shared}, results=results, tables=tables, machine_info=info,
                        started=started)  # fmt: skip


if __name__ == "__main__":
    main()
