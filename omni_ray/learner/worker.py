"""One DeepSpeed rank of the learner group: policy, frozen reference, EMA target, the round's training loop.

A plain class: the group wraps it with `ray.remote`, tests can run it in-process (world size 1). Every rank sees the
whole round (one object-store copy) and takes its share of each global batch, so ranks agree on the data order
without talking. Everything CUDA-specific is one `device` string; on CPU DeepSpeed runs with its CPU accelerator
(`DS_ACCELERATOR=cpu`) over gloo.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omni_ray.config import OmniRayConfig
from omni_ray.learner.objective import BatchLogps, Objective
from omni_ray.models.logprobs import sequence_logprobs

PAIR_STATS = ("w_qual", "w_perf", "margin", "nll_mask", "reward_margin")  # kept per pair for distributions


@dataclass
class TrainPair:
    """What the learner needs of a preference pair: token ids and the (rescaled) scores the weights see."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    score_chosen: float
    score_rejected: float


@dataclass
class RoundData:
    """A round's training set. Each item is (strong pair, weak partner or -1, bt margin or NaN).

    Without PoP, items are (i, -1, NaN) for every pair. With PoP ema / fixed targets the learner computes the weak
    partner's implicit margin; with the bt target the estimator's margin is used directly.
    """

    pairs: list[TrainPair]
    items: list[tuple[int, int, float]]
    round_index: int = 0


def _dist_env(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )


