"""What one round did, as a typed record; `row()` gives metrics.jsonl's field names, which tools and users read."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundRecord:
    """One round's numbers, by the stage that produced them.

    stage_seconds: wall time per named stage (`time_<stage>`); busy_seconds: time measured inside the actors
    (`busy_<stage>`); sampling: the sampled round's numbers (samples, tokens, rewards, prompt counts); pair_counts,
    pop_counts, data_counts: the counters of pairing, PoP and the offline reader (`pairs_*`, `pop_*`, `data_*`);
    training: the round's means of the learner's step metrics; evaluation: the held-out numbers (`eval_*`);
    faults: actor failures survived (`faults_<role>`).
    """

    round: int
    policy_version_sampled: int = 0
    policy_lag: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    busy_seconds: dict[str, float] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    pair_counts: dict[str, int] = field(default_factory=dict)
    pop_counts: dict[str, int] = field(default_factory=dict)
    data_counts: dict[str, int] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    skipped: bool = False

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the block's wall time to `stage`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0

    def drops(self) -> dict[str, int]:
        """Everything every stage dropped or could not use, by name (what a round that trains on nothing says)."""
        named = {
            **{f"prompts_{k}": v for k, v in self.sampling.items() if k in ("skipped", "truncated")},
            **{f"scores_{k}": self.sampling[k] for k in ("nonfinite", "unparseable") if k in self.sampling},
            **{f"pairs_{k}": v for k, v in self.pair_counts.items() if k.startswith("dropped")},
            **{f"data_{k}": v for k, v in self.data_counts.items() if k not in ("rows",)},
            **{f"pop_{k}": v for k, v in self.pop_counts.items() if k in ("ties", "uncompared", "judge_no_label")},
        }
        return {k: v for k, v in named.items() if v}

    def row(self) -> dict[str, Any]:
        """The flat metrics.jsonl line."""
        sampling = dict(self.sampling)
        prompt_counts = {f"prompts_{k}": sampling.pop(k) for k in ("truncated", "skipped") if k in sampling}
        score_counts = {f"{k}_scores": sampling.pop(k) for k in ("nonfinite", "unparseable") if k in sampling}
        return {
            "round": self.round,
            "policy_version_sampled": self.policy_version_sampled,
            "policy_lag": self.policy_lag,
            **sampling,
            **prompt_counts,
            **score_counts,
            **{f"pairs_{k}": v for k, v in self.pair_counts.items()},
            **{f"data_{k}": v for k, v in self.data_counts.items()},
            **{f"pop_{k}": v for k, v in self.pop_counts.items()},
            **self.training,
            **{f"eval_{k}": v for k, v in self.evaluation.items()},
            **{f"faults_{k}": v for k, v in self.faults.items()},
            **({"skipped": True} if self.skipped else {}),
            **{f"time_{k}": v for k, v in self.stage_seconds.items()},
            **{f"busy_{k}": v for k, v in self.busy_seconds.items()},
        }
