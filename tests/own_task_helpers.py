"""The own task of examples/own_task/ at test sizes: shared by its test (test_own_task.py) and the `ray job submit` test
(test_cluster.py)."""

from __future__ import annotations

from pathlib import Path

VERIFIER = "examples.own_task.my_verifier"


def python_scorer(function: str, *extra: str) -> str:
    fields = ", ".join([f'target: "{VERIFIER}:{function}"', "scale_low: 0", "scale_high: 1", *extra])
    return f"scoring.scorers=[{{type: python, {fields}}}]"


def own_task_overrides(problems: Path, out: Path, name: str, model_dir: str, *extra: str) -> list[str]:
    """What the example's README runs, at test sizes."""
    return [
        "data.source=prompts",
        f"data.path={problems}",
        "data.prompt_column=question",
        "data.answer_column=answer",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"model.path={model_dir}",
        "data.eval_prompts=200",
        *extra,
    ]
