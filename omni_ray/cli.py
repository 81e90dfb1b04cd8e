"""`omni-ray train CONFIG [key=value ...]`, `omni-ray plan CONFIG`, `omni-ray config [CONFIG] [--keys PREFIX]`,
`omni-ray make-tiny [key=value ...]`, `omni-ray eval CHECKPOINT_OR_RUN` and `omni-ray plot RUN_DIR`."""

from __future__ import annotations

import argparse
import json
import sys

from omni_ray.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run the online round loop (locally, or inside `ray job submit`)")
    t.add_argument("config", nargs="?", help="YAML config (configs/local_tiny.yaml); defaults when omitted")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.beta=3.5 run.rounds=5")
    pn = sub.add_parser(
        "plan",
        help="GPU memory per role and GPU that the config needs, and whether it fits",
        description="Reads the model's architecture (a local dir, the HF cache, or the numbers omni-ray carries for "
        "the shipped configs' models); no weights, no GPU (omni_ray/plan.py).",
    )
    pn.add_argument("config", nargs="?", help="YAML config")
    pn.add_argument("overrides", nargs="*")
    pn.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of each GPU (default 80)")
    pn.add_argument("--phases", action="store_true", help="every phase of every GPU, not only each one's peak")
    c = sub.add_parser("config", help="the resolved config: every key with its value, rule, default and help")
    c.add_argument("config", nargs="?", help="YAML config; defaults when omitted")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--keys", default="", help="only keys starting with this (e.g. loss)")
    m = sub.add_parser("make-tiny", help="build the offline tiny model + tokenizer at model.path (warm-started)")
    m.add_argument("config", nargs="?", help="YAML config whose model.* / data.* / run.seed to use")
    m.add_argument("overrides", nargs="*")
    e = sub.add_parser(
        "eval",
        help="task accuracy + preference metrics of a checkpoint or a run's newest checkpoint (JSON to stdout)",
        description="Greedy accuracy on the held-out arith prompts and, with --preferences, pair accuracy and "
        "Pearson / Spearman of the implicit margin with the score gap (omni_ray/evaluate.py).",
    )
    e.add_argument("target", help="checkpoint dir (HF layout) or run dir (runs/<name>/)")
    e.add_argument("--prompts", type=int, default=None, help="first N held-out prompts (default: the run's eval set)")
    e.add_argument("--no-task", action="store_true", help="skip the task accuracy")
    e.add_argument("--preferences", default=None, help="pairs: .jsonl / .parquet / dataset dir / HF dataset name")
    e.add_argument("--split", default="train", help="split of a dataset dir / HF dataset (default: train)")
    e.add_argument("--subset", default="", help="subset (HF config name) of an HF dataset or repo clone")
    e.add_argument(
        "--reference",
        default=None,
        help="reference model dir for the implicit margin; 'none' = policy log-prob difference "
        "(default: the run's initial model; none for a checkpoint outside a run)",
    )
    e.add_argument("--logprobs", choices=("sum", "mean"), default="sum", help="summed (paper) or length-normalised")
    e.add_argument("--backend", choices=("hf", "vllm", "auto"), default="hf", help="generation backend (default hf)")
    e.add_argument("--seed", type=int, default=None, help="eval-set seed (default: the run's run.seed, else 0)")
    e.add_argument("--max-prompt-tokens", type=int, default=None)
    e.add_argument("--max-response-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=32, help="pairs per log-prob forward pass")
    e.add_argument("--details", action="store_true", help="include every eval prompt's greedy response")
    e.add_argument("--out", default=None, help="also write the JSON to this file")
    pl = sub.add_parser("plot", help="PNG of accuracy, reward, loss and w_qual / w_perf / margin across rounds")
    pl.add_argument("run_dir", help="run dir (runs/<name>/) or its metrics.jsonl")
    pl.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/plot.png)")
    return p


def _split(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """A first positional with '=' is an override, not a file (`omni-ray train loss.beta=2` works too)."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "eval":
        return _eval(args)
    if args.command == "plot":
        return _plot(args)
    try:
        cfg = load_config(*_split(args.config, args.overrides))
    except ConfigError as exc:
        print(f"omni-ray: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        from omni_ray.config_help import describe

        print(describe(cfg, args.keys))
        return 0
    if args.command == "plan":
        return _plan(cfg, args)
    if args.command == "make-tiny":
        from omni_ray.driver import ensure_model

        cfg.model.build_tiny_if_missing = True
        print(ensure_model(cfg))
        return 0
    from omni_ray.driver import train
    from omni_ray.plan import PlanError

    try:
        summary = train(cfg)
    except PlanError as exc:
        print(f"omni-ray: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("rounds_completed", "initial_eval", "final_eval", "wall_s")}, indent=2))
    return 0


def _plan(cfg, args: argparse.Namespace) -> int:
    from omni_ray.plan import PlanError, format_plan, plan_memory

    try:
        plan = plan_memory(cfg, args.gpu_mem_gib)
    except PlanError as exc:
        print(f"omni-ray plan: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan, all_phases=args.phases))
    return 0 if plan.fits else 1


def _eval(args: argparse.Namespace) -> int:
    from omni_ray.evaluate import evaluate

    try:
        result = evaluate(
            args.target,
            prompts=args.prompts,
            preferences=args.preferences,
            reference=args.reference,
            backend=args.backend,
            logprobs=args.logprobs,
            split=args.split,
            subset=args.subset,
            seed=args.seed,
            max_prompt_tokens=args.max_prompt_tokens,
            max_response_tokens=args.max_response_tokens,
            batch_size=args.batch_size,
            task=not args.no_task,
            details=args.details,
        )
    except (FileNotFoundError, ValueError) as exc:  # PreferenceDataError is a ValueError
        print(f"omni-ray eval: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from omni_ray.plot import MetricsError, plot_run

    try:
        print(plot_run(args.run_dir, args.out))
    except MetricsError as exc:
        print(f"omni-ray plot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