class LearnerWorker:
    """Construction is cheap; `init_process_group` joins the group and builds the models (collective)."""

    def __init__(self, cfg: OmniRayConfig, model_path: str, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.model_path = model_path

    def node_address(self) -> tuple[str, int]:
        """This rank's node IP and a free port: rank 0's answer is the group's rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return (ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"), port

    def init_process_group(self, master_addr: str, master_port: int) -> int:
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        import deepspeed
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        _dist_env(self.rank, self.world_size, master_addr, master_port)
        on_gpu = torch.cuda.is_available() and cfg.learner.num_gpus > 0
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=_timedelta(cfg.learner))
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        torch.manual_seed(cfg.run.seed)
        load = dict(dtype=getattr(torch, cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code)
        policy = AutoModelForCausalLM.from_pretrained(self.model_path, **load)
        self.pad_id = policy.config.pad_token_id if policy.config.pad_token_id is not None else 0
        self.objective = Objective(cfg.loss, cfg.pop)
        # Reference and EMA target are frozen full copies on each rank (they never take gradients). For models too
        # large to replicate they would be ZeRO-3 inference engines; the interface stays the same.
        self.reference = _frozen(copy.deepcopy(policy)).to(self.device) if self.objective.uses_reference else None
        self.ema = (
            _frozen(copy.deepcopy(policy)).to(self.device)
            if self.objective.uses_pop and cfg.pop.target == "ema"
            else None
        )
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=policy, optimizer=opt, lr_scheduler=_scheduler(opt, cfg), config=_ds_config(cfg, self.world_size)
        )
        self.zero3 = cfg.learner.zero_stage == 3
        self.global_step = 0
        self._ref_cache: dict[int, tuple[float, float, int, int]] = {}
        return self.rank

    # ------------------------------------------------------------------------------------------------------------
    # log-probs

    def _logps(self, model: torch.nn.Module, data: RoundData, idx: list[int]) -> tuple[torch.Tensor, ...]:
        """Summed log-probs of chosen and rejected of pairs `idx` under `model`, plus the response lengths."""
        pairs = [data.pairs[i] for i in idx]
        prompts = [p.prompt_ids for p in pairs] * 2
        responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        summed, lengths = sequence_logprobs(model, prompts, responses, self.pad_id)
        n = len(pairs)
        return summed[:n], summed[n:], lengths[:n], lengths[n:]

    def _reference(self, data: RoundData, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs in the loss's convention, computed once per pair per round (the reference is fixed)."""
        if self.reference is None:
            zeros = torch.zeros(len(idx), device=self.device)
            return zeros, zeros
        missing = [i for i in dict.fromkeys(idx) if i not in self._ref_cache]
        if missing:
            t0 = time.perf_counter()
            with torch.no_grad():
                rc, rr, lc, lr = self._logps(self.reference, data, missing)
            for j, i in enumerate(missing):
                self._ref_cache[i] = (float(rc[j]), float(rr[j]), int(lc[j]), int(lr[j]))
            self._busy["reference"] += time.perf_counter() - t0
        vals = torch.tensor([self._ref_cache[i] for i in idx], dtype=torch.float32, device=self.device)
        return self.objective.convention(vals[:, 0], vals[:, 2]), self.objective.convention(vals[:, 1], vals[:, 3])

    def _weak_target(self, data: RoundData, items: list[tuple[int, int, float]]) -> torch.Tensor | None:
        """PoP m_s before clipping: the weak partner's implicit margin under the target model (stop-gradient)."""
        if not self.objective.uses_pop:
            return None
        if self.cfg.pop.target == "bt":
            return torch.tensor([m for _, _, m in items], dtype=torch.float32, device=self.device)
        weak = [u for _, u, _ in items]
        target_model = self.ema if self.cfg.pop.target == "ema" else self.engine.module
        with torch.no_grad():
            tc, tr, lc, lr = self._logps(target_model, data, weak)
        rc, rr = self._reference(data, weak)
        conv = self.objective.convention
        return self.objective.implicit_margin(conv(tc, lc), conv(tr, lr), rc, rr)

    # ------------------------------------------------------------------------------------------------------------
    # training

    def _batches(self, data: RoundData) -> list[list[int]]:
        """Global batches of item indices for all epochs: the same on every rank (seeded by run seed and round).

        A remainder smaller than the world size joins the previous batch so no rank ever gets an empty share.
        """
        b = self.cfg.learner.batch_size
        out: list[list[int]] = []
        for epoch in range(self.cfg.learner.epochs):
            order = np.random.default_rng([self.cfg.run.seed, 5, data.round_index, epoch]).permutation(len(data.items))
            chunks = [order[i : i + b].tolist() for i in range(0, len(order), b)]
            if len(chunks) > 1 and len(chunks[-1]) < self.world_size:
                chunks[-2] += chunks.pop()
            out += chunks
        return out

    def train_round(self, data: RoundData) -> dict:
        """All optimizer steps of one round. Returns per-step metrics (rank-averaged) and busy times."""
        self._ref_cache = {}
        self._busy = {"reference": 0.0, "train": 0.0}
        if self.cfg.learner.ref_update == "per_round" and self.reference is not None and data.round_index > 0:
            self._reference_from_policy()
        steps, per_pair = [], {}
        t_round = time.perf_counter()
        for batch in self._batches(data):
            items = [data.items[i] for i in batch[self.rank :: self.world_size]]
            metrics, pair_stats = self._step(data, items)
            steps.append(metrics)
            per_pair.update(zip((s for s, _, _ in items), pair_stats))  # the last epoch's values per strong pair
        self._busy["train"] = time.perf_counter() - t_round - self._busy["reference"]
        gathered: list[dict] = [{} for _ in range(self.world_size)]
        torch.distributed.all_gather_object(gathered, per_pair)
        pair_stats = {k: v for part in gathered for k, v in part.items()}
        return {"steps": steps, "busy": dict(self._busy), "global_step": self.global_step, "pair_stats": pair_stats}

    def _step(self, data: RoundData, items: list[tuple[int, int, float]]) -> tuple[dict, list[dict]]:
        """One optimizer step on this rank's share; returns rank-averaged metrics and per-pair weights / margin."""
        strong = [s for s, _, _ in items]
        target = self._weak_target(data, items)
        rc, rr = self._reference(data, strong)
        self.engine.train()
        pc, pr, lc, lr = self._logps(self.engine, data, strong)
        conv = self.objective.convention
        pairs = [data.pairs[i] for i in strong]
        batch = BatchLogps(
            policy_chosen=conv(pc, lc),
            policy_rejected=conv(pr, lr),
            ref_chosen=rc,
            ref_rejected=rr,
            score_chosen=torch.tensor([p.score_chosen for p in pairs], device=self.device),
            score_rejected=torch.tensor([p.score_rejected for p in pairs], device=self.device),
            target_margin=target,
            chosen_lengths=lc,
        )
        out = self.objective(batch)
        self.engine.backward(out.loss)
        self.engine.step()
        self.global_step += 1
        if self.ema is not None:
            self._update_ema()
        keys = [k for k in PAIR_STATS if k in out.stats]
        columns = [out.stats[k].tolist() for k in keys]
        return self._step_metrics(out, len(items)), [dict(zip(keys, row)) for row in zip(*columns)]

    def _step_metrics(self, out, n: int) -> dict:
        """Batch means of the loss and its per-example stats, averaged over ranks (weighted by share size)."""
        names = ["loss"] + sorted(out.stats)
        local = torch.stack([out.per_example.detach().sum()] + [out.stats[k].float().sum() for k in names[1:]])
        vec = torch.cat([local, torch.tensor([float(n)], device=local.device)])
        torch.distributed.all_reduce(vec)
        means = (vec[:-1] / vec[-1]).tolist()
        metrics = dict(zip(names, means))
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update(
            step=self.global_step,
            lr=self.scheduler.get_last_lr()[0] if self.scheduler else self.cfg.learner.lr,
            grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
            pairs=int(vec[-1]),
        )
        return metrics

    def _params(self, module: torch.nn.Module):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.zero3)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """theta_ema <- tau * theta_ema + (1 - tau) * theta, after every optimizer step."""
        tau = self.cfg.pop.ema_tau
        with self._params(self.engine.module):
            for e, p in zip(self.ema.parameters(), self.engine.module.parameters()):
                e.mul_(tau).add_(p.detach().to(e.dtype), alpha=1 - tau)

    @torch.no_grad()
    def _reference_from_policy(self) -> None:
        with self._params(self.engine.module):
            for r, p in zip(self.reference.parameters(), self.engine.module.parameters()):
                r.copy_(p.detach())

    # ------------------------------------------------------------------------------------------------------------
    # weights out

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on rank 0 (None on other ranks). Collective under ZeRO-3: call on every rank."""
        with self._params(self.engine.module):
            if self.rank != 0:
                return None
            return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.engine.module.state_dict().items()}

    def export_weights(self) -> bytes | None:
        """Rank 0's weights as safetensors bytes: what the rollout workers load."""
        from omni_ray.weight_sync import serialize_state_dict

        state = self.export_state_dict()
        return None if state is None else serialize_state_dict(state)

    def save_pretrained(self, path: str) -> str | None:
        """HF `save_pretrained` layout of the current policy plus the tokenizer into `path` (rank 0 writes;
        collective). Atomicity is the caller's: checkpoints are staged and committed by omni_ray/checkpoint.py."""
        state = self.export_state_dict()
        if state is None:
            return None
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(path, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(path)
        return path

    # ------------------------------------------------------------------------------------------------------------
    # training state (exact resume)

    def save_state(self, path: str) -> None:
        """Everything exact resume needs beyond the policy weights (collective: every rank writes its shards).

        DeepSpeed's own checkpoint holds the module, the (ZeRO-partitioned) optimizer and the LR scheduler; the
        step counter and torch RNG ride in its client state; the EMA target goes to `ema.safetensors` (rank 0;
        every rank holds the same copy). The frozen reference is not saved: it is the model dir, or under
        `ref_update=per_round` it is re-copied from the policy at the start of the next round anyway.
        """
        from safetensors.torch import save_model

        client = {"global_step": self.global_step, "torch_rng": torch.get_rng_state()}
        self.engine.save_checkpoint(path, tag="learner", client_state=client, save_latest=False)
        if self.ema is not None and self.rank == 0:
            save_model(self.ema, str(Path(path) / "ema.safetensors"))

    def load_state(self, path: str) -> int:
        """Inverse of `save_state`; returns the restored optimizer step (collective)."""
        from safetensors.torch import load_model

        load_path, client = self.engine.load_checkpoint(
            path, tag="learner", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed learner state under {path}")
        self.global_step = int(client["global_step"])
        torch.set_rng_state(client["torch_rng"])
        if self.ema is not None:
            load_model(self.ema, str(Path(path) / "ema.safetensors"))
        return self.global_step

    def parameter_checksum(self) -> float:
        """Sum of all parameters (collective): ranks that agree on weights report the same number."""
        with self._params(self.engine.module):
            return float(sum(p.detach().double().sum() for p in self.engine.module.parameters()))


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _timedelta(learner):
    from datetime import timedelta

    return timedelta(seconds=learner.timeout_s)


def _scheduler(opt: torch.optim.Optimizer, cfg: OmniRayConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then constant or cosine, over the run's expected number of steps (rounds x epochs x batches)."""
    per_round = math.ceil(cfg.data.prompts_per_round / cfg.learner.batch_size) * cfg.learner.epochs
    total = max(1, per_round * cfg.run.rounds)
    warmup = int(cfg.learner.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.learner.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _ds_config(cfg: OmniRayConfig, world_size: int) -> dict:
    lc = cfg.learner
    return {
        "train_batch_size": lc.batch_size,
        "train_micro_batch_size_per_gpu": lc.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage},
        # A client torch AdamW: DeepSpeed's fused CPU Adam JIT-compiles for ~40 s on a cold machine.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
