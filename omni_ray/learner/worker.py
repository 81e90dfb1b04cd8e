"""One DeepSpeed rank of the learner group: policy, frozen reference, EMA target, the round's training loop.

A plain class: the group wraps it with `ray.remote`, tests can run it in-process (world size 1). Every rank sees the
whole round (one object-store copy) and takes its share of each global batch, so ranks agree on the data order
without talking (learner/batching.py).

Memory is set by the micro-batch, not by the global batch (docs/gpu.md has the plan):
- a rank's share of a step is cut into micro-batches (`learner.micro_batch_size`, or a token budget), gradients
  accumulate over them, and the optimizer steps once per global batch; each micro-batch's loss is scaled so the step
  equals one global-batch mean (DeepSpeed averages gradients over ranks);
- log-probs come from the response positions only, through a selective log-softmax (models/logprobs.py);
- `learner.gradient_checkpointing` recomputes layer activations in the backward pass;
- under ZeRO-3 the reference and the PoP EMA target are DeepSpeed ZeRO-3 engines without an optimizer, partitioned
  like the policy (OpenRLHF's reference model); the EMA update runs on each rank's own partitions, so no weights are
  ever gathered for it. Under ZeRO-0/1/2 the policy is replicated anyway, and so are they;
- reference log-probs of the round are computed once, before its first step, spread over the ranks and gathered
  as a (pairs, 2) tensor;
- with LoRA (`learner.lora.rank > 0`, learner/adapters.py) only the adapters train: the reference is the base model
  with the adapters off and the EMA target a second adapter, so there is no copy of the model at all.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_ray.config import OmniRayConfig
from omni_ray.learner.batching import MicroBatch, global_batches, micro_batches
from omni_ray.learner.frozen import AdapterView, FrozenCopy, LivePolicy, local_pieces
from omni_ray.learner.objective import BatchLogps, Objective
from omni_ray.models import adapters
from omni_ray.models.logprobs import pack, response_logprobs
from omni_ray.pairs import Pair
from omni_ray.pop import PopItems

PAIR_STATS = ("w_qual", "w_perf", "margin", "nll_mask", "reward_margin")  # kept per pair for distributions


@dataclass
class RoundData:
    """A round's training set: its pairs and the PoP items that say which pair trains against which margin
    (`PopItems.every_pair` for losses without PoP)."""

    pairs: list[Pair]
    items: PopItems
    round_index: int = 0


def select_accelerator() -> str:
    """DeepSpeed's accelerator: the user's DS_ACCELERATOR when set, else cuda where there is a CUDA device, else cpu."""
    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


class LearnerWorker:
    """Construction is cheap; rank 0's `rendezvous` opens the group's store, `init_process_group` joins the group on
    every rank and builds the models (collective)."""

    def __init__(self, cfg: OmniRayConfig, model_path: str, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.model_path = model_path
        self._store: Any = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: open the process group's TCPStore on a port the OS picks, and keep it open, so no other process
        can take the port between choosing and binding it. Returns (node address, port) for the other ranks."""
        from torch.distributed import TCPStore

        self._store = TCPStore(
            "0.0.0.0", 0, self.world_size, is_master=True, timeout=self._timeout(), wait_for_workers=False
        )
        return _node_ip(), int(self._store.port)

    def _timeout(self) -> timedelta:
        return timedelta(seconds=self.cfg.learner.timeout_s)

    def init_process_group(self, master_addr: str, master_port: int) -> int:
        # DeepSpeed 0.19's ZeRO calls torch.distributed.all_gather_into_tensor, which torch 2.13 deprecates in favour
        # of all_gather_single (the same collective); every step would print the FutureWarning.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor` is deprecated", category=FutureWarning)
        accelerator = select_accelerator()
        cfg = self.cfg
        on_gpu = torch.cuda.is_available() and cfg.learner.num_gpus > 0
        if on_gpu and accelerator == "cpu":
            raise RuntimeError(
                "DS_ACCELERATOR=cpu is set, but the learner has a GPU (learner.num_gpus > 0): unset DS_ACCELERATOR "
                "(omni-ray picks cuda where there is a CUDA device)"
            )
        import deepspeed
        import torch.distributed as dist
        from torch.distributed import TCPStore

        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        backend = "nccl" if on_gpu else "gloo"
        if not dist.is_initialized():  # a process that is already a rank of a group (a notebook, a test) keeps it
            store = self._store or TCPStore(master_addr, master_port, self.world_size, is_master=False,
                                            timeout=self._timeout())  # fmt: skip
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                    timeout=self._timeout())  # fmt: skip
        deepspeed.init_distributed(dist_backend=backend, timeout=self._timeout())  # adopts the group above
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        torch.manual_seed(cfg.run.seed)
        self.objective = Objective(cfg.loss, cfg.pop)
        self.zero3 = cfg.learner.zero_stage == 3
        self.lora = cfg.learner.lora.rank > 0
        wants_ema = self.objective.uses_pop and cfg.pop.target == "ema"
        ds_config = _ds_config(cfg, self.world_size)
        with _partitioned_loading(ds_config if self.zero3 else None):
            policy = self._load()
            # With LoRA the reference is the base model and the EMA an adapter: no copies to load.
            reference = self._load() if self.objective.uses_reference and not self.lora else None
            ema = self._load() if wants_ema and not self.lora else None
        self.pad_id = policy.config.pad_token_id if policy.config.pad_token_id is not None else 0
        if self.lora:
            self.lora_targets = adapters.resolve_targets(policy, cfg.learner.lora.target_modules)
            policy = adapters.with_adapters(policy, cfg.learner.lora, self.lora_targets, ema=wants_ema)
        if cfg.learner.gradient_checkpointing:
            policy.config.use_cache = False
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainable = [p for p in policy.parameters() if p.requires_grad]  # no optimizer state for a frozen base
        opt = torch.optim.AdamW(trainable, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=policy, optimizer=opt, lr_scheduler=_scheduler(opt, cfg), config=ds_config
        )
        frozen = dict(zero3=self.zero3, device=self.device, offload=cfg.learner.ref_offload,
                      ds_config=_frozen_ds_config(cfg, self.world_size))  # fmt: skip
        if self.lora:
            self.reference = AdapterView(self.engine, None) if self.objective.uses_reference else None
            self.ema = AdapterView(self.engine, adapters.EMA) if wants_ema else None
        else:
            self.reference = None if reference is None else FrozenCopy(reference, **frozen)
            self.ema = None if ema is None else FrozenCopy(ema, **frozen)
        self.policy = LivePolicy(self.engine)
        self.global_step = 0
        return self.rank

    def _load(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        c = self.cfg.model
        return AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=getattr(torch, c.dtype), trust_remote_code=c.trust_remote_code
        )

    def _trained_pieces(self) -> list[torch.Tensor]:
        """This rank's pieces of the trained weights (the adapter's with LoRA): what the EMA follows."""
        module = self.engine.module
        params = adapters.adapter_parameters(module, adapters.TRAINED) if self.lora else module.parameters()
        return local_pieces(params)

    # ------------------------------------------------------------------------------------------------------------
    # log-probs

    def _pair_logps(self, model: Any, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of chosen and rejected of `pairs` under `model`, one forward over both."""
        prompts = [p.prompt_token_ids for p in pairs] * 2
        responses = [p.chosen_token_ids for p in pairs] + [p.rejected_token_ids for p in pairs]
        summed = response_logprobs(model, pack(prompts, responses, self.pad_id, self.device)).sum(1)
        return summed[: len(pairs)], summed[len(pairs) :]

    def _lengths(self, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.tensor([len(p.chosen_token_ids) for p in pairs], dtype=torch.float32, device=self.device)
        rejected = torch.tensor([len(p.rejected_token_ids) for p in pairs], dtype=torch.float32, device=self.device)
        return chosen, rejected

    def _pair_cost(self, pairs: Sequence[Pair], pair_of: Any = None):
        """Padded tokens of a micro-batch (its chosen and rejected sequences share one width); `pair_of` maps the
        micro-batch's items to pair indices (PoP items -> their strong pair)."""
        prompt = np.array([len(p.prompt_token_ids) for p in pairs])
        response = np.array([max(len(p.chosen_token_ids), len(p.rejected_token_ids)) for p in pairs])

        def cost(indices: Sequence[int]) -> int:
            idx = np.asarray(indices if pair_of is None else pair_of[list(indices)], dtype=np.int64)
            return int(2 * len(idx) * (prompt[idx].max() + response[idx].max()))

        return cost

    def _plan(self, shares: Sequence[Sequence[int]], cost: Any, filler: int) -> list[MicroBatch]:
        lc = self.cfg.learner
        plans = micro_batches(
            shares, cost, size=lc.micro_batch_size, max_tokens=lc.max_tokens_per_micro_batch, filler=filler
        )
        return plans[self.rank]

    @torch.no_grad()
    def _frozen_logps(
        self, weights: Any, pairs: Sequence[Pair], shares: Sequence[Sequence[int]]
    ) -> dict[int, torch.Tensor]:
        """(chosen, rejected) summed log-probs of the pairs in this rank's share under weights that take no gradient
        here (learner/frozen.py), micro-batched with the same number of forwards on every rank."""
        out: dict[int, torch.Tensor] = {}
        with weights.forward() as m:
            for mb in self._plan(shares, self._pair_cost(pairs), filler=0):
                c, r = self._pair_logps(m, [pairs[i] for i in mb.items])
                if not mb.dummy:
                    out.update(zip(mb.items, torch.stack([c, r], 1)))
        return out

    def reference_logprobs(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """(pairs, 2) summed reference log-probs L_ref(y_w), L_ref(y_l) of every pair: each rank computes every W-th
        pair, then all ranks gather all of them (collective). Zeros for reference-free losses."""
        n = len(pairs)
        if self.reference is None:
            return torch.zeros(n, 2, device=self.device)
        shares = [list(range(r, n, self.world_size)) for r in range(self.world_size)]
        local = self._frozen_logps(self.reference, pairs, shares)
        parts: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, {i: v.cpu() for i, v in local.items()})
        table = torch.zeros(n, 2)
        for part in parts:
            for i, v in part.items():
                table[i] = v
        return table.to(self.device)

    def _targets(self, data: RoundData, share: Sequence[int], batch: Sequence[int]) -> torch.Tensor | None:
        """PoP m_s before clipping, per item of this rank's share: the item's own margin where it has one (bt, the
        uncompared floor), else the weak partner's implicit margin under the target model (stop-gradient)."""
        if not self.objective.uses_pop:
            return None
        items = data.items
        values = torch.tensor(items.margin[list(share)], dtype=torch.float32, device=self.device)

        def to_compute(rows: Sequence[int]) -> list[int]:
            return [k for k, i in enumerate(rows) if math.isnan(items.margin[i]) and items.weak[i] >= 0]

        shares = [sorted({int(items.weak[i]) for i in batch[r :: self.world_size] if math.isnan(items.margin[i])
                          and items.weak[i] >= 0}) for r in range(self.world_size)]  # fmt: skip
        if not any(shares):
            return values
        target = self.ema if self.cfg.pop.target == "ema" else self.policy
        logps = self._frozen_logps(target, data.pairs, shares)
        rows = to_compute(share)
        if not rows:  # this rank's items all have their margins; it took part in the forwards for the others
            return values
        weak = [int(items.weak[share[k]]) for k in rows]
        lc, lr = self._lengths([data.pairs[u] for u in weak])
        t, ref = torch.stack([logps[u] for u in weak]), self._ref[weak]
        conv = self.objective.convention
        values[rows] = self.objective.implicit_margin(
            conv(t[:, 0], lc), conv(t[:, 1], lr), conv(ref[:, 0], lc), conv(ref[:, 1], lr)
        )
        return values

    # ------------------------------------------------------------------------------------------------------------
    # training

    def train_round(self, data: RoundData) -> dict:
        """All optimizer steps of one round. Returns per-step metrics (rank-averaged) and busy times."""
        lc = self.cfg.learner
        self._busy = {"reference": 0.0, "train": 0.0}
        t0 = time.perf_counter()
        if lc.ref_update == "per_round" and self.reference is not None and data.round_index > 0:
            _blend(self.reference.pieces(), self._trained_pieces(), tau=0.0)
        self._ref = self.reference_logprobs(data.pairs)
        self._busy["reference"] = time.perf_counter() - t0
        steps, per_pair = [], {}
        seed = (self.cfg.run.seed, 5, data.round_index)
        for batch in global_batches(len(data.items), lc.batch_size, lc.epochs, seed, self.world_size):
            metrics, pair_stats = self._step(data, batch)
            steps.append(metrics)
            per_pair.update(pair_stats)  # the last epoch's values per strong pair
        self._busy["train"] = time.perf_counter() - t0 - self._busy["reference"]
        gathered: list[dict] = [{} for _ in range(self.world_size)]
        torch.distributed.all_gather_object(gathered, per_pair)
        pair_stats = {k: v for part in gathered for k, v in part.items()}
        return {"steps": steps, "busy": dict(self._busy), "global_step": self.global_step, "pair_stats": pair_stats}

    def _step(self, data: RoundData, batch: Sequence[int]) -> tuple[dict, dict[int, dict]]:
        """One optimizer step over a global batch: this rank's share in micro-batches, gradients accumulated, one
        update. Each micro-batch's summed loss is scaled by W / |batch| so the update is that of the batch mean."""
        share = list(batch[self.rank :: self.world_size])
        position = {item: k for k, item in enumerate(share)}
        targets = self._targets(data, share, batch)
        shares = [list(batch[r :: self.world_size]) for r in range(self.world_size)]
        # A rank whose share is empty (a batch smaller than the world) runs a dummy piece of the batch's first item.
        plan = self._plan(shares, self._pair_cost(data.pairs, pair_of=data.items.strong), filler=batch[0])
        scale = self.world_size / len(batch)
        self.engine.train()
        sums: dict[str, torch.Tensor] = {}
        per_pair: dict[int, dict] = {}
        for mb in plan:
            if targets is None:
                margins = None
            elif mb.dummy:  # its loss counts 0: any margin will do
                margins = targets.new_zeros(len(mb.items))
            else:
                margins = targets[[position[i] for i in mb.items]]
            out, strong = self._micro_batch_loss(data, mb.items, margins)
            self.engine.backward(out.per_example.sum() * (0.0 if mb.dummy else scale), scale_wrt_gas=False)
            # A dummy adds zeros, so that every rank reduces the same named sums, an empty share's included.
            for name, value in [("loss", out.per_example.detach()), *out.stats.items()]:
                sums[name] = sums.get(name, 0.0) + (
                    torch.zeros((), device=self.device) if mb.dummy else value.float().sum()
                )
            if mb.dummy:
                continue
            keys = [k for k in PAIR_STATS if k in out.stats]
            for j, s in enumerate(strong):
                per_pair[s] = {k: float(out.stats[k][j]) for k in keys}
        self.engine.step()
        self.global_step += 1
        if self.ema is not None:
            _blend(self.ema.pieces(), self._trained_pieces(), tau=self.cfg.pop.ema_tau)
        return self._step_metrics(sums, len(share)), per_pair

    def _micro_batch_loss(self, data: RoundData, rows: Sequence[int], margins: torch.Tensor | None):
        strong = [int(data.items.strong[i]) for i in rows]
        pairs = [data.pairs[s] for s in strong]
        pc, pr = self._pair_logps(self.engine, pairs)
        lc, lr = self._lengths(pairs)
        ref = self._ref[strong]
        conv = self.objective.convention
        batch = BatchLogps(
            policy_chosen=conv(pc, lc),
            policy_rejected=conv(pr, lr),
            ref_chosen=conv(ref[:, 0], lc),
            ref_rejected=conv(ref[:, 1], lr),
            score_chosen=torch.tensor([p.score_chosen for p in pairs], dtype=torch.float32, device=self.device),
            score_rejected=torch.tensor([p.score_rejected for p in pairs], dtype=torch.float32, device=self.device),
            target_margin=margins,
            chosen_lengths=lc,
        )
        return self.objective(batch), strong

    def _step_metrics(self, sums: dict[str, torch.Tensor], n: int) -> dict:
        """Global-batch means of the loss and its per-example stats, reduced over ranks."""
        names = sorted(sums)
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device) for k in names]
                          + [torch.tensor(float(n), device=self.device)])  # fmt: skip
        torch.distributed.all_reduce(vec)
        metrics = dict(zip(names, (vec[:-1] / vec[-1]).tolist()))
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update(
            step=self.global_step,
            lr=self.scheduler.get_last_lr()[0] if self.scheduler else self.cfg.learner.lr,
            grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
            pairs=int(vec[-1]),
        )
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # weights out

    def full_tensors(
        self, every_rank: bool = False, device: Any = "cpu", adapter_only: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(HF name, full tensor on `device`) of every weight of the policy's state dict (tied names included), in
        model order, gathering one ZeRO-3 layer at a time; LoRA merged in, or with `adapter_only` the adapter's
        tensors alone. None on ranks other than 0 unless `every_rank`. Collective under ZeRO-3: every rank must run
        it to its end."""
        module = self.engine.module
        keep = every_rank or self.rank == 0
        entries = adapters.weight_entries(module, adapter_only=adapter_only)
        yield from adapters.materialize(entries, zero3=self.zero3, device=device, keep=keep)
        if adapter_only:
            return
        persistent = {adapters.base_name(n) for n in module.state_dict()}
        for name, b in module.named_buffers():
            if adapters.base_name(name) in persistent:
                yield adapters.base_name(name), b.detach().to(device, copy=True) if keep else None

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on rank 0 (None on other ranks). Collective under ZeRO-3: call on every rank."""
        state = dict(self.full_tensors())
        return state if self.rank == 0 else None

    def export_weight_buckets(
        self, bucket_bytes: int, put: Callable[[bytes], Any] = bytes, adapter_only: bool = False
    ) -> tuple[list[Any], int] | None:
        """Rank 0: the policy (with LoRA and `adapter_only`, its adapter alone) as safetensors buckets of at most
        `bucket_bytes` (a larger tensor goes alone), each handed to `put` as soon as it is full (`ray.put`, a file
        writer); returns the `put` results and the bytes. Never more than one bucket plus one gathered layer is held.
        Collective under ZeRO-3; None off rank 0."""
        from omni_ray.weight_sync.base import buckets_of, serialize_state_dict

        handles: list[Any] = []
        total = 0
        for bucket in buckets_of(self.full_tensors(adapter_only=adapter_only), bucket_bytes):
            total += sum(t.numel() * t.element_size() for t in bucket.values())
            handles.append(put(serialize_state_dict(bucket)))
        return (handles, total) if self.rank == 0 else None

    # -- the nccl strategy (omni_ray/weight_sync/broadcast.py): rank 0 broadcasts, every rank gathers ZeRO-3 shards

    def weight_specs(self) -> list[list[Any]]:
        """The weights the broadcast sends, in model order: HF names (each tensor once, LoRA merged in), full shapes
        (ZeRO-3 keeps them in `ds_shape`), dtypes."""
        from omni_ray.weight_sync.broadcast import TensorSpec

        return [
            TensorSpec(name, tuple(int(d) for d in getattr(p, "ds_shape", p.shape)),
                       str(p.dtype).removeprefix("torch.")).to_wire()
            for name, p, _ in adapters.weight_entries(self.engine.module, tied=False)
        ]  # fmt: skip

    def host_weight_broadcast(self, world_size: int, timeout_s: float) -> tuple[str, int] | None:
        """Rank 0 opens the broadcast group's store on a port the OS picks, and keeps it; returns (node IP, port)."""
        if self.rank != 0:
            return None
        from omni_ray.weight_sync.broadcast import host_store

        self._broadcast_store = host_store(world_size, timeout_s)
        return _node_ip(), int(self._broadcast_store.port)

    def join_weight_broadcast(self, backend: str, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins the group as its root (blocks until every engine worker has joined)."""
        if self.rank != 0:
            return
        from omni_ray.weight_sync.broadcast import BroadcastGroup

        self._broadcast = BroadcastGroup("", 0, 0, world_size, backend=backend, timeout_s=timeout_s,
                                         device=self.device, store=self._broadcast_store)  # fmt: skip

    def send_weight_broadcast(self, wire_buckets: list[list[list[Any]]]) -> int:
        """Every rank: gather each layer's ZeRO-3 shards together (merging LoRA); rank 0 packs each bucket and
        broadcasts it. Returns the bytes sent."""
        from omni_ray.weight_sync.broadcast import TensorSpec, pack_bucket

        entries = adapters.weight_entries(self.engine.module, tied=False)
        stream = adapters.materialize(entries, zero3=self.zero3, device=self.device, keep=self.rank == 0)
        sent = 0
        for wire in wire_buckets:
            bucket = [TensorSpec.from_wire(w) for w in wire]
            tensors = [next(stream) for _ in bucket]
            if [n for n, _ in tensors] != [spec.name for spec in bucket]:
                raise RuntimeError("the broadcast's buckets were planned from other weights than the learner holds")
            if self.rank == 0:
                flat = pack_bucket([t for _, t in tensors], bucket, self.device)
                self._broadcast.broadcast(flat, src=0)
                sent += flat.numel()
        return sent

    def close_weight_broadcast(self) -> None:
        group, self._broadcast = getattr(self, "_broadcast", None), None
        if group is not None:
            group.close()

    def save_pretrained(self, path: str) -> str | None:
        """The current policy in `path` (rank 0 writes; collective), with the tokenizer: HF's `save_pretrained`
        layout, or with LoRA peft's adapter format (adapter_config.json + adapter_model.safetensors, which HF and peft
        load onto the base model), plus the merged model under `merged/` with `run.save_merged`. Atomicity is the
        caller's: checkpoints are staged and committed by omni_ray/checkpoint.py."""
        from transformers import AutoTokenizer

        if self.lora:
            self._save_adapter(path)
            if self.cfg.run.save_merged:
                self._save_full(str(Path(path) / "merged"))
        else:
            self._save_full(path)
        if self.rank != 0:
            return None
        tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.cfg.model.trust_remote_code)
        tokenizer.save_pretrained(path)
        return path

    def _save_full(self, path: str) -> None:
        state = self.export_state_dict()
        if state is not None:
            base = self.engine.module.get_base_model() if self.lora else self.engine.module
            base.save_pretrained(path, state_dict=state, safe_serialization=True)

    def _save_adapter(self, path: str) -> None:
        from safetensors.torch import save_file

        state = dict(self.full_tensors(adapter_only=True))
        if self.rank == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.engine.module.peft_config[adapters.TRAINED].save_pretrained(path)
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(path) / "adapter_model.safetensors"))

    # ------------------------------------------------------------------------------------------------------------
    # colocation: the GPU is the rollout engines' while they generate

    def offload_states(self) -> None:
        """Optimizer states, gradients and weights to CPU (DeepSpeed's `offload_states`), cached blocks released."""
        if self.device.type == "cuda":
            self.engine.offload_states()
            torch.cuda.empty_cache()

    def reload_states(self) -> None:
        if self.device.type == "cuda":
            self.engine.reload_states()

    # ------------------------------------------------------------------------------------------------------------
    # training state (exact resume)

    def save_state(self, path: str) -> None:
        """Everything exact resume needs beyond the policy weights (collective: every rank writes its shards).

        DeepSpeed's own checkpoint holds the module, the (ZeRO-partitioned) optimizer and the LR scheduler; the
        step counter and torch RNG ride in its client state; the EMA target goes to `ema_rank<r>.safetensors`, each
        rank's own pieces (its ZeRO-3 partitions, or the whole replicated copy). The frozen reference is not saved:
        it is the model dir, or under `ref_update=per_round` it is re-copied from the policy at the next round.
        """
        from safetensors.torch import save_file

        client = {"global_step": self.global_step, "torch_rng": torch.get_rng_state()}
        # With LoRA the base model is the model dir's, frozen: only the adapters' state is worth writing.
        self.engine.save_checkpoint(path, tag="learner", client_state=client, save_latest=False,
                                    exclude_frozen_parameters=self.lora)  # fmt: skip
        if self.ema is not None:
            pieces = {str(i): t.detach().to("cpu").contiguous() for i, t in enumerate(self.ema.pieces())}
            save_file(pieces, str(Path(path) / f"ema_rank{self.rank}.safetensors"))

    def load_state(self, path: str) -> int:
        """Inverse of `save_state`; returns the restored optimizer step (collective)."""
        from safetensors.torch import load_file

        load_path, client = self.engine.load_checkpoint(
            path,
            tag="learner",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not self.lora,
        )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed learner state under {path}")
        self.global_step = int(client["global_step"])
        torch.set_rng_state(client["torch_rng"])
        if self.ema is not None:
            saved = load_file(str(Path(path) / f"ema_rank{self.rank}.safetensors"))
            with torch.no_grad():
                for i, t in enumerate(self.ema.pieces()):
                    t.copy_(saved[str(i)])
        return self.global_step

    def parameter_checksum(self) -> float:
        """Sum of all weights (collective): ranks that agree on weights report the same number."""
        return float(sum(t.double().sum() for _, t in self.full_tensors(every_rank=True)))


