"""The methods side by side on the built-in arith task (issue #8): one online round loop per (method, lr, seed).

    .venv/bin/python examples/compare_methods.py --quick          # 1 seed, each method at its own lr, 3 short rounds
    .venv/bin/python examples/compare_methods.py                  # 3 seeds x 2 lrs x 12 methods, 5 rounds of 512

Every run is `omni_ray.driver.train(cfg)` on `configs/local_tiny.yaml` plus the method's overrides (METHODS below),
all in one Ray session, each into its own run dir under `--out`/runs/. Every method of a seed sees the same prompts
(the task's prompt stream is a function of the seed), the same warm start and the same sample budget
(rounds x prompts_per_round x samples_per_prompt). Seed s > 0 gets its own warm start, `models/tiny-arith-seed<s>`
(built once, cached); seed 0 uses `models/tiny-arith`, the one `make demo` builds.

Reported per (method, lr), mean +- std over seeds (std only with >= 2 seeds):

- greedy held-out accuracy after every round (the driver's per-round eval on the seed's 500 fixed eval prompts);
- samples needed to reach TARGET_ACCURACY: samples per round x the first round whose accuracy >= TARGET_ACCURACY;
- the DPO-PoP paper's discriminative metrics (arXiv 2509.22851) of the final checkpoint on held-out pairs: pair
  accuracy (implicit margin > 0), Pearson and Spearman correlation of the implicit margin with the score gap.
  The held-out pairs are built once per seed from the eval prompts: the seed's initial model samples 8 answers per
  prompt (temperature 1), the arith verifier scores them, best vs worst (ties dropped); they are written to
  `--out`/heldout_pairs_seed<s>.jsonl in the preferences schema. Margins use summed log-probs (the PoP paper's
  convention) against the initial model, for every method alike (also the reference-free ones).

Outputs: `--out`/results.json (settings, machine, every run, the aggregated rows) and `--out`/results.md (the
tables, also printed). A run dir that already holds this script's `compare.json` for the same settings is reused,
so an interrupted full run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_ACCURACY = 0.40  # "samples needed to reach": the warm start sits near 0.30 (docs/methods.md sec. 5)
HELDOUT_SAMPLES = 8  # samples per held-out prompt from the initial model (the training rounds' budget per prompt)
HELDOUT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Method:
    overrides: tuple[str, ...]  # key=value on top of configs/local_tiny.yaml
    lr: float  # the method's own learning rate (--quick runs each method at this one)
    why: str  # where the choices come from (docs/methods.md section, paper)


# Omni-DPO's released defaults (docs/methods.md sec. 2): beta 2.0 (Llama-3-8B), eta 0.7, gamma 3.0, tau_ref 1.0 (chat;
# the responses here are 2-4 tokens, closer to chat than to long math solutions), lambda 0.2 (math). Adapted to the
# task's score scale: arith quality is 10*exp(-|err|/10) on 0-10, so exactly right = 10.0 and off by one = 9.05;
# tau_good 10.0 puts the calibrated NLL on verified-correct chosen answers only (the paper's 8.0 would admit answers
# off by 2). eta 0.7 is kept: the paper's scores are on the same 0-10 scale.
OMNI = ("loss.beta=2.0", "loss.eta=0.7", "loss.gamma=3.0", "loss.tau_ref=1.0", "loss.lam=0.2", "loss.tau_good=10.0")
OMNI_WHY = "Omni-DPO released defaults (sec. 2), tau_good = exact answer; lr 3e-5: +19 to +24 in sec. 5"
# Learning rates (docs/methods.md sec. 5, this model): DPO-family losses on summed log-probs were best at 5e-6 and
# collapse at >= 3e-5; Omni-DPO at 3e-5 (it tolerates ~10x higher). Losses on length-normalised log-probs (SimPO,
# RFT) get Omni-DPO's rate, those on summed log-probs (DPO, PoP, RPO) DPO's.
LR_SUMMED, LR_MEAN = 5e-6, 3e-5

METHODS: dict[str, Method] = {
    # DPO (arXiv 2305.18290) on summed log-probs with the paper's beta 0.1 (also DPO-PoP's beta).
    "dpo": Method(("loss.name=dpo", "loss.beta=0.1"), LR_SUMMED, "DPO paper beta 0.1, summed log-probs; lr: sec. 5"),
    # SimPO (arXiv 2405.14734): length-normalised, reference-free; beta 2.0 and target margin 0.5, the config defaults
    # (SimPO's beta is 2-10); the same beta as Omni-DPO so the two differ only in Omni-DPO's weights and reference.
    "simpo": Method(
        ("loss.name=simpo", "loss.beta=2.0", "loss.simpo_gamma=0.5"), LR_MEAN, "beta 2 (as Omni-DPO), margin 0.5"
    ),
    "omni_dpo": Method(("loss.name=omni_dpo", *OMNI), LR_MEAN, OMNI_WHY),
    # DPO-PoP (arXiv 2509.22851, sec. 3): the paper's beta 0.1 and clip [0, 10] in summed-log-prob units, EMA target
    # (tau 0.99), iterative sampling, k = 1 (the config defaults).
    "pop": Method(
        ("loss.name=pop", "loss.beta=0.1", "pop.m_min=0.0", "pop.m_max=10.0", "pop.target=ema", "pop.k=1"),
        LR_SUMMED,
        "PoP paper beta 0.1, clip [0, 10] (summed), EMA target, iterative k=1",
    ),
    # Omni-DPO + PoP margins (sec. 4, what `make demo` runs): clip [0, 1] in length-normalised units, where the
    # implicit margins of 2-4 token answers are ~|y| times smaller than the summed [0, 10].
    "omni_pop": Method(
        ("loss.name=omni_pop", *OMNI, "pop.m_min=0.0", "pop.m_max=1.0", "pop.target=ema", "pop.k=1"),
        LR_MEAN,
        "Omni-DPO as above + PoP margins clipped to [0, 1] (length-normalised units)",
    ),
    # Ablations of Omni-DPO (sec. 2 reductions). gamma = 0 makes w_perf = 1: the quality weight alone.
    "omni_qual_only": Method(("loss.name=omni_dpo", *OMNI, "loss.gamma=0.0"), LR_MEAN, "Omni-DPO, gamma 0 (w_perf=1)"),
    # eta = 0 makes w_qual = 1/2 for every pair: the performance weight alone. A constant factor on the loss needs no
    # lr compensation under AdamW (the update divides by the gradient's RMS, so it cancels); but it would halve the
    # preference term against the calibrated NLL, which w_qual does not multiply, so lambda is halved (0.2 -> 0.1)
    # to keep the full method's preference : NLL balance (its w_qual is ~0.96 on average).
    "omni_perf_only": Method(
        ("loss.name=omni_dpo", *OMNI, "loss.eta=0.0", "loss.lam=0.1"),
        LR_MEAN,
        "Omni-DPO, eta 0 (w_qual=1/2), lambda 0.1 to keep the preference:NLL ratio",
    ),
    # lambda = 0: no calibrated NLL (sec. 5 found it about the same as 0.2 here).
    "omni_no_nll": Method(("loss.name=omni_dpo", *OMNI, "loss.lam=0.0"), LR_MEAN, "Omni-DPO, lambda 0"),
    # Controls (sec. 5). RPO (arXiv 2404.19733): DPO as above + the chosen answer's length-normalised NLL, alpha 1
    # (the paper's).
    "rpo": Method(("loss.name=rpo", "loss.beta=0.1", "loss.rpo_alpha=1.0"), LR_SUMMED, "DPO as above + NLL, alpha 1"),
    # RFT (arXiv 2308.01825): fine-tuning on the model's own chosen answers that are exactly right, no reference.
    "rft": Method(("loss.name=rft", "loss.tau_good=10.0"), LR_MEAN, "NLL on exactly-correct chosen answers only"),
    # Null controls: every pair's responses swapped with probability 1/2 (the scores stay in place, see
    # omni_ray/pairs.py), so the labels carry no preference signal; any gain would come from the extra steps. On
    # Omni-DPO (same weights and steps as omni_dpo) and on DPO: Omni-DPO's w_perf is computed from the policy's own
    # margin, which already favours correct answers, so it up-weights exactly the swapped pairs; DPO starts from
    # M = 0 on every pair and has no such weight.
    "null_swap": Method(
        ("loss.name=omni_dpo", *OMNI, "pairs.swap_prob=0.5"), LR_MEAN, "omni_dpo on pairs swapped w.p. 1/2"
    ),
    "null_swap_dpo": Method(
        ("loss.name=dpo", "loss.beta=0.1", "pairs.swap_prob=0.5"), LR_SUMMED, "dpo on pairs swapped w.p. 1/2"
    ),
}

# Every run: HF generate for rollout (the tiny model's vLLM engine takes ~20 s longer to start per run and generates
# a round no faster, measured), one checkpoint kept (only the final one is evaluated).
COMMON = ("rollout.backend=hf", "run.keep_checkpoints=1")


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...]
    lrs: tuple[str, ...]  # floats as text, or "own" (each method's own lr)
    rounds: int
    prompts_per_round: int
    methods: tuple[str, ...]
    out: Path
    config: Path


QUICK = {"seeds": [0], "lrs": ["own"], "rounds": 3, "prompts": 256}
FULL = {"seeds": [0, 1, 2], "lrs": [f"{LR_SUMMED:g}", f"{LR_MEAN:g}"], "rounds": 5, "prompts": 512}


# ---------------------------------------------------------------------------------------------------------------------
# aggregation (pure: unit-tested on synthetic records)


def lrs_for(method: str, lrs: Sequence[str]) -> list[float]:
    """The learning rates a method runs at: each entry a float or "own" (the method's lr), duplicates removed."""
    out: list[float] = []
    for item in lrs:
        lr = METHODS[method].lr if item == "own" else float(item)
        if lr not in out:
            out.append(lr)
    return out


def accuracy_curve(metrics: Sequence[dict[str, Any]]) -> list[float]:
    """Held-out accuracy before training (round 0) and after each round, from a run's metrics.jsonl records."""
    initial = [m["accuracy"] for m in metrics if m.get("kind") == "eval" and m.get("round") == 0]
    rounds = sorted((m["round"], m["eval_accuracy"]) for m in metrics if m.get("kind") == "round")
    if not initial:
        raise ValueError("metrics have no initial eval (kind=eval, round=0)")
    return [float(initial[0])] + [float(acc) for _, acc in rounds]


def samples_to_reach(curve: Sequence[float], target: float, samples_per_round: int) -> int | None:
    """Samples generated before the first round whose accuracy >= target (0 if the start already is); else None."""
    for r, acc in enumerate(curve):
        if acc >= target:
            return r * samples_per_round
    return None


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof 1) of the values that are not None / NaN; std None with fewer than 2 values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(runs: Sequence[dict[str, Any]], target: float = TARGET_ACCURACY) -> list[dict[str, Any]]:
    """One row per (method, lr) in the order first seen: per-round accuracy, gain, worst final, samples to target and
    pair metrics over seeds. Failed runs (an `error`) are counted, not averaged."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], float(run["lr"])), []).append(run)
    rows = []
    for (method, lr), group in groups.items():
        ok = [r for r in group if not r.get("error")]
        n_rounds = max((len(r["accuracy"]) for r in ok), default=0)
        per_round = [mean_std([r["accuracy"][i] for r in ok if len(r["accuracy"]) > i]) for i in range(n_rounds)]
        reached = [samples_to_reach(r["accuracy"], target, r["samples_per_round"]) for r in ok]
        hits = [s for s in reached if s is not None]
        pairs = [r.get("pairs") or {} for r in ok]
        rows.append(
            {
                "method": method,
                "lr": lr,
                "seeds": sorted(r["seed"] for r in ok),
                "failed": len(group) - len(ok),
                "accuracy": per_round,
                "gain": mean_std([r["accuracy"][-1] - r["accuracy"][0] for r in ok]),
                "final_min": min((r["accuracy"][-1] for r in ok), default=None),
                "samples_to_target": {
                    "target": target,
                    "mean": mean_std(hits)[0],
                    "reached": len(hits),
                    "of": len(ok),
                },
                **{k: mean_std([p.get(k) for p in pairs]) for k in ("pair_accuracy", "pearson", "spearman")},
            }
        )
    return rows


def fmt(ms: tuple[float | None, float | None], digits: int = 3) -> str:
    """'mean +- std', 'mean' with one value, '-' with none."""
    mean, std = ms
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _fmt_samples(s: dict[str, Any]) -> str:
    if not s["reached"]:
        return "not reached"
    count = "" if s["reached"] == s["of"] == 1 else f" ({s['reached']}/{s['of']})"
    return f"{s['mean']:,.0f}{count}"


def results_table(rows: Sequence[dict[str, Any]], target: float = TARGET_ACCURACY) -> str:
    """The markdown table of the aggregated rows."""
    n_rounds = max((len(r["accuracy"]) for r in rows), default=1)
    head = ["method", "lr", "seeds"] + [f"acc r{i}" for i in range(n_rounds)]
    head += ["gain", "worst final", f"samples to {target:.2f}", "pair acc", "Pearson", "Spearman"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        seeds = str(len(r["seeds"])) + (f" ({r['failed']} failed)" if r["failed"] else "")
        accs = [fmt(ms) for ms in r["accuracy"]] + ["-"] * (n_rounds - len(r["accuracy"]))
        final_min = "-" if r["final_min"] is None else f"{r['final_min']:.3f}"
        cells = [r["method"], fmt_lr(r["lr"]), seeds, *accs, fmt(r["gain"]), final_min]
        cells += [_fmt_samples(r["samples_to_target"]), fmt(r["pair_accuracy"]), fmt(r["pearson"]), fmt(r["spearman"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hyperparameter_table(methods: Sequence[str]) -> str:
    lines = ["| method | lr (own) | overrides of configs/local_tiny.yaml | why |", "|---|---|---|---|"]
    for name in methods:
        m = METHODS[name]
        lines.append(f"| {name} | {fmt_lr(m.lr)} | `{' '.join(m.overrides)}` | {m.why} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# running


def _model_path(base: str, seed: int) -> str:
    path = Path(base) if Path(base).is_absolute() else ROOT / base
    return str(path if seed == 0 else path.with_name(f"{path.name}-seed{seed}"))


def _seed_overrides(s: Settings, seed: int, base_model: str) -> list[str]:
    return [
        *COMMON,
        f"run.seed={seed}",
        f"run.rounds={s.rounds}",
        f"data.prompts_per_round={s.prompts_per_round}",
        f"run.output_dir={s.out / 'runs'}",
        f"model.path={_model_path(base_model, seed)}",
    ]


def heldout_pairs(cfg: Any, path: Path) -> Path:
    """Best-vs-worst pairs of the initial model's samples on the seed's eval prompts, written once (jsonl)."""
    if path.is_file():
        return path
    import numpy as np

    from omni_ray.data import encode_prompt
    from omni_ray.data.arith import ArithTask
    from omni_ray.pairs import build_pairs, scored_samples
    from omni_ray.rollout.worker import RolloutWorker
    from omni_ray.scoring import ArithVerifier

    seed = cfg.run.seed
    prompts = ArithTask(max_operand=cfg.data.max_operand, seed=seed, eval_size=cfg.data.eval_prompts).eval_prompts()
    max_len = cfg.rollout.max_model_len or cfg.model.tiny.max_position_embeddings
    worker = RolloutWorker(cfg.model.path, backend="hf", seed=seed, max_model_len=max_len)
    try:
        ids = [encode_prompt(worker.tokenizer, p.text) for p in prompts]
        comps = worker.generate(
            ids,
            n=HELDOUT_SAMPLES,
            temperature=HELDOUT_TEMPERATURE,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=seed * 1_000_003 + 977,
        )
    finally:
        worker.close()
    flat = [(p, i, c) for p, i, cs in zip(prompts, ids, comps, strict=True) for c in cs]
    res = ArithVerifier().score([p.text for p, _, _ in flat], [c.text for _, _, c in flat])
    samples = scored_samples(flat, res.scores, res.correct)
    pairs, stats = build_pairs(samples, strategy="best_worst", rng=np.random.default_rng([seed, 29]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p.to_record()) + "\n" for p in pairs))
    tmp.rename(path)
    print(f"[compare] held-out pairs for seed {seed}: {len(pairs)} of {stats.prompts} prompts -> {path}", flush=True)
    return path


def run_one(s: Settings, method: str, lr: float, seed: int, base: list[str], pairs_path: Path) -> dict[str, Any]:
    """Train one (method, lr, seed), then read its accuracy curve and evaluate its final checkpoint on the held-out
    pairs. A run dir with a `compare.json` of the same settings is reused."""
    from omni_ray.config import load_config
    from omni_ray.driver import train
    from omni_ray.evaluate import newest_checkpoint, preference_eval
    from omni_ray.tracking import read_records

    name = f"{method}__lr{fmt_lr(lr)}__seed{seed}"
    cfg = load_config(s.config, [*base, *METHODS[method].overrides, f"learner.lr={lr}", f"run.name={name}"])
    run_dir = Path(cfg.run.output_dir) / name
    key = {"method": method, "lr": lr, "seed": seed, "rounds": s.rounds, "prompts_per_round": s.prompts_per_round}
    cached = run_dir / "compare.json"
    if cached.is_file() and all(json.loads(cached.read_text()).get(k) == v for k, v in key.items()):
        return json.loads(cached.read_text())
    record: dict[str, Any] = {
        **key,
        "run_dir": str(run_dir),
        "overrides": list(METHODS[method].overrides),
        "samples_per_round": s.prompts_per_round * cfg.rollout.samples_per_prompt,
    }
    t0 = time.perf_counter()
    try:
        summary = train(cfg)
        record["accuracy"] = accuracy_curve(read_records(run_dir / "metrics.jsonl"))
        record["train_wall_s"] = summary["wall_s"]
        ckpt = newest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate")
        pref = preference_eval(str(pairs_path), str(ckpt), reference_path=cfg.model.path, logprobs="sum")
        record["pairs"] = {k: pref[k] for k in ("pairs", "pair_accuracy", "pearson", "spearman", "margin_mean")}
    except Exception as exc:  # one failed run must not lose the others: it is recorded and reported
        traceback.print_exc()
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["wall_s"] = time.perf_counter() - t0
    if not record.get("error"):
        cached.write_text(json.dumps(record, indent=2))
    return record


def machine() -> dict[str, Any]:
    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if "model name" in ln), "")
    import torch

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpus": torch.cuda.device_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_all(s: Settings) -> dict[str, Any]:
    import ray

    from omni_ray.config import load_config
    from omni_ray.driver import ensure_model, init_ray

    s.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    base_model = load_config(s.config).model.path
    plan = [(seed, m, lr) for seed in s.seeds for m in s.methods for lr in lrs_for(m, s.lrs)]
    print(f"[compare] {len(plan)} runs: {len(s.methods)} methods x seeds {list(s.seeds)} x lrs {list(s.lrs)}")
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    try:
        for seed in s.seeds:
            base = _seed_overrides(s, seed, base_model)
            cfg = load_config(s.config, base)
            init_ray(cfg)  # one Ray session for every run; train() joins it
            ensure_model(cfg)
            pairs_path = heldout_pairs(cfg, s.out / f"heldout_pairs_seed{seed}.jsonl")
            for _, method, lr in [p for p in plan if p[0] == seed]:
                rec = run_one(s, method, lr, seed, base, pairs_path)
                runs.append(rec)
                acc = rec.get("accuracy") or []
                done = f"acc {acc[0]:.3f} -> {acc[-1]:.3f}" if acc else f"FAILED ({rec.get('error')})"
                print(
                    f"[compare] {len(runs)}/{len(plan)} {method} lr {fmt_lr(lr)} seed {seed}: {done} "
                    f"({rec['wall_s']:.0f} s)",
                    flush=True,
                )
                result = _write(s, runs, started, t_start)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return result


def _write(s: Settings, runs: list[dict[str, Any]], started: str, t_start: float) -> dict[str, Any]:
    rows = aggregate(runs)
    result = {
        "started": started,
        "wall_s": time.perf_counter() - t_start,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "seeds": list(s.seeds),
            "lrs": list(s.lrs),
            "rounds": s.rounds,
            "prompts_per_round": s.prompts_per_round,
            "config": str(s.config),
            "common_overrides": list(COMMON),
            "target_accuracy": TARGET_ACCURACY,
        },
        "machine": machine(),
        "hyperparameters": {
            m: {"lr": METHODS[m].lr, "overrides": METHODS[m].overrides, "why": METHODS[m].why} for m in s.methods
        },
        "rows": rows,
        "runs": runs,
    }
    (s.out / "results.json").write_text(json.dumps(result, indent=2))
    (s.out / "results.md").write_text(
        f"{results_table(rows)}\n\nHyperparameters:\n\n{hyperparameter_table(s.methods)}\n"
    )
    return result


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, each method at its own lr, 3 rounds of 256 prompts")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    p.add_argument(
        "--lrs",
        nargs="+",
        help='learning rates for every method; "own" = the method\'s own lr '
        f"(default: {' '.join(FULL['lrs'])}; --quick: own)",
    )
    p.add_argument("--rounds", type=int, help="online rounds per run (default 5; --quick 3)")
    p.add_argument("--prompts", type=int, help="prompts per round (default 512; --quick 256)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        metavar="METHOD",
        help=f"subset of: {', '.join(METHODS)}",
    )
    p.add_argument("--out", type=Path, help="output dir (default runs/compare, --quick: runs/compare_quick)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "local_tiny.yaml")
    a = p.parse_args(argv)
    d = QUICK if a.quick else FULL
    for item in a.lrs or []:
        if item != "own":
            try:
                if float(item) <= 0:
                    raise ValueError
            except ValueError:
                p.error(f"--lrs: {item!r} is neither a positive number nor 'own'")
    return Settings(
        seeds=tuple(a.seeds if a.seeds is not None else d["seeds"]),
        lrs=tuple(a.lrs or d["lrs"]),
        rounds=a.rounds or d["rounds"],
        prompts_per_round=a.prompts or d["prompts"],
        methods=tuple(a.methods),
        out=(a.out or ROOT / "runs" / ("compare_quick" if a.quick else "compare")).resolve(),
        config=a.config.resolve(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    # What `make demo` exports (Makefile), for a bare `.venv/bin/python examples/compare_methods.py`.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the local session listens on loopback only
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result = run_all(s)
    print(f"\n{(s.out / 'results.md').read_text()}")
    print(f"[compare] {len(result['runs'])} runs in {result['wall_s']:.0f} s -> {s.out / 'results.json'}")
    return 1 if any(r.get("error") for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
