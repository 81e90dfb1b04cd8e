"""Mutation check: does each core module's own test file notice a one-token change to the module?

For each module (losses, pairs, pop, objective) the script lists mutants, one operator or constant changed at a
time: a comparison (``<`` / ``<=`` / ``>`` / ``>=`` boundary and direction, ``==`` / ``!=``), ``+`` / ``-`` and
``*`` / ``/`` (binary and augmented), ``and`` / ``or``, the numbers 0 -> 1, 1 -> 0, 2 -> 1, and ``True`` / ``False``.
It copies the repository (without .venv, runs, models, .git and caches) to a temporary directory, writes each
mutant there, runs the module's test file against the copy and counts the mutant killed when the tests fail (or
time out). The working tree is never written to. The copy is what the tests import: a pytest plugin checks
``omni_ray.__file__`` at session start, and the unmutated copy must pass before any mutant runs.

    .venv/bin/python scripts/mutation_check.py                    # every module, every mutant
    .venv/bin/python scripts/mutation_check.py --module pop --max-mutants 40 --seed 1

The mutants are listed in source order; ``--max-mutants`` keeps a seeded random subset, so a run is reproducible.
See docs/testing.md, "Mutation check", for the figures and the survivors judged equivalent.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (module under test, its own test file); objective last (docs/testing.md).
MODULES: dict[str, tuple[str, str]] = {
    "losses": ("omni_ray/losses.py", "tests/test_losses.py"),
    "pairs": ("omni_ray/pairs.py", "tests/test_pairs.py"),
    "pop": ("omni_ray/pop.py", "tests/test_pop.py"),
    "objective": ("omni_ray/learner/objective.py", "tests/test_objective.py"),
}

# Top-level entries of the repository left out of the copy, and cache directories left out at any depth.
SKIP_TOP = {".venv", "runs", "models", ".git", ".pytest_cache", ".ruff_cache", "omni_ray.egg-info", "wandb"}
SKIP_ANY = {"__pycache__"}

# comparison -> (its spelling, the spellings it is swapped for: the boundary and the direction)
COMPARE_SWAPS: dict[type[ast.cmpop], tuple[str, tuple[str, ...]]] = {
    ast.Lt: ("<", ("<=", ">")),
    ast.LtE: ("<=", ("<", ">=")),
    ast.Gt: (">", (">=", "<")),
    ast.GtE: (">=", (">", "<=")),
    ast.Eq: ("==", ("!=",)),
    ast.NotEq: ("!=", ("==",)),
}
BINOP_SWAPS: dict[type[ast.operator], tuple[str, str]] = {
    ast.Add: ("+", "-"),
    ast.Sub: ("-", "+"),
    ast.Mult: ("*", "/"),
    ast.Div: ("/", "*"),
}
BOOLOP_SWAPS: dict[type[ast.boolop], tuple[str, str]] = {ast.And: ("and", "or"), ast.Or: ("or", "and")}
NUMBER_SWAPS: dict[int, int] = {0: 1, 1: 0, 2: 1}

PROBE = """
import os

import omni_ray


def pytest_sessionstart(session):
    root = os.path.realpath(os.environ["MUTATION_COPY"])
    got = os.path.realpath(omni_ray.__file__)
    if not got.startswith(root + os.sep):
        raise RuntimeError(f"mutation check: tests import omni_ray from {got}, not from the copy {root}")
"""


@dataclass(frozen=True)
class Mutant:
    """One token of ``path`` replaced: ``line`` (1-based), columns ``[col, end)`` of that line hold ``old``."""

    path: str
    line: int
    col: int
    end: int
    old: str
    new: str

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        text = lines[self.line - 1]
        if text[self.col : self.end] != self.old:
            raise ValueError(f"{self.path}:{self.line}: expected {self.old!r} at column {self.col}")
        lines[self.line - 1] = text[: self.col] + self.new + text[self.end :]
        return "".join(lines)

    def describe(self) -> str:
        return f"{self.path}:{self.line}:{self.col + 1}: {self.old} -> {self.new}"


def _tokens(source: str) -> list[tokenize.TokenInfo]:
    return [
        tok
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type in (tokenize.OP, tokenize.NAME)
    ]


def _token_between(
    tokens: list[tokenize.TokenInfo], start: tuple[int, int], stop: tuple[int, int], text: str
) -> tokenize.TokenInfo:
    """The first token spelled ``text`` at or after ``start`` and before ``stop`` (positions as (line, column))."""
    for tok in tokens:
        if start <= tok.start and tok.end <= stop and tok.string == text:
            return tok
    raise ValueError(f"no {text!r} between {start} and {stop}")


def _end(node: ast.AST) -> tuple[int, int]:
    return node.end_lineno, node.end_col_offset  # type: ignore[attr-defined, return-value]


def _start(node: ast.AST) -> tuple[int, int]:
    return node.lineno, node.col_offset  # type: ignore[attr-defined]


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _docstring_nodes(tree: ast.Module) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and _is_text(body[0].value):
            ids.add(id(body[0].value))
    return ids


def _operator_sites(tree: ast.Module, tokens: list[tokenize.TokenInfo]) -> Iterator[tuple[tokenize.TokenInfo, str]]:
    """(token, replacement) for every operator the check swaps."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
                if type(op) not in COMPARE_SWAPS:
                    continue
                old, swaps = COMPARE_SWAPS[type(op)]
                tok = _token_between(tokens, _end(left), _start(right), old)
                for new in swaps:
                    yield tok, new
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            if _is_text(node.left) or _is_text(node.right):
                continue
            old, new = BINOP_SWAPS[type(node.op)]
            yield _token_between(tokens, _end(node.left), _start(node.right), old), new
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAPS:
            old, new = BINOP_SWAPS[type(node.op)]
            yield _token_between(tokens, _end(node.target), _start(node.value), old + "="), new + "="
        elif isinstance(node, ast.BoolOp):
            old, new = BOOLOP_SWAPS[type(node.op)]
            for left, right in zip(node.values, node.values[1:], strict=False):
                yield _token_between(tokens, _end(left), _start(right), old), new


