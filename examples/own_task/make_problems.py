"""Write the own-task example's prompt file: one JSON object per line, ``{"question": "17+25=", "answer": "42"}``.

    python examples/own_task/make_problems.py [OUT] [--rows 3000] [--seed 0] [--max-operand 99]

Distinct addition problems ``a+b=`` with a, b in 0..max_operand, drawn without replacement by the seed, so the same
arguments write the same file. Written with the characters the tiny model's tokenizer knows (digits, ``+``, ``=``);
the answer is a separate column, read by ``data.answer_column=answer`` and handed to the verifier as ``references``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def write_problems(out: str | Path, *, rows: int = 3000, seed: int = 0, max_operand: int = 99) -> Path:
    """Write ``rows`` distinct problems to ``out`` (parent dirs created); returns the path."""
    n = (max_operand + 1) ** 2
    if not 0 < rows <= n:
        raise ValueError(f"rows must be in 1..{n} (the distinct problems with operands 0..{max_operand}), got {rows}")
    codes = np.random.default_rng(seed).choice(n, size=rows, replace=False)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for code in codes:
            a, b = divmod(int(code), max_operand + 1)
            f.write(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/own_task/problems.jsonl", help="the jsonl file to write")
    parser.add_argument("--rows", type=int, default=3000, help="distinct problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=99, help="operands are drawn from 0..max_operand")
    args = parser.parse_args(argv)
    path = write_problems(args.out, rows=args.rows, seed=args.seed, max_operand=args.max_operand)
    print(f"wrote {args.rows} problems to {path}")


if __name__ == "__main__":
    main()
