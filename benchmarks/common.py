"""What every benchmark shares: environment, argument parsing, omni-ray runs, process-tree sampling, tables, JSON.

Each benchmark script is `python benchmarks/<name>.py [--quick] [--out PATH]`: it prints a markdown table and
writes JSON (`runs/bench/<name>.json` by default) holding the settings, the machine (with the load average when it
started, since on a shared machine that is what makes absolute numbers comparable or not), the date and the rows.

The scripts run `omni_ray.driver.train(cfg)` in-process, so the benchmark process IS the driver: its RSS is the
driver's, and the local Ray cluster that `train` starts (raylet, workers, actors) is a tree of its child processes,
which is what `ProcessTreeMonitor` samples. Nothing here talks to another Ray cluster on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_RUNS = ROOT / "runs" / "bench"
DEFAULT_CONFIG = ROOT / "configs" / "local_tiny.yaml"

# What `make demo` exports (Makefile): DeepSpeed's CPU accelerator and JIT cache, loopback Ray without token auth,
# no W&B, no hub. Set before ray / deepspeed / transformers are imported, and only when the caller has not.
ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".venv" / "torch_extensions"),
    "RAY_AUTH_MODE": "disabled",
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}


def setup() -> None:
    """Environment defaults, the repo on sys.path (scripts run as files from a fresh clone), cwd = repo root
    (configs use relative paths such as models/tiny-arith)."""
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path, and Ray hands the script's dir to every worker:
    # modules here (common, scaling, weight_sync ...) would shadow top-level names there. The repo root replaces it
    # (actors import `benchmarks.progression` from it; Ray also adds the cwd, which is the root).
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)


# ---------------------------------------------------------------------------------------------------------------------
# arguments and output


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """`--quick` and `--out` for every benchmark; scripts add their own options."""
    p = argparse.ArgumentParser(
        prog=f"benchmarks/{name}.py",
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small settings that finish in minutes (a smoke run)")
    p.add_argument("--out", type=Path, default=BENCH_RUNS / f"{name}.json", help="JSON result path")
    return p


def machine() -> dict[str, Any]:
    """The machine and software the numbers were measured with, plus how busy the machine was at the start."""
    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if "model name" in ln), "")
    mem_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kb = next(int(ln.split()[1]) for ln in meminfo.read_text().splitlines() if ln.startswith("MemTotal"))
        mem_gib = round(kb / 2**20, 1)
    versions = {}
    for mod in ("torch", "transformers", "ray", "deepspeed", "vllm", "trl"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed, or (vllm) an import that fails: record the absence, do not die
            versions[mod] = None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "git": _git_rev(),
        **versions,
    }


def _git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True)  # fmt: skip
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except OSError:
        return None


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub markdown table; floats with `digits` decimals, None / NaN as '-'."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(out: Path, name: str, *, quick: bool, settings: dict, results: Any, tables: Sequence[str],
                 machine_info: dict, started: float) -> None:  # fmt: skip
    """Print the tables and write the JSON (date, machine, settings, results, the tables as printed)."""
    text = "\n\n".join(tables)
    print("\n" + text + "\n", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine_info,
        "loadavg_at_end": list(os.getloadavg()),
        "settings": settings,
        "results": results,
        "tables_markdown": text,
    }
    out.write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
    print(f"[bench] wrote {out} ({doc['wall_s']} s)", flush=True)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def mean(xs: Iterable[float]) -> float:
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(vals) / len(vals) if vals else math.nan


# ---------------------------------------------------------------------------------------------------------------------
# omni-ray runs


def config(bench: str, run_name: str, overrides: Sequence[str] = (), base: Path = DEFAULT_CONFIG) -> Any:
    """configs/local_tiny.yaml + overrides, writing to runs/bench/<bench>/<run_name>/ (never over a user's run)."""
    from omni_ray.config import load_config

    return load_config(
        str(base),
        [f"run.output_dir={BENCH_RUNS / bench}", f"run.name={run_name}", "logging.wandb.mode=disabled", *overrides],
    )


def train(cfg: Any, monitor: ProcessTreeMonitor | None = None) -> dict[str, Any]:
    """`omni_ray.driver.train(cfg)`; returns the summary, the round rows of metrics.jsonl and the wall time.

    With a monitor, it samples the process tree at the end of every round (it watches metrics.jsonl for round rows).
    """
    from omni_ray.driver import train as omni_train

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    # A benchmark's run dir holds only its last run: the driver would set an earlier one aside (runs/x.prev-...),
    # piling up checkpoints, and a monitor must not read the earlier run's rounds.
    if run_dir.resolve().is_relative_to(BENCH_RUNS.resolve()) and run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    if monitor is not None:
        monitor.watch(run_dir / "metrics.jsonl")
    try:
        summary = omni_train(cfg)
    finally:
        if monitor is not None:
            monitor.unwatch()
    wall = time.perf_counter() - t0
    return {"summary": summary, "rounds": round_rows(run_dir), "wall_s": wall, "run_dir": str(run_dir)}


def round_rows(run_dir: Path) -> list[dict[str, Any]]:
    from omni_ray.tracking import read_records

    return read_records(Path(run_dir) / "metrics.jsonl", "round")


#: Per-round driver stage timers (omni_ray/driver/loop.py); a round's time_round covers these plus the glue between.
STAGES = ("generate", "score", "pop", "train", "sync", "eval", "checkpoint")


def stage_sum(row: dict[str, Any]) -> float:
    return sum(float(row.get(f"time_{s}", 0.0)) for s in STAGES)


def work_time(row: dict[str, Any]) -> float:
    """A round's time without its fixed-size extras (the held-out eval and the checkpoint), which do not grow with
    the prompts of the round and which TRL's loop does not do per step."""
    return float(row["time_round"]) - float(row.get("time_eval", 0.0)) - float(row.get("time_checkpoint", 0.0))


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ---------------------------------------------------------------------------------------------------------------------
# process tree: RSS per role, CPU seconds


#: Processes Ray titles `ray::<Name>` that are Ray's own, not actors of the run.
RAY_OWN = {"IDLE", "DashboardAgent", "RuntimeEnvAgent", "JobSupervisor"}


def _actor_class(title: str) -> str | None:
    """The actor class of a process titled `ray::Class.method` (Ray's process title), None for anything else."""
    if not title.startswith("ray::"):
        return None
    name = title[5:].split(".")[0].split(" ")[0]
    return None if name in RAY_OWN else name


def _role(proc: Any, me: int, actor_pids: dict[int, str]) -> str:
    """driver (this process), an actor's class name (Ray sets the title to `ray::Class.method`), `<Class> child`
    for processes an actor spawned (vLLM engine workers), `ray system` for raylet / gcs / dashboard / idle workers."""
    if proc.pid == me:
        return "driver"
    try:
        title = (proc.cmdline() or [proc.name()])[0]
    except Exception:
        return "ray system"
    name = _actor_class(title)
    if name:
        return name
    parent = proc.ppid()
    if parent in actor_pids:
        return f"{actor_pids[parent]} child"
    return "ray system"


def sample_tree() -> dict[str, Any]:
    """RSS and private RSS (RSS - shared pages), MiB, of this process and every descendant, summed per role; CPU
    seconds (user + system) of the tree."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    actor_pids: dict[int, str] = {}
    for p in procs:  # two passes: a child is named after its parent actor
        try:
            title = (p.cmdline() or [""])[0]
        except Exception:
            continue
        name = _actor_class(title)
        if name:
            actor_pids[p.pid] = name
    rss: dict[str, float] = {}
    private: dict[str, float] = {}
    cpu_s = 0.0
    for p in procs:
        try:
            with p.oneshot():
                mem = p.memory_info()
                t = p.cpu_times()
                role = _role(p, me.pid, actor_pids)
        except Exception:  # exited between listing and reading
            continue
        rss[role] = rss.get(role, 0.0) + mem.rss / 2**20
        # RSS minus file-backed and shared-memory pages: Ray's object store is shared memory mapped into every
        # process that reads an object, and its pages count in RSS once touched, leak or not.
        private[role] = private.get(role, 0.0) + (mem.rss - getattr(mem, "shared", 0)) / 2**20
        cpu_s += t.user + t.system
    return {"t": time.time(), "rss_mib": rss, "private_mib": private, "cpu_s": cpu_s}


class ProcessTreeMonitor:
    """Samples `sample_tree()` every 0.5 s in a thread and keeps one sample per round of a watched metrics.jsonl
    (a memory trace indexed by round, not by wall time), plus every `interval_s` a sample for the whole run.

    A round's sample is the newest one taken before its row was seen in metrics.jsonl in which every actor of the
    previous round's sample is alive: after the last round the driver stops the actors within a second, and a
    sample taken then would miss them."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.per_round: list[dict[str, Any]] = []
        self._watch: Path | None = None
        self._seen = 0
        self._recent: list[dict[str, Any]] = []  # the last few ticks' samples, oldest first
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-monitor", daemon=True)

    def __enter__(self) -> ProcessTreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def watch(self, metrics: Path) -> None:
        with self._lock:
            self._watch, self._seen, self._recent = metrics, 0, []

    def unwatch(self) -> None:
        with self._lock:
            self._check_rounds()
            self._watch = None

    def _pick(self) -> dict[str, Any] | None:
        mine = [t for t in self.per_round if self._watch is not None and t["run"] == self._watch.parent.name]
        want = {r for r in mine[-1]["rss_mib"] if r not in ("driver", "ray system")} if mine else set()
        for sample in reversed(self._recent):
            have = {r for r in sample["rss_mib"] if r not in ("driver", "ray system")}
            if have and want <= have:
                return sample
        return None

    def _check_rounds(self) -> None:
        if self._watch is None or not self._watch.is_file():
            return
        from omni_ray.tracking import read_records

        try:
            rounds = read_records(self._watch, "round")
        except (OSError, json.JSONDecodeError):  # a line half written: next tick
            return
        for r in rounds[self._seen :]:
            sample = self._pick()
            if sample is not None:
                self.per_round.append({"run": self._watch.parent.name, "round": r["round"], **sample})
        self._seen = len(rounds)

    def _loop(self) -> None:
        last_periodic = 0.0
        while not self._stop.is_set():
            with self._lock:
                self._check_rounds()  # with the samples of earlier ticks (see the class docstring)
                sample = sample_tree()
                self._recent = [*self._recent[-7:], sample]
            if time.monotonic() - last_periodic >= self.interval_s:
                self.samples.append(sample)
                last_periodic = time.monotonic()
            self._stop.wait(0.5)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