def mutants_of(path: str, source: str) -> list[Mutant]:
    """Every mutant of one module, in source order (one per site and replacement; each compiles)."""
    tree = ast.parse(source)
    tokens = _tokens(source)
    docstrings = _docstring_nodes(tree)
    lines = source.splitlines()
    found: list[Mutant] = []
    for tok, new in _operator_sites(tree, tokens):
        found.append(Mutant(path, tok.start[0], tok.start[1], tok.end[1], tok.string, new))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in docstrings or node.lineno != node.end_lineno:
            continue
        old = lines[node.lineno - 1][node.col_offset : node.end_col_offset]
        if isinstance(node.value, bool):
            found.append(Mutant(path, node.lineno, node.col_offset, node.end_col_offset, old, str(not node.value)))
        elif isinstance(node.value, (int, float)) and node.value in NUMBER_SWAPS:
            value = NUMBER_SWAPS[int(node.value)]
            new = repr(float(value)) if isinstance(node.value, float) else str(value)
            found.append(Mutant(path, node.lineno, node.col_offset, node.end_col_offset, old, new))
    found = sorted(set(found), key=lambda m: (m.line, m.col, m.new))
    valid = []
    for m in found:
        try:
            compile(m.apply(source), path, "exec")
        except SyntaxError:
            continue
        valid.append(m)
    return valid


def copy_repo(dest: Path) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory).resolve() == REPO
        return {n for n in names if n in SKIP_ANY or (top and n in SKIP_TOP)}

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)


def run_tests(copy: Path, probe_dir: Path, test_file: str, timeout_s: float) -> tuple[str, float]:
    """Run one test file in the copy: 'passed', 'failed' or 'timeout', and the seconds it took."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(copy), str(probe_dir)]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "MUTATION_COPY": str(copy),
    }
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "mutation_probe", test_file]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return "passed", seconds
    if "mutation check: tests import omni_ray from" in proc.stdout + proc.stderr:
        raise RuntimeError((proc.stdout + proc.stderr)[-2000:])
    return "failed", seconds


def check_module(name: str, copy: Path, probe_dir: Path, *, max_mutants: int | None, seed: int, timeout_s: float):
    path, test_file = MODULES[name]
    target = copy / path
    source = target.read_text()
    mutants = mutants_of(path, source)
    if max_mutants is not None and len(mutants) > max_mutants:
        keep = set(random.Random(seed).sample(range(len(mutants)), max_mutants))
        mutants = [m for i, m in enumerate(mutants) if i in keep]
    outcome, seconds = run_tests(copy, probe_dir, test_file, timeout_s)
    if outcome != "passed":
        raise SystemExit(f"{name}: {test_file} does not pass on the unmutated copy ({outcome}); nothing to measure")
    print(f"{name}: {len(mutants)} mutants of {path}, tests {test_file} ({seconds:.1f} s unmutated)", flush=True)
    survived: list[Mutant] = []
    timeouts = 0
    try:
        for m in mutants:
            target.write_text(m.apply(source))
            outcome, _ = run_tests(copy, probe_dir, test_file, timeout_s)
            timeouts += outcome == "timeout"
            if outcome == "passed":
                survived.append(m)
    finally:
        target.write_text(source)
    killed = len(mutants) - len(survived)
    share = 100.0 * killed / len(mutants) if mutants else 100.0
    print(
        f"{name}: mutants {len(mutants)}, killed {killed} ({timeouts} by timeout), survived {len(survived)}, "
        f"killed {share:.1f}%"
    )
    lines = source.splitlines()
    for m in survived:
        print(f"  survived {m.describe()}    | {lines[m.line - 1].strip()}")
    return len(mutants), killed, survived


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", choices=list(MODULES), action="append", help="module to check (repeatable)")
    parser.add_argument("--max-mutants", type=int, default=None, help="seeded random subset of at most N per module")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-mutants subset")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per test run; longer counts as killed")
    args = parser.parse_args(argv)
    names = [n for n in MODULES if n in (args.module or MODULES)]
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        copy, probe_dir = Path(tmp) / "repo", Path(tmp) / "probe"
        copy_repo(copy)
        probe_dir.mkdir()
        (probe_dir / "mutation_probe.py").write_text(PROBE)
        totals = [
            check_module(n, copy, probe_dir, max_mutants=args.max_mutants, seed=args.seed, timeout_s=args.timeout)
            for n in names
        ]
    print("summary:")
    for n, (count, killed, survived) in zip(names, totals, strict=True):
        print(f"  {n}: {killed}/{count} killed, {len(survived)} survived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
