"""`omni-ray plot`: a PNG from a run's metrics.jsonl; missing / empty metrics are clear errors naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from omni_ray.cli import main
from omni_ray.plot import MetricsError, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lines(rounds: int = 3, steps_per_round: int = 4) -> list[dict]:
    lines: list[dict] = [{"kind": "eval", "round": 0, "accuracy": 0.3, "reward_mean": 7.8, "prompts": 50}]
    step = 0
    for r in range(1, rounds + 1):
        for i in range(steps_per_round):
            step += 1
            lines.append(
                {"kind": "step", "round": r, "step": step, "loss": 0.2 - 0.01 * step, "w_qual": 0.9 + 0.01 * i,
                 "w_perf": 0.15 + 0.005 * i, "margin": 0.05 * r + 0.01 * i, "accuracy": 0.6}
            )  # fmt: skip
        lines.append(
            {"kind": "round", "round": r, "eval_accuracy": 0.3 + 0.05 * r, "eval_reward_mean": 8.0 + 0.1 * r,
             "reward_mean": 7.0 + 0.2 * r, "sample_accuracy": 0.2, "loss": 0.2 - 0.04 * r, "w_qual": 0.95,
             "w_perf": 0.16, "margin": 0.05 * r, "pairs_kept": 50}
        )  # fmt: skip
    lines.append({"kind": "summary", "rounds_completed": rounds})
    return lines


def _run_dir(tmp_path: Path, lines: list, name: str = "run") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return d


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_valid_png_into_the_run_dir(tmp_path):
    run = _run_dir(tmp_path, _lines())
    out = plot_run(run)
    assert out == run / "plot.png"
    width, height = _png_size(out)
    assert width >= 800 and height >= 600
    assert out.stat().st_size > 20_000  # six panels of curves, not a blank canvas


def test_cli_plot_writes_to_out_and_prints_the_path(tmp_path, capsys):
    run = _run_dir(tmp_path, _lines(rounds=2))
    out = tmp_path / "figs" / "curves.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    _png_size(out)


def test_round_means_only_metrics_still_plot(tmp_path):
    """A run logged without step lines: the distributions fall back to the round means."""
    lines = [x for x in _lines() if x["kind"] != "step"]
    _png_size(plot_run(_run_dir(tmp_path, lines)))


def test_missing_metrics_error_names_the_file(tmp_path, capsys):
    empty_run = tmp_path / "norun"
    empty_run.mkdir()
    with pytest.raises(MetricsError, match=r"norun/metrics\.jsonl: no such file"):
        plot_run(empty_run)
    assert main(["plot", str(empty_run)]) == 2
    assert "norun/metrics.jsonl" in capsys.readouterr().err


def test_empty_or_plotless_metrics_error_names_the_file(tmp_path):
    with pytest.raises(MetricsError, match=r"empty/metrics\.jsonl: no step / round / eval lines"):
        plot_run(_run_dir(tmp_path, ["", "   "], name="empty"))
    with pytest.raises(MetricsError, match=r"summary_only/metrics\.jsonl"):
        plot_run(_run_dir(tmp_path, [{"kind": "summary"}], name="summary_only"))


def test_truncated_lines_are_skipped_and_a_fresh_rerun_replaces_the_older_run(tmp_path):
    old_run = _lines(rounds=5)
    new_run = _lines(rounds=2)
    m = read_metrics(_run_dir(tmp_path, [*old_run, '{"kind": "step", "rou', *new_run]))
    assert m.skipped_lines == [len(old_run) + 1]
    assert m.restarts == 1 and sorted(m.rounds) == [1, 2] and len(m.steps) == 8
