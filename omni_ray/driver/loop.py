"""The driver: a single controller that runs the round loop and holds no model (verl's single-controller style).

A round is a list of named stages, each timed into the round's record:

    sample (generate -> score -> pair, or read the offline set) -> pop -> train -> sync -> eval -> checkpoint

`pipeline.mode=async` samples round r+1 while round r trains: its generate calls are submitted before the round's
weight push (Ray runs an actor's calls in order, so they see the policy version they ask for), and a thread
finishes scoring and pairing. If a rollout worker dies during that prefetch, the prefetch gives up and the round
is sampled again, on-policy, once the worker is restored: every sample records the version it was drawn from.
Outputs go to `runs/<run_name>/` (config.yaml, metrics.jsonl, summary.json, checkpoints/, rounds/).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray

from omni_ray.config import OmniRayConfig
from omni_ray.data import Prompt
from omni_ray.data.rounds import RoundPrompts
from omni_ray.driver.calls import CallFailed, FaultLog, RetryPolicy, call_stateless, gather, wait_restarted
from omni_ray.driver.cluster import actor_env, ensure_model, init_ray
from omni_ray.driver.record import RoundRecord
from omni_ray.driver.roles import Roles, start_roles
from omni_ray.driver.run_dir import DriverState, RunDir
from omni_ray.evaluate import eval_metrics
from omni_ray.learner.group import LearnerGroupError
from omni_ray.learner.worker import RoundData
from omni_ray.pairs import Pair, build_pairs, scored_samples
from omni_ray.pop import PopItems
from omni_ray.tracking import Tracker, busy_between, read_records, write_json

TRAINING_MEANS = ("loss", "w_qual", "w_perf", "margin", "accuracy", "grad_norm", "nll_mask")


@dataclass
class SampledRound:
    """A round's pairs and the record its sampling began (the round's record from then on)."""

    pairs: list[Pair]
    record: RoundRecord


class Driver:
    def __init__(self, cfg: OmniRayConfig):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.run_dir = RunDir(cfg)
        self.resume_from = self.run_dir.prepare()
        self.model_path = ensure_model(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=cfg.model.trust_remote_code)
        self.prompts = RoundPrompts(cfg, self.tokenizer)
        self.eval_set = self.prompts.eval()
        resumed = self.resume_from[1] if self.resume_from else None
        self.tracker = Tracker(self.run_dir.path, cfg.logging, asdict(cfg), cfg.run.name,
                               resumed.wandb_run_id if resumed else None)  # fmt: skip
        self.faults = FaultLog()
        self.policy_version = 0
        self.global_step = 0
        self.initial_eval: dict | None = None
        self.roles: Roles | None = None
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omni-ray-prefetch")
        self._prefetched: Future | None = None
        self._busy_seen: list[dict[str, float]] | None = None
        self.policies = {
            "rollout": RetryPolicy(cfg.rollout.timeout_s, cfg.rollout.max_retries),
            "scorer": RetryPolicy(cfg.scoring.timeout_s, cfg.scoring.max_retries),
            "pop": RetryPolicy(cfg.pop.timeout_s, cfg.pop.max_retries),
        }

    def start_roles(self) -> Roles:
        self.roles = start_roles(self.cfg, self.model_path, self.run_dir.path, actor_env(), faults=self.faults)
        return self.roles

    # ---------------------------------------------------------------------------------------------------------------
    # calls to the roles, each with its role's timeout and retries (driver/calls.py)

    def _submit_generate(self, prompts: list[Prompt], *, n: int, temperature: float, seed: int, version: int):
        """Prompts split over the rollout workers; returns (call(j), submitted refs)."""
        rc, workers = self.cfg.rollout, self.roles.rollout
        shards = np.array_split(np.arange(len(prompts)), len(workers))

        def call(j: int) -> ray.ObjectRef:
            return workers[j].generate.remote([list(prompts[i].token_ids) for i in shards[j]], n=n,
                                              temperature=temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens,
                                              seed=seed + j, expect_version=version)  # fmt: skip

        return call, [call(j) for j in range(len(workers))]

    def generate(self, prompts: list[Prompt], *, n: int, temperature: float, seed: int, version: int,
                 submitted: Any = None, retry: bool = True) -> list[list[Any]]:  # fmt: skip
        """n completions per prompt (token ids kept). A shard whose worker died, or came back from a restart with the
        model dir's weights, is retried once the worker holds the current policy again, so every prompt is answered
        by the version the round expects, or the round fails loudly after `rollout.max_retries`."""
        call, refs = submitted or self._submit_generate(prompts, n=n, temperature=temperature, seed=seed,
                                                        version=version)  # fmt: skip
        parts = gather("rollout", call, len(refs), policy=self.policies["rollout"], faults=self.faults,
                       restore=self._restore_rollout if retry else None, refs=refs)  # fmt: skip
        return [c for part in parts for c in part]

    def _restore_rollout(self, j: int) -> None:
        """After worker j failed: wait for Ray's restart, then give it the current policy if it lost it."""
        rc = self.cfg.rollout
        wait_restarted(self.roles.rollout[j], rc.timeout_s)
        info = ray.get(self.roles.rollout[j].ready.remote(), timeout=rc.timeout_s)
        if info["policy_version"] != self.policy_version:
            self.roles.sync.worker_restarted(j)
            self.roles.sync.push(self.policy_version, [j])

    def score(self, prompts: list[Prompt], responses: list[str]) -> Any:
        """Scores (and `correct`, where the scorers say) of responses, with each prompt row's reference and columns."""
        scorer = self.roles.scorer
        inputs = self.prompts.scoring_inputs(prompts)
        return call_stateless("scorer", scorer, lambda: scorer.score.remote([p.text for p in prompts], responses,
                                                                            **inputs),
                              policy=self.policies["scorer"], faults=self.faults)  # fmt: skip

    def evaluate(self) -> dict:
        """Greedy responses to the fixed held-out prompts, scored by the run's scorers (evaluate.eval_metrics)."""
        t0 = time.perf_counter()
        comps = self.generate(self.eval_set, n=1, temperature=0.0, seed=0, version=self.policy_version)
        result = eval_metrics(self.score(self.eval_set, [c[0].text for c in comps]))
        return {**result, "time_eval": time.perf_counter() - t0}

    # ---------------------------------------------------------------------------------------------------------------
    # stages

    def _stage(self, rec: RoundRecord, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.tracker.stage(rec.round, name)
        with rec.timed(name):
            return fn(*args)

    def _sample(self, r: int, version: int, submitted: Any = None, retry: bool = True) -> SampledRound:
        """Round r's pairs: sampled by policy `version` (online) or read from the dataset (offline)."""
        rec = RoundRecord(round=r + 1, policy_version_sampled=version)
        if self.cfg.data.source == "preferences":
            with rec.timed("generate"):
                return SampledRound(self._offline_pairs(rec), rec)
        cfg = self.cfg
        prompts, prompt_stats = submitted[0] if submitted else self.prompts.train(r)
        rec.sampling.update(prompt_stats)
        with rec.timed("generate"):
            comps = self.generate(prompts, n=cfg.rollout.samples_per_prompt, temperature=cfg.rollout.temperature,
                                  seed=self._sample_seed(r), version=version,
                                  submitted=submitted[1] if submitted else None, retry=retry)  # fmt: skip
        tokens = sum(len(c.token_ids) for cs in comps for c in cs)
        rec.sampling.update(generated_tokens=tokens, generate_tokens_per_s=tokens / max(rec.stage_seconds["generate"],
                                                                                           1e-9))  # fmt: skip
        with rec.timed("score"):
            flat = [(p, list(p.token_ids), c) for p, cs in zip(prompts, comps) for c in cs]
            res = self.score([p for p, _, _ in flat], [c.text for _, _, c in flat])
        samples = scored_samples(flat, res.scores, res.correct, policy_version=version)
        pairs, stats = build_pairs(samples, strategy=cfg.pairs.strategy, min_gap=cfg.pairs.min_gap,
                                   rng=np.random.default_rng([cfg.run.seed, 17, r]),
                                   good_threshold=cfg.pairs.good_threshold, swap_prob=cfg.pairs.swap_prob)  # fmt: skip
        finite = res.raw_scores[np.isfinite(res.raw_scores)]
        rec.sampling.update(
            reward_mean=float(finite.mean()) if finite.size else None,
            samples=len(samples),
            sample_accuracy=float(np.mean(res.correct)) if res.correct is not None else None,
            pairs_kept=stats.pairs,
            pairs_dropped=stats.prompts - stats.prompts_with_pairs,
            nonfinite=res.nonfinite,
            unparseable=res.unparseable,
        )
        rec.pair_counts = stats.as_dict()
        if cfg.run.dump_rollouts:
            self.run_dir.write_round_file(r + 1, "samples.jsonl", (asdict(s) for s in samples))
        return SampledRound(pairs, rec)

    def _sample_seed(self, r: int) -> int:
        return self.cfg.run.seed * 1_000_003 + r * 1009

    def _offline_pairs(self, rec: RoundRecord) -> list[Pair]:
        """The dataset reader that replaces sampling in offline mode; every round's record gets the set's counts."""
        pairs, sampling, data_counts = self._offline_set
        rec.sampling.update(sampling)
        rec.data_counts = dict(data_counts)
        return pairs

    @functools.cached_property
    def _offline_set(self) -> tuple[list[Pair], dict[str, Any], dict[str, int]]:
        """The fixed scored preference set, read and tokenized once per process (every round trains on all of it):
        its pairs, the round record's sampling counts and the reader's counts."""
        from omni_ray.data.preferences import load_preference_pairs, to_train_pairs

        d = self.cfg.data
        records, load_stats = load_preference_pairs(d.path, split=d.split, subset=d.subset, on_bad_row=d.on_bad_row)
        pairs, tok_stats = to_train_pairs(records, self.tokenizer, max_prompt_tokens=d.max_prompt_tokens,
                                          max_response_tokens=d.max_response_tokens,
                                          on_overlong=d.on_overlong)  # fmt: skip
        sampling = {"pairs_kept": len(pairs), "pairs_dropped": load_stats["rows"] - len(pairs),
                    "reward_mean": float(np.mean([p.score_chosen for p in pairs])) if pairs else None}  # fmt: skip
        return pairs, sampling, {k: v for k, v in {**load_stats, **tok_stats}.items() if isinstance(v, int)}

    def _start_prefetch(self, r: int) -> None:
        """Async mode: submit round r's generate calls now (before this round's weight push), finish it in a thread."""
        if self.cfg.pipeline.mode != "async" or r >= self.cfg.run.rounds:
            return
        version = self.policy_version
        prompts = self.prompts.train(r)
        submitted = (prompts, self._submit_generate(prompts[0], n=self.cfg.rollout.samples_per_prompt,
                                                    temperature=self.cfg.rollout.temperature,
                                                    seed=self._sample_seed(r), version=version))  # fmt: skip
        self._prefetched = self._prefetcher.submit(self._sample, r, version, submitted, False)

    def _sampled(self, r: int) -> SampledRound:
        """Round r's sampled pairs: the prefetched ones (async), else sampled now by the current policy."""
        future, self._prefetched = self._prefetched, None
        if future is not None:
            try:
                return future.result(timeout=self.cfg.rollout.timeout_s + self.cfg.scoring.timeout_s)
            except CallFailed as exc:
                print(f"[omni-ray] round {r + 1}: the prefetch lost a rollout worker ({exc}); sampling it again with "
                      f"policy version {self.policy_version}", flush=True)  # fmt: skip
                for j in range(len(self.roles.rollout)):
                    self._restore_rollout(j)
        return self._sample(r, self.policy_version)

    def pop_items(self, rec: RoundRecord, pairs: list[Pair], r: int) -> PopItems:
        """Round r's PoP training items for its pairs (every pair once without a PoP estimator); the estimator's counts
        go on the round's record."""
        pop = self.roles.pop
        if pop is None or not pairs:
            return PopItems.every_pair(len(pairs))
        texts = [(p.prompt, p.chosen, p.rejected) for p in pairs] if self.cfg.pop.labels == "judge" else None
        items, stats = call_stateless("pop", pop, lambda: pop.training_items.remote([p.gap for p in pairs], r, texts),
                                      policy=self.policies["pop"], faults=self.faults)  # fmt: skip
        rec.pop_counts = stats
        return items

    def _train(self, rec: RoundRecord, pairs: list[Pair], items: PopItems, r: int) -> dict:
        coloc = self.roles.colocation
        if coloc is not None:
            coloc.before_training()
        result = self.roles.learner.train_round(RoundData(pairs=pairs, items=items, round_index=r))
        self.global_step = result["global_step"]
        for step in result["steps"]:
            self.tracker.log("step", {"round": r + 1, **step}, step=step["step"])
        steps = result["steps"]
        rec.training = {k: float(np.mean([s[k] for s in steps])) for k in TRAINING_MEANS if steps and k in steps[0]}
        rec.busy_seconds.update(result["busy"])
        return result["pair_stats"]

    def _sync(self) -> None:
        coloc = self.roles.colocation
        self.policy_version += 1
        self.roles.sync.push(self.policy_version, before_load=coloc.before_load if coloc else None)
        if coloc is not None:
            coloc.after_load()

    def run_round(self, r: int) -> dict:
        """One round; a learner failure stops the run with the checkpoint to resume from named."""
        try:
            return self._run_round(r)
        except LearnerGroupError as exc:
            found = self.run_dir.newest_checkpoint()
            where = f"the newest good checkpoint is {found}" if found else "no checkpoint was written yet"
            raise LearnerGroupError(f"{exc}. The run stopped in round {r + 1}; {where}; rerun with run.resume=auto "
                                    "to continue") from exc  # fmt: skip

    def _run_round(self, r: int) -> dict:
        t0 = time.perf_counter()
        sampled = self._sampled(r)
        rec, pairs = sampled.record, sampled.pairs
        rec.policy_lag = self.policy_version - rec.policy_version_sampled
        self._start_prefetch(r + 1)
        items = self._stage(rec, "pop", self.pop_items, rec, pairs, r)
        if not len(items):
            print(f"[omni-ray] round {r + 1}: nothing to train on ({rec.drops() or 'no prompts'}); training skipped",
                  flush=True)  # fmt: skip
            rec.skipped = True
            rec.stage_seconds.update(train=0.0, sync=0.0)
            self.run_dir.write_round_file(r + 1, "pairs.jsonl", (p.to_record() for p in pairs))
        else:
            per_pair = self._stage(rec, "train", self._train, rec, pairs, items, r)
            records = [{**p.to_record(), "margin": per_pair.get(i, {}).get("margin")} for i, p in enumerate(pairs)]
            self.run_dir.write_round_file(r + 1, "pairs.jsonl", records)
            dists = {k: [st[k] for st in per_pair.values() if k in st] for k in ("w_qual", "w_perf", "margin")}
            self.tracker.log_distributions(dists, records, step=self.global_step)
            self._stage(rec, "sync", self._sync)
        ev = self._stage(rec, "eval", self.evaluate)
        rec.evaluation = {k: v for k, v in ev.items() if k != "time_eval" and k != "prompts"}
        rec.faults = self.faults.take()
        if self.cfg.run.save_checkpoints:
            self._stage(rec, "checkpoint", self._save_checkpoint, r + 1)
        rec.busy_seconds.update(self._actors_busy())
        rec.stage_seconds["round"] = time.perf_counter() - t0
        return rec.row()

    def _actors_busy(self) -> dict[str, float]:
        """Seconds per stage that the rollout workers (generate, sync), the scorer (score) and the PoP estimator
        (pop) were busy since the previous call, measured inside them (BusyClock; parallel rollout workers count as
        their slowest). The learner reports its own busy time with each round's result."""
        actors = self.roles.stateful_actors()
        now = ray.get([a.busy.remote() for a in actors], timeout=self.cfg.rollout.timeout_s)
        before, self._busy_seen = self._busy_seen or [{}] * len(now), now
        return busy_between(before, now)

    # ---------------------------------------------------------------------------------------------------------------
    # checkpoints and resume

    def _save_checkpoint(self, rounds_done: int) -> None:
        state = DriverState(
            round=rounds_done,
            policy_version=self.policy_version,
            global_step=self.global_step,
            seed=self.cfg.run.seed,
            prompts_per_round=self.cfg.data.prompts_per_round,
            wandb_run_id=self.tracker.wandb_run_id,
            initial_eval=self.initial_eval,
        )
        coloc = self.roles.colocation
        if coloc is not None:
            self.roles.learner.reload_states()
        self.run_dir.save_checkpoint(self.roles.learner, state)
        if coloc is not None:
            self.roles.learner.offload_states()

    def _restore(self, path: Any, state: DriverState) -> int:
        """Learner state from the checkpoint, its policy into the rollout workers; returns the rounds already done."""
        self.global_step = self.roles.learner.load_state(str(path / "learner"))
        self.policy_version = state.policy_version
        self.initial_eval = state.initial_eval
        if self.policy_version > 0:  # fresh workers hold the model dir's weights
            self.roles.sync.push(self.policy_version)
        print(f"[omni-ray] resumed from {path} (round {state.round} done, optimizer step {self.global_step})",
              flush=True)  # fmt: skip
        return state.round

    # ---------------------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        t_start = time.perf_counter()
        cfg = self.cfg
        if self.resume_from and self.resume_from[1].round >= cfg.run.rounds:
            done, self.initial_eval = self.resume_from[1].round, self.resume_from[1].initial_eval
            print(f"[omni-ray] {self.run_dir.path} has completed {done} of run.rounds={cfg.run.rounds} rounds: "
                  "nothing to train (raise run.rounds to continue it)", flush=True)  # fmt: skip
            return self._finish(t_start, 0.0)
        self.start_roles()
        startup = time.perf_counter() - t_start
        print(f"[omni-ray] roles up in {startup:.1f}s: {cfg.rollout.num_workers} rollout "
              f"({self.roles.rollout_backend}), scorer, {'PoP estimator, ' if self.roles.pop else ''}"
              f"{cfg.learner.num_workers} learner ranks (ZeRO-{cfg.learner.zero_stage})", flush=True)  # fmt: skip
        done = self._restore(*self.resume_from) if self.resume_from else 0
        if not self.resume_from:
            self.initial_eval = self.evaluate()
            self.tracker.log("eval", {"round": 0, **self.initial_eval})
            self.tracker.round_row(
                {
                    "round": 0,
                    **{f"eval_{k}": v for k, v in self.initial_eval.items() if k != "time_eval"},
                    "time_eval": self.initial_eval["time_eval"],
                }
            )
        self._actors_busy()  # round 1's busy times start here, after start-up and the initial eval
        self.tracker.start_progress(cfg.run.rounds, done)
        for r in range(done, cfg.run.rounds):
            row = self.run_round(r)
            self.tracker.log("round", row, step=self.global_step)
            self.tracker.round_row(row)
        return self._finish(t_start, startup)

    def _finish(self, t_start: float, startup_s: float) -> dict:
        summary = self._summary(time.perf_counter() - t_start, startup_s)
        write_json(self.run_dir.path / "summary.json", summary)
        self.tracker.log("summary", summary)
        return summary

    def _summary(self, wall_s: float, startup_s: float) -> dict:
        """From metrics.jsonl's round records, so a resumed run's summary covers the rounds of every process."""
        rows = read_records(self.run_dir.path / "metrics.jsonl", "round")

        def totals(prefix: str) -> dict[str, float]:
            keys = sorted({k for row in rows for k in row if k.startswith(prefix)})
            return {k[len(prefix) :]: float(sum(row.get(k) or 0.0 for row in rows)) for k in keys}

        last = rows[-1] if rows else None
        final = {k[5:]: v for k, v in last.items() if k.startswith("eval_")} if last else self.initial_eval
        return {
            "run_name": self.cfg.run.name,
            "rounds_completed": len(rows),
            "initial_eval": self.initial_eval,
            "final_eval": final,
            "wall_s": wall_s,
            "startup_s": startup_s,
            "stage_time_s": totals("time_"),
            "busy_s": totals("busy_"),
            "rollout_backend": self.roles.rollout_backend if self.roles else None,
            "loss": self.cfg.loss.name,
            "resumed_from": str(self.resume_from[0]) if self.resume_from else None,
        }

    def close(self) -> None:
        """Stop every role's actors and the sinks."""
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        if self.roles is not None:
            self.roles.close()
        self.tracker.close()


def train(cfg: OmniRayConfig) -> dict:
    """Run the config: refused before anything starts when its GPUs cannot hold it (omni_ray/plan.py)."""
    from omni_ray.plan import check_fits

    check_fits(cfg)
    init_ray(cfg)
    driver = Driver(cfg)
    try:
        return driver.run()
    finally:
        driver.close()