@torch.no_grad()
def _blend(targets: list[torch.Tensor], sources: list[torch.Tensor], *, tau: float) -> None:
    """target <- tau * target + (1 - tau) * source, tensor by tensor, on this rank's own pieces: the EMA update
    (tau = pop.ema_tau) and the per-round reference (tau = 0)."""
    if len(targets) != len(sources):
        raise RuntimeError(f"{len(targets)} target tensors for {len(sources)} source tensors")
    for t, s in zip(targets, sources):
        t.mul_(tau).add_(s.to(t.device, t.dtype), alpha=1 - tau)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


@contextlib.contextmanager
def _partitioned_loading(ds_config: dict | None) -> Iterator[None]:
    """Under ZeRO-3, `from_pretrained` loads straight into partitions (HF's DeepSpeed integration, deepspeed.zero.Init):
    no rank ever holds a full copy of the policy, the reference or the EMA target."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)  # HF reads it through a weak reference while it is alive
    try:
        yield
    finally:
        del keep


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


def _batch_sizes(cfg: OmniRayConfig, world_size: int) -> dict[str, int]:
    """DeepSpeed's three batch numbers, consistent with each other. The step boundary is ours (unmanaged gradient
    accumulation: every `engine.step()` is one), so they only describe the nominal split."""
    lc = cfg.learner
    share = max(1, lc.batch_size // world_size)
    micro = min(lc.micro_batch_size or share, share)
    accumulation = math.ceil(share / micro)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
    }


def _precision(cfg: OmniRayConfig) -> dict:
    return {"bf16": {"enabled": cfg.model.dtype == "bfloat16"}, "fp16": {"enabled": cfg.model.dtype == "float16"}}


def _ds_config(cfg: OmniRayConfig, world_size: int) -> dict:
    lc = cfg.learner
    zero: dict[str, Any] = {"stage": lc.zero_stage}
    if lc.lora.rank > 0 and lc.zero_stage == 3:
        # The EMA adapter lives in the policy engine; its partitions must be its only copy (see _frozen_ds_config).
        zero["stage3_param_persistence_threshold"] = 0
    return {
        **_batch_sizes(cfg, world_size),
        "managed_gradient_accumulation": False,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": zero,
        # A client torch AdamW: DeepSpeed's fused CPU Adam JIT-compiles for ~40 s on a cold machine.
        "zero_allow_untested_optimizer": True,
        **_precision(cfg),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _frozen_ds_config(cfg: OmniRayConfig, world_size: int) -> dict:
    """ZeRO-3 inference engine of the reference / EMA target; `learner.ref_offload` keeps its partitions on CPU."""
    offload = {"offload_param": {"device": "cpu", "pin_memory": True}} if cfg.learner.ref_offload else {}
    return {
        **_batch_sizes(cfg, world_size),
        # No parameter stays gathered between forwards: each one's partition is then the only copy, which is what
        # the EMA update and the per-round reference copy write (`_blend`).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **offload},
        **_precision(cfg),
        "steps_per_print": 10**9,
    }
