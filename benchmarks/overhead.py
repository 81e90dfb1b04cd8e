"""Orchestration overhead of a sync round: round wall time / sum of the stage busy times (target <= 1.10).

    .venv/bin/python benchmarks/overhead.py --quick     # 3 rounds x 128 prompts x 8 samples (~2 min)
    .venv/bin/python benchmarks/overhead.py             # the demo's settings: 6 rounds x 512 prompts x 8 samples

One `omni_ray.driver.train` run of configs/local_tiny.yaml with `pipeline.mode=sync`. Every actor measures the time
it spends working, inside itself (`busy_*` in metrics.jsonl): the rollout workers generate (train samples and the
held-out eval) and load weights (sync), the scorer scores, the PoP estimator builds items, the learner ranks
compute reference log-probs and train. The checkpoint, written by the driver and the ranks together, is counted at
its driver-side time. What a round takes beyond their sum is orchestration: Ray calls and object-store copies, the
driver's tokenization, pair building, writing pairs.jsonl, logging. Two ratios per round:

- `round / busy`: time_round / (sum of busy_* + time_checkpoint), the issue's overhead number;
- `round / stages`: time_round / sum(time_<stage>), the driver's own stage timers (they include the Ray calls), so
  its excess is only the driver's glue between stages.

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
#: The actors' busy stages (omni_ray/driver/loop.py `_actors_busy` and the learner's round result).
BUSY = ("generate", "score", "pop", "reference", "train", "sync")


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
        busy = {s: float(r.get(f"busy_{s}", 0.0)) for s in BUSY}
        work = sum(busy.values()) + float(r.get("time_checkpoint", 0.0))
        row = {
            "round": r["round"],
            "round_s": r["time_round"],
            "busy_s": work,
            "ratio": r["time_round"] / work,
            "stages_s": stages,
            "ratio_stages": r["time_round"] / stages,
            **{f"busy_{s}_s": v for s, v in busy.items()},
            "checkpoint_s": r.get("time_checkpoint", 0.0),
        }
        rows.append(row)
        table_rows.append([row["round"], row["round_s"], row["busy_s"], row["ratio"], row["stages_s"],
                           row["ratio_stages"], *busy.values(), row["checkpoint_s"]])  # fmt: skip
    steady = [r for r in rows if r["round"] > 1] or rows
    ratio = common.mean(r["ratio"] for r in steady)
    summary = {
        "ratio_mean_rounds_2plus": ratio,
        "ratio_stages_mean": common.mean(r["ratio_stages"] for r in steady),
        "orchestration_s_mean": common.mean(r["round_s"] - r["busy_s"] for r in steady),
        "target": TARGET,
        "target_met": bool(ratio <= TARGET),
        "startup_s": run["summary"].get("startup_s"),
        "rollout_backend": run["summary"].get("rollout_backend"),
    }
    headers = ["round", "round_s", "busy_s", "round/busy", "stages_s", "round/stages",
               *(f"{s}_busy" for s in BUSY), "checkpoint_s"]  # fmt: skip
    tables = [
        f"### overhead (sync, {prompts} prompts x {cfg.rollout.samples_per_prompt} samples, {rounds} rounds)\n\n"
        + common.markdown_table(headers, table_rows, digits=2),
        common.markdown_table(
            ["mean over rounds >= 2", "value", "target", "met"],
            [
                ["round / busy", ratio, f"<= {TARGET}", summary["target_met"]],
                ["round / driver stage timers", summary["ratio_stages_mean"], "-", "-"],
                ["orchestration s per round", summary["orchestration_s_mean"], "-", "-"],
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
