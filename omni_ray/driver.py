"""The driver: a single controller that runs the round loop and holds no model (verl's single-controller style).

    prompts -> generate (rollout workers) -> score (scoring actor) -> pairs -> PoP items (estimator actor)
            -> train (learner group) -> sync weights (learner -> rollout) -> eval -> checkpoint

Every role is a Ray actor wrapping a plain class; every remote wait has a timeout that raises. Rollout, scoring and
PoP actors that die are restarted by Ray (`max_restarts`) and their in-flight batch is retried, a bounded number of
times; a dead learner rank stops the run (a collective cannot lose a member) with the newest checkpoint named for
`run.resume=auto`. Outputs go to `runs/<run_name>/` (config.yaml, metrics.jsonl, summary.json, checkpoints/, rounds/).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray

from omni_ray import checkpoint
from omni_ray.config import OmniRayConfig, to_yaml
from omni_ray.data import Prompt
from omni_ray.data.arith import ArithTask
from omni_ray.data.prompts import PromptDataset
from omni_ray.learner.group import LearnerGroup, LearnerGroupError
from omni_ray.learner.objective import POP_LOSSES
from omni_ray.learner.worker import RoundData, TrainPair
from omni_ray.models.tiny import encode_prompt
from omni_ray.pairs import Pair, build_pairs, scored_samples
from omni_ray.placement import (
    ColocatedLearner,
    Colocation,
    actor_options,
    create_placement_groups,
    plan_placement,
    rollout_backend_options,
)
from omni_ray.pop import PopEstimator
from omni_ray.rollout.worker import RolloutWorker, StaleWeightsError
from omni_ray.scoring import ScoringService
from omni_ray.tracking import Tracker, busy_between, read_records
from omni_ray.weight_sync import BroadcastWeightSync, push_weights


def init_ray(cfg: OmniRayConfig) -> None:
    """Join the cluster of a `ray job submit` job (RAY_ADDRESS is set) or `ray.address`; else start a local one.

    Resources are declared only when starting a local cluster: an entrypoint that passes them to an existing
    cluster fails under `ray job submit`.
    """
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or None, include_dashboard=False, log_to_driver=True)


QUIET_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
# On CPU, oneDNN compiles and caches a kernel per tensor shape (1024 by default, never freed). Every generate call
# brings new batch shapes, so a rollout worker's RSS grew ~430 MiB over its first 160 calls on the tiny model, most
# of it in the first 20 rounds (docs/benchmarks.md, memory). 64 entries hold it flat after ~40 calls at the same
# speed; a value set in the driver's environment wins.
MEMORY_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}


def actor_env() -> dict[str, str]:
    """Environment every role's actor needs, passed explicitly (actors do not inherit the driver's env on a cluster)."""
    keys = (
        "DS_ACCELERATOR",
        "TORCH_EXTENSIONS_DIR",
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_CPU_OMP_THREADS_BIND",
        "OMP_NUM_THREADS",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "WANDB_MODE",
    )
    env = {k: os.environ[k] for k in keys if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Quiet actors: one table row per round is the signal; engine chatter (vLLM INFO lines, weight-loading bars)
    # would bury it, in a terminal and in job logs alike. Errors and warnings still come through.
    for k, v in {**QUIET_ENV, **MEMORY_ENV}.items():
        env.setdefault(k, os.environ.get(k, v))
    return env


def ensure_model(cfg: OmniRayConfig) -> str:
    """The policy dir; built by make-tiny (deterministic from the seed) when missing and allowed."""
    path = Path(cfg.model.path)
    if (path / "config.json").is_file():
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"model.path={path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
        return str(path)
    if not cfg.model.build_tiny_if_missing:
        raise FileNotFoundError(
            f"model.path={path} is not a model dir (no config.json) and build_tiny_if_missing is false"
        )
    from omni_ray.models.tiny import make_tiny

    print(f"[omni-ray] building the tiny model at {path} (seed {cfg.run.seed}) ...", flush=True)
    t = cfg.model.tiny
    make_tiny(
        path,
        seed=cfg.run.seed,
        max_operand=cfg.data.max_operand,
        eval_prompts=cfg.data.eval_prompts,
        hidden_size=t.hidden_size,
        num_layers=t.num_layers,
        num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        sft_steps=t.sft_steps,
        sft_lr=t.sft_lr,
        sft_batch_size=t.sft_batch_size,
    )
    return str(path)


class Driver:
    def __init__(self, cfg: OmniRayConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resume_from = _find_resume_point(cfg, self.run_dir) if cfg.run.resume == "auto" else None
        if self.resume_from is None:
            _set_aside_previous_run(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.model_path = ensure_model(cfg)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.task = self._prompt_source()
        self.eval_set, self.eval_ids, _ = self._encode(self.task.eval_prompts())
        resumed_meta = self.resume_from[1] if self.resume_from else {}
        self.tracker = Tracker(
            self.run_dir, cfg.logging, _public_config(cfg), cfg.run.name, resumed_meta.get("wandb_run_id")
        )
        self.policy_version = 0
        self.global_step = 0
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omni-ray-prefetch")
        self._prefetched: Future | None = None  # async mode: the next round's (pairs, metrics) being produced
        self.initial_eval: dict | None = None  # round-0 eval (run() sets it; checkpoints carry it for resume)
        self.fault_counts: dict[str, int] = {}  # actor failures survived, per role (a round row's `faults_*`)
        self._busy_seen: list[dict[str, float]] | None = None  # the actors' BusyClock totals at the last read

    def _prompt_source(self) -> ArithTask | PromptDataset:
        """Where prompts come from: the built-in arith task, or a prompt dataset (`data.source=prompts`). Offline
        preference runs keep the arith eval set, so a tiny offline run still reports task accuracy."""
        d = self.cfg.data
        if d.source != "prompts":
            return ArithTask(max_operand=d.max_operand, seed=self.cfg.run.seed, eval_size=d.eval_prompts)
        tok = self.tokenizer
        template = (
            (lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
            if getattr(tok, "chat_template", None)
            else None
        )
        return PromptDataset.from_config(d, seed=self.cfg.run.seed, chat_template=template)

    def _encode(self, prompts: list[Prompt]) -> tuple[list[Prompt], list[list[int]], dict[str, int]]:
        """Token ids per prompt; prompts longer than data.max_prompt_tokens are cut to their last tokens (where a chat
        template puts the generation cue) or skipped, per data.on_overlong, and counted."""
        d = self.cfg.data
        kept, ids, stats = [], [], {"prompts_truncated": 0, "prompts_skipped": 0}
        for p in prompts:
            tokens = encode_prompt(self.tokenizer, p.text)
            if len(tokens) > d.max_prompt_tokens:
                if d.on_overlong == "skip":
                    stats["prompts_skipped"] += 1
                    continue
                stats["prompts_truncated"] += 1
                tokens = tokens[-d.max_prompt_tokens :]
            kept.append(p)
            ids.append(tokens)
        return kept, ids, stats

    # ---------------------------------------------------------------------------------------------------------------
    # roles

    def start_roles(self) -> None:
        cfg, env = self.cfg, actor_env()
        rc = cfg.rollout
        # Placement (omni_ray/placement.py): CPU runs get no placement groups and the same plain resource requests
        # as always; GPU runs get placement groups (engines' TP bundles, learner ranks, or one colocated group).
        plan = plan_placement(cfg)
        self.placement_groups = create_placement_groups(plan, cfg.placement.timeout_s)
        self.rollout = [
            ray.remote(RolloutWorker)
            .options(**actor_options(slot, self.placement_groups, env), max_restarts=rc.max_retries)
            .remote(
                self.model_path,
                backend=rc.backend,
                seed=cfg.run.seed + i,
                dtype=cfg.model.dtype,
                max_model_len=rc.max_model_len or cfg.model.tiny.max_position_embeddings,
                trust_remote_code=cfg.model.trust_remote_code,
                **rollout_backend_options(cfg, plan),
            )
            for i, slot in enumerate(plan.rollout)
        ]
        scoring_gpus = cfg.placement.scoring_num_gpus
        self.scorer = (
            ray.remote(ScoringService)
            .options(
                num_cpus=cfg.scoring.num_cpus,
                num_gpus=scoring_gpus,
                runtime_env={"env_vars": env},
                max_restarts=cfg.scoring.max_retries,
            )
            .remote(
                list(cfg.scoring.scorers),
                cfg.scoring.rescale,
                cfg.scoring.rescale_low,
                cfg.scoring.rescale_high,
                **({"device": "cuda"} if scoring_gpus > 0 else {}),
            )
        )
        self.uses_pop = cfg.loss.name in POP_LOSSES
        p = cfg.pop
        self.pop = (
            ray.remote(PopEstimator)
            .options(num_cpus=p.num_cpus, runtime_env={"env_vars": env}, max_restarts=cfg.scoring.max_retries)
            .remote(**PopEstimator.kwargs_from_config(p, seed=cfg.run.seed,
                                                      trust_remote_code=cfg.model.trust_remote_code))
            if self.uses_pop
            else None
        )  # fmt: skip
        learner = LearnerGroup(cfg, self.model_path, env, placement=(plan.learner, self.placement_groups))
        # Colocated: the engines sleep while the learner trains on their GPUs (ColocatedLearner.train_round) and
        # wake around the weight sync (weights first, then the KV cache; see run_round's push_weights call).
        self.colocation = (
            Colocation(self.rollout, level=cfg.placement.sleep_level, timeout_s=rc.timeout_s)
            if plan.colocated
            else None
        )
        self.learner = learner if self.colocation is None else ColocatedLearner(learner, self.colocation)
        info = ray.get([w.ready.remote() for w in self.rollout], timeout=rc.timeout_s)
        self.rollout_backend = info[0]["backend"]
        self.weight_broadcast: BroadcastWeightSync | None = None
        if cfg.sync.strategy == "nccl":  # one process group for the whole run, opened once
            self.weight_broadcast = BroadcastWeightSync(
                learner.workers,
                self.rollout,
                tensor_parallel_size=plan.tensor_parallel_size,
                backend=cfg.sync.collective_backend,
                bucket_mb=cfg.sync.bucket_mb,
                timeout_s=cfg.sync.timeout_s,
            )
            self.weight_broadcast.open()

    # ---------------------------------------------------------------------------------------------------------------
    # stages

    def _generate(
        self, ids: list[list[int]], *, n: int, temperature: float, seed: int, version: int
    ) -> list[list[Any]]:
        """Prompt token ids split over the rollout workers; per prompt, n completions (token ids kept).

        A shard whose worker dies (or comes back from a restart with the model dir's weights) is retried on the same
        worker once Ray has restarted it and the current policy is pushed to it again: every prompt is answered by the
        policy version the round expects, or the round fails loudly after `rollout.max_retries`.
        """
        shards = np.array_split(np.arange(len(ids)), len(self.rollout))
        rc = self.cfg.rollout

        def call(j: int) -> ray.ObjectRef:
            return self.rollout[j].generate.remote(
                [ids[i] for i in shards[j]],
                n=n,
                temperature=temperature,
                top_p=rc.top_p,
                max_new_tokens=rc.max_new_tokens,
                seed=seed + j,
                expect_version=version,
            )

        parts = self._get_with_retries(
            "rollout", call, len(shards), self._restore_rollout, timeout_s=rc.timeout_s, max_retries=rc.max_retries
        )
        return [c for part in parts for c in part]

    def _restore_rollout(self, j: int) -> None:
        """After worker j failed: wait for Ray's restart, then give it the current policy if it lost it."""
        rc = self.cfg.rollout
        _wait_restarted(self.rollout[j], rc.timeout_s)
        info = ray.get(self.rollout[j].ready.remote(), timeout=rc.timeout_s)
        if info["policy_version"] != self.policy_version:
            # The learner holds the current policy; one worker gets it again through the object store (whatever
            # sync.strategy is: a restarted engine is not a member of the NCCL group the others share).
            push_weights([self.rollout[j]], self.learner.export_weights_ref(), version=self.policy_version,
                         timeout_s=self.cfg.sync.timeout_s)  # fmt: skip

    def _get_with_retries(
        self,
        role: str,
        call: Callable[[int], ray.ObjectRef],
        count: int,
        restore: Callable[[int], None],
        *,
        timeout_s: float,
        max_retries: int,
    ) -> list[Any]:
        """Results of `call(0..count-1)`; a call that fails because its actor died or lost its weights is retried
        after `restore(j)`, at most `max_retries` times per call. Anything else (a bug, bad input) raises at once."""
        refs = {j: call(j) for j in range(count)}
        results: dict[int, Any] = {}
        failures = dict.fromkeys(refs, 0)
        deadline = time.monotonic() + timeout_s
        while refs:
            ready, _ = ray.wait(list(refs.values()), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"{role}: calls {sorted(refs)} did not finish within {timeout_s:.0f} s")
            j = next(k for k, ref in refs.items() if ref == ready[0])
            try:
                results[j] = ray.get(refs.pop(j))
            except (ray.exceptions.RayActorError, StaleWeightsError) as exc:
                failures[j] += 1
                self.fault_counts[role] = self.fault_counts.get(role, 0) + 1
                if failures[j] > max_retries:
                    raise RuntimeError(f"{role} call {j} failed {failures[j]} times; last error: {exc}") from exc
                print(f"[omni-ray] {role} actor {j} failed ({type(exc).__name__}); retry {failures[j]}/{max_retries}",
                      flush=True)  # fmt: skip
                restore(j)
                refs[j] = call(j)
        return [results[j] for j in range(count)]

    def _call_stateless(self, role: str, actor: Any, submit: Callable[[], ray.ObjectRef]) -> Any:
        """One call to a stateless actor (scorer, PoP estimator): if the actor dies, the call is retried once Ray has
        restarted it (nothing to restore), at most `scoring.max_retries` times."""
        sc = self.cfg.scoring
        (result,) = self._get_with_retries(
            role,
            lambda _j: submit(),
            1,
            lambda _j: _wait_restarted(actor, sc.timeout_s),
            timeout_s=sc.timeout_s,
            max_retries=sc.max_retries,
        )
        return result

    def _score(self, prompts: list[str], responses: list[str], references: list[str | None] | None = None):
        """Scores (and `correct`, for verifiers) of responses; references are the prompts' reference answers."""
        return self._call_stateless(
            "scorer", self.scorer, lambda: self.scorer.score.remote(prompts, responses, references)
        )

    def evaluate(self) -> dict:
        """Greedy accuracy on the fixed held-out prompts."""
        t0 = time.perf_counter()
        comps = self._generate(self.eval_ids, n=1, temperature=0.0, seed=0, version=self.policy_version)
        res = self._score([p.text for p in self.eval_set], [c[0].text for c in comps],
                          [p.reference for p in self.eval_set])  # fmt: skip
        acc = float(np.mean(res.correct)) if res.correct is not None else math.nan
        return {
            "accuracy": acc,
            "reward_mean": float(np.nanmean(res.raw_scores)),
            "prompts": len(self.eval_set),
            "time_eval": time.perf_counter() - t0,
        }

    def run_round(self, r: int) -> dict:
        """One round; a learner failure stops the run with the checkpoint to resume from named."""
        try:
            return self._run_round(r)
        except LearnerGroupError as exc:
            found = checkpoint.latest_good(self.ckpt_root, log=lambda _m: None)
            where = f"the newest good checkpoint is {found[0]}" if found else "no checkpoint was written yet"
            raise LearnerGroupError(f"{exc}. The run stopped in round {r + 1}; {where}; rerun with run.resume=auto "
                                    "to continue") from exc  # fmt: skip

    def _round_pairs(self, r: int, version: int) -> tuple[list[Pair], dict[str, Any]]:
        """Round r's pairs and their metrics: sampled by policy `version` (online) or read from the dataset."""
        row: dict[str, Any] = {}
        if self.cfg.data.source == "preferences":
            return self._offline_pairs(row), row
        return self._online_pairs(r, row, version), row

    def _run_round(self, r: int) -> dict:
        cfg = self.cfg
        row: dict[str, Any] = {"round": r + 1}
        t_round = time.perf_counter()
        self.tracker.stage(r + 1, "generate + score")
        if self._prefetched is not None:  # async: sampled and scored while the previous round trained
            pairs, part = self._prefetched.result(timeout=cfg.rollout.timeout_s + cfg.scoring.timeout_s)
            self._prefetched = None
        else:
            pairs, part = self._round_pairs(r, self.policy_version)
        row.update(part)
        row["policy_lag"] = self.policy_version - part.get("policy_version_sampled", self.policy_version)
        if cfg.pipeline.mode == "async" and r + 1 < cfg.run.rounds:
            # One policy version off: round r+1 samples from the weights round r trains from; the rollout actors run
            # those calls first, then the weight load this round ends with (Ray runs an actor's calls in order).
            self._prefetched = self._prefetcher.submit(self._round_pairs, r + 1, self.policy_version)

        t0 = time.perf_counter()
        self.tracker.stage(r + 1, "PoP")
        if self.pop is not None and pairs:
            texts = [(p.prompt, p.chosen, p.rejected) for p in pairs] if cfg.pop.labels == "judge" else None
            items, pop_stats = self._call_stateless(
                "pop", self.pop, lambda: self.pop.training_items.remote([p.gap for p in pairs], r, texts)
            )
            row.update({f"pop_{k}": v for k, v in pop_stats.items()})
        else:
            items = [(i, -1, math.nan) for i in range(len(pairs))]
        row["time_pop"] = time.perf_counter() - t0

        if not items:
            dropped = {k: v for k, v in row.items() if k.startswith(("pairs_dropped", "data_"))}
            print(f"[omni-ray] round {r + 1}: no usable pairs ({dropped}); training skipped", flush=True)
            row.update(skipped=True, time_train=0.0, time_sync=0.0)
            self._write_pairs(r, pairs, {})
        else:
            t0 = time.perf_counter()
            self.tracker.stage(r + 1, f"train ({len(items)} pairs)")
            result = self.learner.train_round(
                RoundData(pairs=[_train_pair(p) for p in pairs], items=items, round_index=r)
            )
            row["time_train"] = time.perf_counter() - t0
            self.global_step = result["global_step"]
            for step in result["steps"]:
                self.tracker.log("step", {"round": r + 1, **step}, step=step["step"])
            row.update(_round_means(result["steps"]))
            row.update({f"busy_{k}": v for k, v in result["busy"].items()})
            per_pair = result["pair_stats"]
            records = self._write_pairs(r, pairs, {i: st["margin"] for i, st in per_pair.items()})
            dists = {k: [st[k] for st in per_pair.values() if k in st] for k in ("w_qual", "w_perf", "margin")}
            self.tracker.log_distributions(dists, records, step=self.global_step)

            t0 = time.perf_counter()
            self.tracker.stage(r + 1, "weight sync")
            self.policy_version += 1
            if self.colocation is not None:
                self.colocation.wake(["weights"])
            push_weights(
                self.rollout,
                self.weight_broadcast or self.learner.export_weights_ref(),
                version=self.policy_version,
                timeout_s=cfg.sync.timeout_s,
                strategy=cfg.sync.strategy,
                disk_dir=str(self.run_dir / "weights"),
            )
            if self.colocation is not None:
                self.colocation.wake(["kv_cache"])
            row["time_sync"] = time.perf_counter() - t0

        self.tracker.stage(r + 1, "eval")
        ev = self.evaluate()
        row.update(eval_accuracy=ev["accuracy"], eval_reward_mean=ev["reward_mean"], time_eval=ev["time_eval"])
        if self.fault_counts:
            row.update({f"faults_{k}": v for k, v in self.fault_counts.items()})
            self.fault_counts = {}
        if cfg.run.save_checkpoints:
            t0 = time.perf_counter()
            self.tracker.stage(r + 1, "checkpoint")
            self._save_checkpoint(r + 1)
            row["time_checkpoint"] = time.perf_counter() - t0
        row.update({f"busy_{k}": v for k, v in self._actors_busy().items()})
        row["time_round"] = time.perf_counter() - t_round
        return row

    def _actors_busy(self) -> dict[str, float]:
        """Seconds per stage that the rollout workers (generate, sync), the scorer (score) and the PoP estimator
        (pop) were busy since the previous call, measured inside them (BusyClock; parallel rollout workers count as
        their slowest). The learner reports its own busy time with each round's result."""
        actors = [*self.rollout, self.scorer, *([self.pop] if self.pop is not None else [])]
        now = ray.get([a.busy.remote() for a in actors], timeout=self.cfg.rollout.timeout_s)
        before, self._busy_seen = self._busy_seen or [{}] * len(now), now
        return busy_between(before, now)

    def _online_pairs(self, r: int, row: dict, version: int) -> list[Pair]:
        """Generate -> score -> pair: round r's preference pairs from policy `version` (the current one in sync mode,
        the previous one in async mode)."""
        cfg = self.cfg
        row["policy_version_sampled"] = version
        prompts, ids, prompt_stats = self._encode(self.task.train_prompts(r, cfg.data.prompts_per_round))
        row.update(prompt_stats)

        t0 = time.perf_counter()
        comps = self._generate(
            ids,
            n=cfg.rollout.samples_per_prompt,
            temperature=cfg.rollout.temperature,
            seed=cfg.run.seed * 1_000_003 + r * 1009,
            version=version,
        )
        row["time_generate"] = time.perf_counter() - t0
        row["generated_tokens"] = sum(len(c.token_ids) for cs in comps for c in cs)
        row["generate_tokens_per_s"] = row["generated_tokens"] / max(row["time_generate"], 1e-9)

        t0 = time.perf_counter()
        flat = [(p, i, c) for p, i, cs in zip(prompts, ids, comps) for c in cs]
        res = self._score([p.text for p, _, _ in flat], [c.text for _, _, c in flat], [p.reference for p, _, _ in flat])
        row["time_score"] = time.perf_counter() - t0
        samples = scored_samples(flat, res.scores, res.correct, policy_version=version)
        rng = np.random.default_rng([cfg.run.seed, 17, r])
        pairs, pstats = build_pairs(
            samples,
            strategy=cfg.pairs.strategy,
            min_gap=cfg.pairs.min_gap,
            rng=rng,
            good_threshold=cfg.pairs.good_threshold,
            swap_prob=cfg.pairs.swap_prob,
        )
        finite = res.raw_scores[np.isfinite(res.raw_scores)]
        row.update(
            reward_mean=float(finite.mean()) if finite.size else math.nan,
            samples=len(samples),
            sample_accuracy=float(np.mean(res.correct)) if res.correct is not None else math.nan,
            pairs_kept=pstats.pairs,
            pairs_dropped=pstats.prompts - pstats.prompts_with_pairs,
            nonfinite_scores=res.nonfinite,
            unparseable_scores=res.unparseable,
            **{f"pairs_{k}": v for k, v in pstats.as_dict().items()},
        )
        if cfg.run.dump_rollouts:
            self._write_jsonl(r, "samples.jsonl", (asdict(s) for s in samples))
        return pairs

    def _offline_pairs(self, row: dict) -> list[Pair]:
        """The dataset reader that replaces sampling in offline mode (a fixed scored preference set)."""
        from omni_ray.data.preferences import load_preference_pairs, to_train_pairs

        d = self.cfg.data
        records, load_stats = load_preference_pairs(d.path, split=d.split, on_bad_row=d.on_bad_row)
        pairs, tok_stats = to_train_pairs(
            records,
            self.tokenizer,
            max_prompt_tokens=d.max_prompt_tokens,
            max_response_tokens=d.max_response_tokens,
            on_overlong=d.on_overlong,
        )
        row.update(
            pairs_kept=len(pairs),
            pairs_dropped=load_stats["rows"] - len(pairs),
            reward_mean=float(np.mean([p.score_chosen for p in pairs])) if pairs else math.nan,
            **{f"data_{k}": v for k, v in {**load_stats, **tok_stats}.items() if isinstance(v, int)},
        )
        return pairs  # fmt: skip

    def _write_jsonl(self, r: int, name: str, records) -> None:
        d = self.run_dir / "rounds" / f"round_{r + 1:04d}"
        d.mkdir(parents=True, exist_ok=True)
        with (d / name).open("w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")

    def _write_pairs(self, r: int, pairs: list[Pair], margins: dict[int, float]) -> list[dict]:
        records = [{**p.to_record(), "margin": margins.get(i)} for i, p in enumerate(pairs)]
        self._write_jsonl(r, "pairs.jsonl", records)
        return records

    # ---------------------------------------------------------------------------------------------------------------
    # checkpoints and resume

    def _save_checkpoint(self, rounds_done: int) -> Path:
        """checkpoints/round_NNNN/: the policy in HF layout at the top (eval and serving read it as a model dir),
        the learner's full training state under learner/, the driver's state in driver_state.json; staged and
        committed atomically with a checksum manifest (omni_ray/checkpoint.py), then older ones pruned."""
        final = self.ckpt_root / f"round_{rounds_done:04d}"
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = checkpoint.staging_dir(final)
        self.learner.save_pretrained(str(stage))
        self.learner.save_state(str(stage / "learner"))
        state = {
            "round": rounds_done,
            "policy_version": self.policy_version,
            "global_step": self.global_step,
            "seed": self.cfg.run.seed,
            # Round r's prompts are a pure function of (seed, r, prompts_per_round): no cursor to store.
            "prompts_per_round": self.cfg.data.prompts_per_round,
            "wandb_run_id": self.tracker.wandb_run_id,
            "initial_eval": self.initial_eval,
        }
        (stage / "driver_state.json").write_text(json.dumps(state, indent=2))
        checkpoint.commit(stage, final, state)
        checkpoint.prune(self.ckpt_root, self.cfg.run.keep_checkpoints)
        return final

    def _restore(self, path: Path, state: dict) -> int:
        """Learner state from the checkpoint, its policy into the rollout workers; returns the rounds already done."""
        self.global_step = self.learner.load_state(str(path / "learner"))
        self.policy_version = int(state["policy_version"])
        self.initial_eval = state["initial_eval"]
        if self.policy_version > 0:
            # Fresh workers hold the model dir's weights: one export, one push to all of them (object store, as in
            # _restore_rollout, since the checkpoint's policy lives in the learner, not in any NCCL round yet).
            push_weights(self.rollout, self.learner.export_weights_ref(), version=self.policy_version,
                         timeout_s=self.cfg.sync.timeout_s)  # fmt: skip
        print(f"[omni-ray] resumed from {path} (round {state['round']} done, optimizer step {self.global_step})",
              flush=True)  # fmt: skip
        return int(state["round"])

    # ---------------------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        t_start = time.perf_counter()
        cfg = self.cfg
        t0 = time.perf_counter()
        self.start_roles()
        startup = time.perf_counter() - t0
        print(
            f"[omni-ray] roles up in {startup:.1f}s: {cfg.rollout.num_workers} rollout ({self.rollout_backend}), "
            f"scorer, {'PoP estimator, ' if self.pop else ''}{cfg.learner.num_workers} learner ranks "
            f"(ZeRO-{cfg.learner.zero_stage})",
            flush=True,
        )
        done = self._restore(*self.resume_from) if self.resume_from else 0
        if not self.resume_from:
            self.initial_eval = self.evaluate()
            self.tracker.log("eval", {"round": 0, **self.initial_eval})
            ev = self.initial_eval
            self.tracker.round_row({"round": 0, "eval_accuracy": ev["accuracy"], "time_eval": ev["time_eval"]})
        self._actors_busy()  # round 1's busy times start here, after start-up and the initial eval
        if done >= cfg.run.rounds:
            print(f"[omni-ray] {self.run_dir} has completed {done} of run.rounds={cfg.run.rounds} rounds: nothing to "
                  "train (raise run.rounds to continue it)", flush=True)  # fmt: skip
        self.tracker.start_progress(cfg.run.rounds, done)
        for r in range(done, cfg.run.rounds):
            row = self.run_round(r)
            self.tracker.log("round", row, step=self.global_step)
            self.tracker.round_row(row)
        summary = self._summary(time.perf_counter() - t_start, startup)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.tracker.log("summary", summary)
        return summary

    def _summary(self, wall_s: float, startup_s: float) -> dict:
        """From metrics.jsonl's round records, so a resumed run's summary covers the rounds of every process."""
        rows = read_records(self.run_dir / "metrics.jsonl", "round")
        stage_keys = sorted({k for row in rows for k in row if k.startswith("time_")})
        busy_keys = sorted({k for row in rows for k in row if k.startswith("busy_")})
        last = rows[-1] if rows else None
        return {
            "run_name": self.cfg.run.name,
            "rounds_completed": len(rows),
            "initial_eval": self.initial_eval,
            "final_eval": {"accuracy": last["eval_accuracy"], "reward_mean": last["eval_reward_mean"]}
            if last
            else self.initial_eval,
            "wall_s": wall_s,
            "startup_s": startup_s,
            "stage_time_s": {k[5:]: float(sum(r.get(k, 0.0) for r in rows)) for k in stage_keys},
            "busy_s": {k[5:]: float(sum(r.get(k, 0.0) for r in rows)) for k in busy_keys},
            "rollout_backend": self.rollout_backend,
            "loss": self.cfg.loss.name,
            "resumed_from": str(self.resume_from[0]) if self.resume_from else None,
        }

    def close(self) -> None:
        """Stop every role's actors (a driver inside a long-lived cluster must not leak them) and the sinks."""
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        for actor in [*getattr(self, "rollout", []), getattr(self, "scorer", None), getattr(self, "pop", None)]:
            if actor is not None:
                ray.kill(actor)
        if getattr(self, "learner", None) is not None:
            self.learner.shutdown()
        for pg in getattr(self, "placement_groups", {}).values():
            ray.util.remove_placement_group(pg)
        self.tracker.close()


def _wait_restarted(actor: Any, timeout_s: float) -> None:
    """Block until Ray has restarted `actor` (calls fail fast with ActorUnavailableError while it restarts);
    a stateless actor (scorer, PoP estimator) needs nothing more before its batch is retried."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.0, deadline - time.monotonic()))
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _find_resume_point(cfg: OmniRayConfig, run_dir: Path) -> tuple[Path, dict] | None:
    """The newest good checkpoint of `run_dir` (`run.resume=auto`), checked against the config; metrics.jsonl is cut
    back to it, so the rounds redone after it are logged once."""
    found = checkpoint.latest_good(run_dir / "checkpoints")
    if found is None:
        print(f"[omni-ray] run.resume=auto: no usable checkpoint under {run_dir}; starting from round 1", flush=True)
        return None
    path, state = found
    for key, now in (("seed", cfg.run.seed), ("prompts_per_round", cfg.data.prompts_per_round)):
        if state[key] != now:
            raise ValueError(
                f"run.resume=auto: {path} was written with {key}={state[key]}, the config says {now}; the prompt "
                f"stream would differ (set it back, or start a new run.name)"
            )
    metrics = run_dir / "metrics.jsonl"
    kept = [r for r in read_records(metrics) if r.get("kind") != "summary" and r.get("round", 0) <= state["round"]]
    tmp = metrics.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(metrics)
    return path, state


def _set_aside_previous_run(run_dir: Path) -> None:
    """A fresh run never mixes with, or overwrites, an earlier run of the same name: that one is renamed aside."""
    if run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"[omni-ray] {run_dir} held an earlier run: moved to {aside} (run.resume=auto continues a run)",
              flush=True)  # fmt: skip


def _public_config(cfg: OmniRayConfig) -> dict:
    """The config as W&B shows it (secrets are never config values: scorers read tokens from named env vars)."""
    return asdict(cfg)


def _train_pair(p: Pair) -> TrainPair:
    return TrainPair(p.prompt_token_ids, p.chosen_token_ids, p.rejected_token_ids, p.score_chosen, p.score_rejected)


def _round_means(steps: list[dict]) -> dict:
    keys = ("loss", "w_qual", "w_perf", "margin", "accuracy", "grad_norm", "nll_mask")
    return {k: float(np.mean([s[k] for s in steps])) for k in keys if steps and k in steps[0]}


def train(cfg: OmniRayConfig) -> dict:
    init_ray(cfg)
    driver = Driver(cfg)
    try:
        return driver.run()
    finally:
        driver.close()
