"""Fault-tolerant calls to role actors: per-role timeouts and retries, and the count of faults survived.

Rollout, scoring and PoP actors are started with Ray `max_restarts`; a call whose actor died is retried once Ray has
restarted it (after `restore` puts back what the actor lost, e.g. a rollout worker's policy), at most
`max_retries` times per call. Anything else (a bug, bad input) raises at once. Every wait has a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from omni_ray.rollout.worker import StaleWeightsError


@dataclass(frozen=True)
class RetryPolicy:
    """How long one role's calls may take, and how often a call whose actor died is retried."""

    timeout_s: float
    max_retries: int


class FaultLog:
    """Actor failures survived per role since the last `take()` (a round row's `faults_<role>`). The main thread
    and the async prefetch thread both record into it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, role: str) -> None:
        with self._lock:
            self._counts[role] = self._counts.get(role, 0) + 1

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts


def wait_restarted(actor: Any, timeout_s: float) -> None:
    """Block until Ray has restarted `actor` (calls fail fast with ActorUnavailableError while it restarts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.0, deadline - time.monotonic()))
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class CallFailed(RuntimeError):
    """A call's actor failed and no retry was allowed (the async prefetch gives its round back instead)."""


def gather(
    role: str,
    call: Callable[[int], ray.ObjectRef],
    count: int,
    *,
    policy: RetryPolicy,
    faults: FaultLog,
    restore: Callable[[int], None] | None,
    refs: Sequence[ray.ObjectRef] | None = None,
) -> list[Any]:
    """Results of `call(0..count-1)` (or of the already submitted `refs`). A call that fails because its actor died
    or lost its weights is retried after `restore(j)`, at most `policy.max_retries` times; with `restore=None` such
    a failure raises `CallFailed` at once."""
    pending = dict(enumerate(refs)) if refs is not None else {j: call(j) for j in range(count)}
    results: dict[int, Any] = {}
    failures = dict.fromkeys(pending, 0)
    deadline = time.monotonic() + policy.timeout_s
    while pending:
        ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"{role}: calls {sorted(pending)} did not finish within {policy.timeout_s:.0f} s")
        j = next(k for k, ref in pending.items() if ref == ready[0])
        try:
            results[j] = ray.get(pending.pop(j))
        except (ray.exceptions.RayActorError, StaleWeightsError) as exc:
            faults.add(role)
            failures[j] += 1
            if restore is None:
                raise CallFailed(f"{role} call {j} failed ({type(exc).__name__})") from exc
            if failures[j] > policy.max_retries:
                raise RuntimeError(f"{role} call {j} failed {failures[j]} times; last error: {exc}") from exc
            print(f"[omni-ray] {role} actor {j} failed ({type(exc).__name__}); retry {failures[j]}/"
                  f"{policy.max_retries}", flush=True)  # fmt: skip
            restore(j)
            pending[j] = call(j)
    return [results[j] for j in range(len(results))]


def call_stateless(role: str, actor: Any, submit: Callable[[], ray.ObjectRef], *, policy: RetryPolicy,
                   faults: FaultLog) -> Any:  # fmt: skip
    """One call to a stateless actor (scorer, PoP estimator): after a death it is retried once Ray has restarted it
    (nothing to restore)."""
    (result,) = gather(role, lambda _j: submit(), 1, policy=policy, faults=faults,
                       restore=lambda _j: wait_restarted(actor, policy.timeout_s))  # fmt: skip
    return result
