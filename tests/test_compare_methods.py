"""examples/compare_methods.py: the method table's settings, aggregation and formatting on synthetic metrics (no
training here)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from omni_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "examples" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


cm = _load_script()


def _run(method, lr, seed, accuracy, pairs=None, error=None):
    rec = {"method": method, "lr": lr, "seed": seed, "accuracy": accuracy, "samples_per_round": 100, "pairs": pairs}
    return {**rec, "error": error} if error else rec


def test_every_method_is_a_valid_config_with_the_right_loss():
    variants = {n: "omni_dpo" for n in ("omni_qual_only", "omni_perf_only", "omni_no_nll", "null_swap")}
    variants["null_swap_dpo"] = "dpo"
    for name, method in cm.METHODS.items():
        overrides = [*cm.COMMON, *method.overrides, f"learner.lr={method.lr}"]
        cfg = load_config(ROOT / "configs" / "local_tiny.yaml", overrides)
        assert cfg.loss.name == variants.get(name, name) and cfg.learner.lr == method.lr
        assert cfg.pairs.swap_prob == (0.5 if name.startswith("null_swap") else 0.0)
    assert load_config(None, list(cm.METHODS["null_swap"].overrides)).pairs.swap_prob == 0.5
    assert load_config(None, list(cm.METHODS["omni_qual_only"].overrides)).loss.gamma == 0.0
    assert load_config(None, list(cm.METHODS["omni_perf_only"].overrides)).loss.eta == 0.0
    assert load_config(None, list(cm.METHODS["omni_no_nll"].overrides)).loss.lam == 0.0
    assert load_config(None, list(cm.METHODS["rft"].overrides)).loss.tau_good == 10.0  # exact arith answers only


def test_accuracy_curve_reads_initial_eval_then_rounds_in_order():
    metrics = [
        {"kind": "eval", "round": 0, "accuracy": 0.3},
        {"kind": "step", "round": 1, "loss": 0.1},
        {"kind": "round", "round": 2, "eval_accuracy": 0.42},
        {"kind": "round", "round": 1, "eval_accuracy": 0.35},
        {"kind": "summary"},
    ]
    assert cm.accuracy_curve(metrics) == [0.3, 0.35, 0.42]
    with pytest.raises(ValueError, match="initial eval"):
        cm.accuracy_curve(metrics[1:])


def test_samples_to_reach_counts_the_rounds_before_the_first_hit():
    assert cm.samples_to_reach([0.3, 0.38, 0.41, 0.39], 0.40, 2048) == 2 * 2048
    assert cm.samples_to_reach([0.45, 0.5], 0.40, 2048) == 0
    assert cm.samples_to_reach([0.3, 0.39], 0.40, 2048) is None


def test_mean_std_uses_sample_std_and_skips_missing_values():
    mean, std = cm.mean_std([0.2, 0.4, None, float("nan")])
    assert mean == pytest.approx(0.3) and std == pytest.approx(math.sqrt(0.02))
    assert cm.mean_std([0.5]) == (0.5, None)
    assert cm.mean_std([None]) == (None, None)


def test_aggregate_groups_by_method_and_lr_over_seeds():
    runs = [
        _run("dpo", 5e-6, 0, [0.3, 0.35, 0.45], {"pair_accuracy": 0.6, "pearson": 0.2, "spearman": 0.3}),
        _run("dpo", 5e-6, 1, [0.3, 0.41, 0.39], {"pair_accuracy": 0.8, "pearson": 0.4, "spearman": None}),
        _run("dpo", 3e-5, 0, [0.3, 0.1, 0.05], {"pair_accuracy": 0.5, "pearson": 0.0, "spearman": 0.0}),
        _run("dpo", 3e-5, 1, [], error="RuntimeError: boom"),
        _run("rft", 3e-5, 0, [0.3, 0.32, 0.36]),
    ]
    rows = cm.aggregate(runs, target=0.40)
    assert [(r["method"], r["lr"]) for r in rows] == [("dpo", 5e-6), ("dpo", 3e-5), ("rft", 3e-5)]
    best, unstable, rft = rows
    assert best["seeds"] == [0, 1] and best["failed"] == 0
    assert best["accuracy"][0] == (pytest.approx(0.3), pytest.approx(0.0))
    assert best["accuracy"][2][0] == pytest.approx(0.42)
    assert best["gain"][0] == pytest.approx(0.12) and best["final_min"] == pytest.approx(0.39)
    assert best["samples_to_target"] == {"target": 0.40, "mean": 150.0, "reached": 2, "of": 2}  # rounds 2 and 1
    assert best["pair_accuracy"][0] == pytest.approx(0.7) and best["spearman"] == (0.3, None)
    assert unstable["failed"] == 1 and unstable["seeds"] == [0] and unstable["gain"][0] == pytest.approx(-0.25)
    assert unstable["samples_to_target"]["reached"] == 0
    assert rft["pair_accuracy"] == (None, None)


def test_results_table_shows_mean_std_not_reached_and_failures():
    runs = [
        _run("omni_dpo", 3e-5, 0, [0.3, 0.4], {"pair_accuracy": 0.75, "pearson": 0.5, "spearman": 0.25}),
        _run("omni_dpo", 3e-5, 1, [0.3, 0.5], {"pair_accuracy": 0.25, "pearson": 0.5, "spearman": 0.25}),
        _run("dpo", 5e-6, 0, [0.3, 0.31]),
        _run("dpo", 5e-6, 1, [], error="x"),
    ]
    table = cm.results_table(cm.aggregate(runs, target=0.40), target=0.40)
    lines = table.splitlines()
    assert lines[0].startswith("| method | lr | seeds | acc r0 | acc r1 | gain | worst final | samples to 0.40 |")
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| omni_dpo | 3e-5 | 2 | 0.300 ± 0.000 | 0.450 ± 0.071 | 0.150 ± 0.071 | 0.400 | 100 (2/2) |" in table
    assert "| 0.500 ± 0.354 | 0.500 ± 0.000 |" in table
    assert "| dpo | 5e-6 | 1 (1 failed) | 0.300 | 0.310 | 0.010 | 0.310 | not reached | - | - | - |" in table


def test_hyperparameter_table_states_every_method_override():
    table = cm.hyperparameter_table(list(cm.METHODS))
    for name, method in cm.METHODS.items():
        assert f"| {name} | {cm.fmt_lr(method.lr)} | `{' '.join(method.overrides)}` |" in table


def test_lrs_per_method_and_cli_defaults():
    assert cm.lrs_for("dpo", ["own", "5e-6", "3e-5"]) == [5e-6, 3e-5]
    assert cm.lrs_for("omni_dpo", ["own"]) == [3e-5]
    quick = cm.parse_args(["--quick"])
    assert quick.seeds == (0,) and quick.lrs == ("own",) and quick.methods == tuple(cm.METHODS)
    assert quick.out.name == "compare_quick"
    full = cm.parse_args(["--methods", "dpo", "rft", "--rounds", "2", "--lrs", "own", "1e-4", "--out", "/tmp/x"])
    assert (
        full.seeds == (0, 1, 2) and full.rounds == 2 and full.methods == ("dpo", "rft") and full.lrs == ("own", "1e-4")
    )
    assert str(full.out) == "/tmp/x"
    with pytest.raises(SystemExit):
        cm.parse_args(["--lrs", "fast"])
