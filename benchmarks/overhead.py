"""Orchestration overhead of a sync round: round wall time / sum of the stage times (target <= 1.10).

    .venv/bin/python benchmarks/overhead.py --quick     # 3 rounds x 128 prompts x 8 samples (~2 min)
    .venv/bin/python benchmarks/overhead.py             # the demo's settings: 6 rounds x 512 prompts x 8 samples

One `omni_ray.driver.train` run of configs/local_tiny.yaml with `pipeline.mode=sync`. The driver times every stage
of a round (generate, score, pop, train, sync, eval, checkpoint: `time_*` in metrics.jsonl); what a round takes
beyond their sum is the driver's own glue (prompt tokenization, pair building, writing pairs.jsonl, logging).
Two ratios are reported per round:

- `round / stages`: time_round / sum(time_<stage>), the issue's overhead number;
- `train / busy`: the learner group's time_train (driver side: the Ray call, the object-store copy of the round's
  pairs, the ranks' collectives) / the ranks' own compute time (busy_reference + busy_train, measured inside rank 0).

Round 1 is reported but left out of the mean: it pays one-time costs (first vLLM batch, allocator warm-up).
`--profile` also runs the driver under cProfile and prints where the driver's own (non-waiting) time goes.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

NAME = "overhead"
TARGET = 1.10


def main() -> None:
    p = common.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, help="default: 3 quick, 6 full")
    p.add_argument("--prompts", type=int, help="prompts per round; default: 128 quick, 512 full")
    p.add_argument("--profile", action="store_true", help="cProfile the driver; top functions printed and saved")
    args = p.parse_args()
    common.setup()
    started = time.perf_counter()
    info = common.machine()
    rounds = args.rounds or (3 if args.quick else 6)
    prompts = args.prompts or (128 if args.quick else 512)
    overrides = [f"run.rounds={rounds}", f"data.prompts_per_round={prompts}", "pipeline.mode=sync",
                 "run.keep_checkpoints=1"]  # fmt: skip
    cfg = common.config(NAME, "sync", overrides)

    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    run = common.train(cfg)
    if profiler:
        profiler.disable()
    common.shutdown_ray()

    rows, table_rows = [], []
    for r in run["rounds"]:
        stages = common.stage_sum(r)
        busy = float(r.get("busy_reference", 0.0)) + float(r.get("busy_train", 0.0))
        row = {
            "round": r["round"],
            "round_s": r["time_round"],
            "stages_s": stages,
            "glue_s": r["time_round"] - stages,
            "ratio": r["time_round"] / stages,
            **{f"{s}_s": r.get(f"time_{s}", 0.0) for s in common.STAGES},
            "learner_busy_s": busy,
            "train_over_busy": r.get("time_train", 0.0) / busy if busy else None,
        }
        rows.append(row)
        table_rows.append([row["round"], row["round_s"], row["stages_s"], row["glue_s"], row["ratio"],
                           *(row[f"{s}_s"] for s in common.STAGES), row["train_over_busy"]])  # fmt: skip
    steady = [r for r in rows if r["round"] > 1] or rows
    ratio = common.mean(r["ratio"] for r in steady)
    summary = {
        "ratio_mean_rounds_2plus": ratio,
        "glue_s_mean": common.mean(r["glue_s"] for r in steady),
        "train_over_busy_mean": common.mean(r["train_over_busy"] for r in steady if r["train_over_busy"]),
        "target": TARGET,
        "target_met": bool(ratio <= TARGET),
        "startup_s": run["summary"].get("startup_s"),
        "rollout_backend": run["summary"].get("rollout_backend"),
    }
    headers = ["round", "round_s", "stages_s", "glue_s", "round/stages",
               *(f"{s}_s" for s in common.STAGES), "train/busy"]  # fmt: skip
    tables = [
        f"### overhead (sync, {prompts} prompts x {cfg.rollout.samples_per_prompt} samples, {rounds} rounds)\n\n"
        + common.markdown_table(headers, table_rows, digits=2),
        common.markdown_table(
            ["mean over rounds >= 2", "value", "target", "met"],
            [
                ["round / stages", ratio, f"<= {TARGET}", summary["target_met"]],
                ["glue_s per round", summary["glue_s_mean"], "-", "-"],
                ["train / learner busy", summary["train_over_busy_mean"], "-", "-"],
                ["startup_s (roles up, once)", summary["startup_s"], "-", "-"],
            ],
            digits=3,
        ),
    ]
    results = {"rounds": rows, "summary": summary}
    if profiler:
        prof_path = args.out.with_suffix(".prof")
        prof_path.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(prof_path))
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(20)
        results["profile_top_tottime"] = buf.getvalue()
        tables.append("```\n" + buf.getvalue().strip() + "\n```")
    common.write_result(args.out, NAME, quick=args.quick, settings={"rounds": rounds, "prompts_per_round": prompts,
                        "overrides": overrides, "config": str(common.DEFAULT_CONFIG.relative_to(common.ROOT))},
                        results=results, tables=tables, machine_info=info, started=started)  # fmt: skip


if __name__ == "__main__":
    main()
