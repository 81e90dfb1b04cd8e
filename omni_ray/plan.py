"""A memory plan per role and GPU: whether a config fits on its GPUs, said before anything is launched.

`plan_memory(cfg)` turns a config and the architecture of its models into named byte counts per GPU and phase;
`check_fits(cfg)` raises `PlanError` when a GPU cannot hold its peak; `format_plan(plan)` is the table a user reads.
Pure arithmetic (no torch at import, no GPU): a GPU config is checked on a laptop. docs/gpu.md ("Memory plan") says
what every term is, where each number comes from, and how the measured terms were calibrated.

Phases. Memory on a GPU is the sum of what is alive at the same time, so each GPU is planned per phase and its peak
is the largest phase total:
- a learner rank: "logits backward" (every saved activation, the response logits and their gradients),
  "layer backward" (with checkpointing: the recomputed layer and its gradients), "gradient reduction" (ZeRO-0/1:
  the gradient bucket), "optimizer step" (the float32 gradients the optimizer steps, AdamW's temporaries); each on
  top of what the rank always holds (weights, gradients, optimizer state, reference and EMA target, DeepSpeed's
  buffers);
- a vLLM engine: "generate" (vLLM takes `rollout.gpu_memory_utilization` of the GPU: weights, its profiled peak
  activation and CUDA graphs; the KV cache gets the rest, and must hold one `max_model_len` sequence at least);
- colocated (`placement.colocate`): "start-up" (the engine is awake when the learner is built), "generate" (the
  learner's states offloaded, the frozen reference / EMA stay), "train: ..." (each learner phase, the engine
  asleep);
- the scoring actor's GPU: reward-model weights and one scoring batch.

The activation and logits terms were measured (benchmarks/learner_memory.py --calibrate, docs/gpu.md); DeepSpeed's
and vLLM's buffers are their documented defaults, which omni-ray's configs leave as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_ray.config import OmniRayConfig
from omni_ray.placement import plan_placement, uses_gpus

GIB = 1 << 30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# DeepSpeed ZeRO defaults (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig; the learner's DeepSpeed config sets
# only the stage): elements, not bytes.
REDUCE_BUCKET_SIZE = 500_000_000  # gradient bucket (contiguous_gradients): resident under ZeRO-3
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000  # gathered ZeRO-3 parameters kept before releasing
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000
SUB_GROUP_SIZE = 1_000_000_000  # ZeRO-3 steps the optimizer one sub-group of its partition at a time
# ZeRO-0's buffered all-reduce flattens gradients into buffers of this many elements (deepspeed/runtime/constants.py).
MEMORY_OPT_ALLREDUCE_SIZE = 500_000_000

# vLLM's offline (`LLM` class) scheduler defaults on a >= 70 GiB GPU that is not an A100 (vllm/engine/arg_utils.py,
# `_get_default_max_num_batched_tokens_and_seqs`): the sizes of its start-up profile run.
VLLM_MAX_NUM_BATCHED_TOKENS = 16384
VLLM_MAX_NUM_SEQS = 1024

#: Per process on a GPU: CUDA context, cuBLAS and NCCL workspaces (an allowance; no GPU was there to measure it).
RUNTIME_BYTES = 1 * GIB
#: vLLM's CUDA graphs (inside its gpu_memory_utilization budget, kept while it sleeps); 0 with enforce_eager=true.
CUDA_GRAPH_BYTES = 1 * GIB
#: A GPU whose peak passes this share of the card fits, but tightly (allocator fragmentation is not planned).
TIGHT_SHARE = 0.95

# Measured on CPU (docs/gpu.md, calibration): model-dtype tensors the size of the response logits alive at the
# logits' backward (the logits, their gradient, the gradient of one chunk being added to it), and float32 chunks of
# the selective log-softmax alive at once (one in float32; a low-precision model adds its float32 copy).
LOGITS_TENSORS = 3
LOG_SOFTMAX_CHUNKS = {4: 1, 2: 2}
# Gradients in flight while a decoder layer is differentiated, as a share of the bytes the layer saved (measured).
LAYER_BACKWARD_SHARE = 0.35
# A no-grad forward (a reward model's scoring batch; the estimate of vLLM's profile run) holds, per token, about 8
# hidden-sized values (residual, norm, rotary and attention temporaries) and 3 MLP-sized ones (gate, up, their
# product) at its peak, in the model dtype (measured in float32 and bfloat16, docs/gpu.md).
INFERENCE_HIDDEN, INFERENCE_INTERMEDIATE = 8, 3


class PlanError(ValueError):
    """A config asks for GPUs it cannot fit on, or a model's architecture cannot be found."""


# ---------------------------------------------------------------------------------------------------------------------
# model architectures


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers memory depends on (HF config names in brackets).

    layers [num_hidden_layers], hidden [hidden_size], intermediate [intermediate_size], heads [num_attention_heads],
    kv_heads [num_key_value_heads], head_dim, vocab [vocab_size], tied_embeddings [tie_word_embeddings],
    max_positions [max_position_embeddings]. norms_per_layer: 2 (Llama, Qwen2), 4 (Gemma-2); norm_float32_scale:
    the RMSNorm applies its weight in float32 (Gemma), so it keeps a float32 normalised copy. qkv_bias: Qwen2.
    final_logit_softcap: Gemma-2's tanh cap on the logits (one more logits-sized tensor). lm_head: False for a
    sequence classifier (a reward model: no vocabulary projection); extra_params: heads beyond the decoder.
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int
    norms_per_layer: int = 2
    norm_float32_scale: bool = False
    qkv_bias: bool = False
    final_logit_softcap: bool = False
    lm_head: bool = True
    extra_params: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        attention = 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        return attention + bias + 3 * self.hidden * self.intermediate + self.norms_per_layer * self.hidden

    @property
    def params(self) -> int:
        """Parameters of the model as HF builds it (a tied LM head is the embedding, counted once)."""
        embedding = self.vocab * self.hidden
        head = embedding if self.lm_head and not self.tied_embeddings else 0
        return self.layers * self.layer_params + embedding + head + self.hidden + self.extra_params

    @property
    def largest_param(self) -> int:
        return max(self.vocab * self.hidden, self.intermediate * self.hidden, self.q_dim * self.hidden)

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        """Parameters of rank-`rank` LoRA adapters on the named projections of every layer (empty: all seven, the
        learner's default): rank x (inputs + outputs) each."""
        shapes = {"q_proj": (self.hidden, self.q_dim), "k_proj": (self.hidden, self.kv_dim),
                  "v_proj": (self.hidden, self.kv_dim), "o_proj": (self.q_dim, self.hidden),
                  "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
                  "down_proj": (self.intermediate, self.hidden)}  # fmt: skip
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise PlanError(f"learner.lora.target_modules: the plan knows {sorted(shapes)}, not {unknown}")
        return self.layers * sum(rank * sum(shapes[t]) for t in (targets or shapes))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """vLLM's KV cache per token: a key and a value per layer and kv head."""
        return 2 * self.layers * self.kv_dim * dtype_bytes

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a `transformers` config (a multimodal config's text part)."""
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = str(getattr(c, "model_type", ""))
        heads = int(c.num_attention_heads)
        archs = list(getattr(config, "architectures", None) or [])
        classifier = bool(archs) and not any(a.endswith("ForCausalLM") for a in archs)
        hidden = int(c.hidden_size)
        return cls(
            layers=int(c.num_hidden_layers),
            hidden=hidden,
            intermediate=int(c.intermediate_size),
            heads=heads,
            kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(c, "head_dim", None) or hidden // heads),
            vocab=int(c.vocab_size),
            tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            max_positions=int(getattr(c, "max_position_embeddings", 0) or 0),
            norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
            norm_float32_scale=model_type.startswith("gemma"),
            qkv_bias=bool(getattr(c, "attention_bias", False)) or model_type == "qwen2",
            final_logit_softcap=getattr(c, "final_logit_softcapping", None) is not None,
            lm_head=not classifier,
            extra_params=int(getattr(config, "num_labels", 1)) * hidden if classifier else 0,
        )


# The models the shipped configs name, so `plan` runs where they were never downloaded. Each from the repo's
# config.json on the Hugging Face Hub (https://huggingface.co/<name>/blob/main/config.json).
KNOWN_MODELS: dict[str, ModelShape] = {
    # gemma-2-9b-it config.json (quoted in full in vllm-project/vllm#10548): 42 layers, hidden 3584, intermediate
    # 14336, 16 heads, 8 kv heads, head_dim 256, vocab 256000, 8192 positions, final_logit_softcapping 30, tied
    # embeddings (Gemma2Config's default; config.json does not override it). 9,241,705,984 parameters.
    "google/gemma-2-9b-it": ModelShape(
        42,
        3584,
        14336,
        16,
        8,
        256,
        256000,
        True,
        8192,
        norms_per_layer=4,
        norm_float32_scale=True,
        final_logit_softcap=True,
    ),  # fmt: skip
    # Qwen2.5-Math-7B config.json (the same numbers in Lightning-AI/litgpt's config table, which cites it): 28
    # layers, hidden 3584, intermediate 18944, 28 heads, 4 kv heads, vocab 152064 (padded), 4096 positions, q/k/v
    # biases (Qwen2), untied. 7,615,616,512 parameters.
    "Qwen/Qwen2.5-Math-7B": ModelShape(28, 3584, 18944, 28, 4, 128, 152064, False, 4096, qkv_bias=True),
    # Meta-Llama-3-8B-Instruct config.json: 32 layers, hidden 4096, intermediate 14336, 32 heads, 8 kv heads, vocab
    # 128256, 8192 positions, untied. 8,030,261,248 parameters.
    "meta-llama/Meta-Llama-3-8B-Instruct": ModelShape(32, 4096, 14336, 32, 8, 128, 128256, False, 8192),
    # ArmoRM-Llama3-8B-v0.1 (arXiv 2406.12845; config.json: LlamaForRewardModelWithGating): the Llama-3-8B decoder
    # without an LM head, a 19-objective regression layer (19 x 4096, no bias), a 19 x 19 reward transform and a
    # gating network 4096 -> 1024 -> 1024 -> 1024 -> 19 (gating_hidden_dim 1024, gating_n_hidden 3).
    "RLHFlow/ArmoRM-Llama3-8B-v0.1": ModelShape(
        32,
        4096,
        14336,
        32,
        8,
        128,
        128256,
        False,
        8192,
        lm_head=False,
        extra_params=19 * 4096 + 19 * 19 + (4096 + 1) * 1024 + 2 * (1024 + 1) * 1024 + 1024 * 19,
    ),  # fmt: skip
}


def model_shape(path_or_name: str, trust_remote_code: bool = False) -> ModelShape:
    """The architecture of a model: its local dir's config.json, else the known models above, else the local HF
    cache (offline: nothing is downloaded). Raises PlanError naming the model when none of them has it."""
    local = Path(path_or_name).expanduser()
    if (local / "config.json").is_file():
        return ModelShape.from_config(_auto_config(str(local), trust_remote_code))
    if path_or_name in KNOWN_MODELS:
        return KNOWN_MODELS[path_or_name]
    try:
        return ModelShape.from_config(_auto_config(path_or_name, trust_remote_code))
    except (OSError, ValueError) as exc:
        known = ", ".join(KNOWN_MODELS)
        raise PlanError(
            f"model {path_or_name!r}: no config.json in a local dir of that name, not in the local Hugging Face cache, "
            f"and not one of the models the plan knows ({known}). Download its config first "
            f"(`huggingface-cli download {path_or_name} config.json`) or point model.path at a local model dir "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _auto_config(name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------------------------------
# terms, phases, plans


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class Phase:
    """What is alive on one GPU at the same time during one part of the work."""

    name: str
    terms: tuple[Term, ...]

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)


@dataclass(frozen=True)
class GpuPlan:
    """One role's (or a colocated pair's) GPUs, all planned alike. `problems`: what fails besides the total (a KV
    cache that cannot hold one sequence)."""

    role: str
    gpus: tuple[int, ...]
    phases: tuple[Phase, ...]
    capacity: int
    problems: tuple[str, ...] = ()

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.capacity and not self.problems

    @property
    def verdict(self) -> str:
        if not self.fits:
            return "does not fit"
        return "fits (tight)" if self.peak.total > TIGHT_SHARE * self.capacity else "fits"

    @property
    def gpu_label(self) -> str:
        return _span(self.gpus)


@dataclass(frozen=True)
class MemoryPlan:
    """Every GPU of a config; `suggestion`: the config change (dotlist overrides) that first made every GPU fit,
    None when the plan fits or no change tried did."""

    gpus: tuple[GpuPlan, ...]
    gpu_mem_gib: float
    suggestion: str | None = None

    @property
    def fits(self) -> bool:
        return all(g.fits for g in self.gpus)

    @property
    def largest_term(self) -> tuple[GpuPlan, Phase, Term] | None:
        """The largest term of the fullest GPU's peak phase (among the GPUs that do not fit, when some do not)."""
        pool = [g for g in self.gpus if not g.fits] or list(self.gpus)
        if not pool:
            return None
        g = max(pool, key=lambda x: x.peak.total / x.capacity)
        return g, g.peak, g.peak.largest


def _span(items: Sequence[int]) -> str:
    if not items:
        return "-"
    return str(items[0]) if len(items) == 1 else f"{items[0]}-{items[-1]}"


def _terms(pairs: Iterable[tuple[str, float]]) -> tuple[Term, ...]:
    return tuple(Term(name, int(b)) for name, b in pairs if b > 0)


# ---------------------------------------------------------------------------------------------------------------------
# the learner


@dataclass(frozen=True)
class StepShape:
    """A micro-batch's tensors: `sequences` rows (2 per pair: chosen and rejected) padded to `width` positions, of
    which the last `response` are response positions (the only ones that get logits)."""

    sequences: int
    width: int
    response: int

    @property
    def tokens(self) -> int:
        return self.sequences * self.width


def norm_bytes(shape: ModelShape, dtype_bytes: int, outputs: int) -> int:
    """Bytes per token that a layer's RMSNorms keep for the backward: each its float32 input copy and its normalised
    value (float32 where the weight is applied in float32), and the output of the `outputs` norms whose output feeds
    a projection (the others' output goes into the residual sum, which keeps nothing)."""
    normalised = 4 if shape.norm_float32_scale else dtype_bytes
    return (shape.norms_per_layer * (4 + normalised) + outputs * dtype_bytes) * shape.hidden


def layer_activation_bytes(shape: ModelShape, dtype_bytes: int, width: int) -> int:
    """Bytes one decoder layer saves for its backward, per token (HF's Llama / Qwen2 / Gemma-2 layers, SDPA).

    The norms (`norm_bytes`; two feed projections); attention keeps the rotated queries, keys and values (repeated
    to all heads: a padding mask rules out SDPA's grouped-query path) and its output, plus its mask (`width` bytes
    per query row, as the model dtype); the MLP keeps gate, up, the activation and their product.
    """
    d = dtype_bytes
    attention = 4 * d * shape.q_dim + d * width
    mlp = 4 * d * shape.intermediate
    return norm_bytes(shape, d, outputs=2) + attention + mlp


def activation_phases(shape: ModelShape, step: StepShape, dtype_bytes: int, checkpointing: bool) -> list[Phase]:
    """The two peaks of one micro-batch's forward and backward, beyond what the rank always holds.

    "logits backward": what the forward saved (every layer, or with checkpointing each layer's input), the final
    norm, the response logits and their gradients, one chunk of the selective log-softmax (models/logprobs.py).
    "layer backward": the logits are gone; a decoder layer is differentiated (with checkpointing: recomputed first):
    its saved tensors and the gradients in flight, a measured share of a layer's saved bytes.
    """
    from omni_ray.models.logprobs import LOGITS_CHUNK_BYTES

    d = dtype_bytes
    layer = layer_activation_bytes(shape, d, step.width) * step.tokens
    saved = shape.layers * d * shape.hidden * step.tokens if checkpointing else shape.layers * layer
    final_norm = norm_bytes(dataclasses.replace(shape, norms_per_layer=1), d, outputs=1) * step.tokens
    logits = step.sequences * (step.response + 1) * shape.vocab * d
    capped = logits if shape.final_logit_softcap else 0  # the cap's tanh keeps its output next to the logits
    chunk_rows = min(step.response + 1, max(1, LOGITS_CHUNK_BYTES // (4 * shape.vocab)))
    chunk = LOG_SOFTMAX_CHUNKS[d] * 4 * chunk_rows * shape.vocab
    label = "checkpointed inputs" if checkpointing else "activations"
    logits_phase = Phase(
        "logits backward",
        _terms([(label, saved + final_norm), ("logits", logits + capped),
                ("logits grad", (LOGITS_TENSORS - 1) * logits), ("log-softmax chunk", chunk)]),
    )  # fmt: skip
    layer_phase = Phase(
        "layer backward",
        _terms([(label, saved), ("recomputed layer", layer if checkpointing else 0),
                ("layer grads", LAYER_BACKWARD_SHARE * layer)]),
    )  # fmt: skip
    return [logits_phase, layer_phase]


def inference_bytes(shape: ModelShape, dtype_bytes: int, tokens: int, sequences: int, width: int) -> int:
    """Peak of a no-grad forward beyond the weights: its measured live set per token plus the attention mask."""
    per_token = dtype_bytes * (INFERENCE_HIDDEN * shape.hidden + INFERENCE_INTERMEDIATE * shape.intermediate)
    return per_token * tokens + sequences * width * width


def learner_step_shape(cfg: OmniRayConfig) -> StepShape:
    """The largest micro-batch a rank runs: `learner.micro_batch_size` pairs (0: its whole share), cut further by
    `learner.max_tokens_per_micro_batch`, each pair padded to the longest prompt and response the config allows."""
    lc, data = cfg.learner, cfg.data
    response = data.max_response_tokens if data.source == "preferences" else cfg.rollout.max_new_tokens
    width = data.max_prompt_tokens + response
    share = max(1, lc.batch_size // lc.num_workers)
    pairs = min(lc.micro_batch_size or share, share)
    if lc.max_tokens_per_micro_batch > 0:
        pairs = min(pairs, max(1, lc.max_tokens_per_micro_batch // (2 * width)))
    return StepShape(2 * pairs, width, response)


def _loss_needs(cfg: OmniRayConfig) -> tuple[bool, bool]:
    """(reference, EMA target) the loss makes the learner hold."""
    from omni_ray.learner.objective import LOSS_REGISTRY

    spec = LOSS_REGISTRY[cfg.loss.name]
    return spec.uses_reference, spec.uses_pop and cfg.pop.target == "ema"


def trained_params(cfg: OmniRayConfig, shape: ModelShape) -> int:
    """The parameters the optimizer steps: the whole model, or with LoRA the adapters alone."""
    lora = cfg.learner.lora
    return shape.lora_params(lora.rank, lora.target_modules) if lora.rank else shape.params


def learner_resting(cfg: OmniRayConfig, shape: ModelShape) -> list[tuple[str, float]]:
    """What a learner rank holds on its GPU throughout a step: (name, bytes). With LoRA the base model is frozen:
    gradients and optimizer state are the adapter's, the reference is the base model itself (adapters off) and the
    EMA target a second adapter."""
    lc = cfg.learner
    d, n, stage = DTYPE_BYTES[cfg.model.dtype], lc.num_workers, lc.zero_stage
    psi = trained_params(cfg, shape)
    mixed = d < 4
    # Mixed precision: a float32 master copy and two float32 moments (ZeRO-0's FP16_UnfusedOptimizer keeps them
    # whole); float32 training: ZeRO-1..3 still keep their own float32 partition, plain ZeRO-0 AdamW only moments.
    optimizer = 12 * psi / (n if stage >= 1 else 1) if mixed or stage >= 1 else 8 * psi
    params = (shape.params + (psi if lc.lora.rank else 0)) * d / (n if stage == 3 else 1)
    grads = psi * d / (n if stage >= 2 else 1)
    uses_ref, uses_ema = _loss_needs(cfg)
    frozen = 0.0 if lc.ref_offload else psi * d / (n if stage == 3 else 1)
    if lc.lora.rank:
        uses_ref = False  # the base model is the reference: no copy
    return [
        ("params", params),
        ("grads", grads),
        ("optimizer", optimizer),
        ("reference", frozen if uses_ref else 0.0),
        ("ema", frozen if uses_ema else 0.0),
        ("zero-3 grad bucket", REDUCE_BUCKET_SIZE * d if stage == 3 else 0.0),
        ("runtime", RUNTIME_BYTES),
    ]


def learner_phases(cfg: OmniRayConfig, shape: ModelShape) -> list[Phase]:
    """Every phase of a learner rank's step, each with the rank's resting terms."""
    lc = cfg.learner
    d, n, stage = DTYPE_BYTES[cfg.model.dtype], lc.num_workers, lc.zero_stage
    psi = shape.params
    stepped_params = trained_params(cfg, shape)
    resting = learner_resting(cfg, shape)
    zero3 = []
    if stage == 3:  # gathered parameters (at most max_live + a prefetch bucket) and the largest one's full gradient
        gathered = min(psi, STAGE3_MAX_LIVE_PARAMETERS + STAGE3_PREFETCH_BUCKET_SIZE) + shape.largest_param
        zero3 = [("zero-3 gather", gathered * d)]
    stage2 = [("zero-2 grad bucket", REDUCE_BUCKET_SIZE * d)] if stage == 2 else []
    phases = []
    for p in activation_phases(shape, learner_step_shape(cfg), d, lc.gradient_checkpointing):
        phases.append(Phase(p.name, _terms([*resting, *zero3, *stage2, *((t.name, t.bytes) for t in p.terms)])))
    if stage <= 1:
        bucket = min(stepped_params, MEMORY_OPT_ALLREDUCE_SIZE) if stage == 0 else REDUCE_BUCKET_SIZE
        phases.append(Phase("gradient reduction", _terms([*resting, ("grad bucket", bucket * d)])))
    # The optimizer steps float32 tensors: all parameters (ZeRO-0), the rank's flat partition (1, 2), one sub-group
    # of it at a time (3). Their float32 gradient is a copy under mixed precision, and torch's multi-tensor AdamW
    # (its default on GPU) keeps one float32 temporary of them.
    stepped = (
        stepped_params if stage == 0 else stepped_params / n if stage < 3 else min(stepped_params / n, SUB_GROUP_SIZE)
    )
    fp32_grads = 4 * stepped if d < 4 else 0.0
    phases.append(Phase("optimizer step", _terms([*resting, ("fp32 grads", fp32_grads),
                                                  ("adam temporaries", 4 * stepped)])))  # fmt: skip
    if (
        lc.ref_offload and stage < 3 and not lc.lora.rank and any(_loss_needs(cfg))
    ):  # the offloaded copy visits the GPU for its forward
        step = learner_step_shape(cfg)
        logits = step.sequences * (step.response + 1) * shape.vocab * d
        phases.append(Phase("reference forward", _terms([*resting, ("frozen model on GPU", psi * d),
                                                         ("logits", logits)])))  # fmt: skip
    return phases


# ---------------------------------------------------------------------------------------------------------------------
# vLLM engines, the scorer


def max_model_len(cfg: OmniRayConfig) -> int:
    """The engines' context: rollout.max_model_len, else the tiny model's positions (the driver's rule)."""
    return cfg.rollout.max_model_len or cfg.model.tiny.max_position_embeddings


def engine_terms(cfg: OmniRayConfig, shape: ModelShape, capacity: int) -> tuple[list[tuple[str, float]], list[str]]:
    """One vLLM worker's GPU (a TP shard): its budget split into weights, profile activations, CUDA graphs and the
    KV cache (the rest), plus the process' runtime outside the budget; and the problems found."""
    rc = cfg.rollout
    d, tp = DTYPE_BYTES[cfg.model.dtype], rc.tensor_parallel_size
    budget = rc.gpu_memory_utilization * capacity
    weights = shape.params * d / tp
    forward = VLLM_MAX_NUM_BATCHED_TOKENS * d * (INFERENCE_HIDDEN * shape.hidden
                                                 + INFERENCE_INTERMEDIATE * shape.intermediate) / tp  # fmt: skip
    sampler = VLLM_MAX_NUM_SEQS * shape.vocab * 16  # float32 logits and probabilities, int64 sort indices
    graphs = 0 if rc.enforce_eager == "true" else CUDA_GRAPH_BYTES
    kv = budget - weights - forward - sampler - graphs
    context = max_model_len(cfg)
    one_sequence = shape.kv_bytes_per_token(d) / min(tp, shape.kv_heads) * context
    problems = []
    if kv < one_sequence:
        problems.append(
            f"rollout.gpu_memory_utilization={rc.gpu_memory_utilization}: vLLM's budget of {budget / GIB:.1f} GiB "
            f"leaves {max(kv, 0) / GIB:.1f} GiB of KV cache after weights ({weights / GIB:.1f}) and activations "
            f"({(forward + sampler + graphs) / GIB:.1f}); one max_model_len={context} sequence needs "
            f"{one_sequence / GIB:.2f} GiB"
        )
    if shape.max_positions and context > shape.max_positions:
        problems.append(f"rollout.max_model_len={context} exceeds the model's {shape.max_positions} positions")
    terms = [("engine weights", weights), ("engine activations", forward + sampler), ("cuda graphs", graphs),
             ("kv cache", max(kv, 0.0)), ("engine runtime", RUNTIME_BYTES)]  # fmt: skip
    return terms, problems


def scoring_terms(cfg: OmniRayConfig) -> list[tuple[str, float]]:
    """The scoring actor's GPU: each reward model's weights (model.dtype) and one scoring batch's forward."""
    from omni_ray.scoring.reward_model import RewardModelScorer

    default_batch = inspect.signature(RewardModelScorer).parameters["batch_size"].default
    d = DTYPE_BYTES[cfg.model.dtype]
    width = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    out: list[tuple[str, float]] = []
    for i, spec in enumerate(cfg.scoring.scorers):
        if spec.type != "reward_model":
            continue
        shape = model_shape(spec.path, cfg.model.trust_remote_code)
        batch = spec.batch_size or default_batch
        out.append((f"scorer {i} weights", shape.params * d))
        out.append((f"scorer {i} batch", inference_bytes(shape, d, batch * width, batch, width)))
    out.append(("runtime", RUNTIME_BYTES))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the plan


def _gpu_plans(cfg: OmniRayConfig, capacity: int) -> list[GpuPlan]:
    placement = plan_placement(cfg)  # the layout's own rules (raise ConfigError)
    rc, lc = cfg.rollout, cfg.learner
    shape = model_shape(cfg.model.path, cfg.model.trust_remote_code)
    tp = placement.tensor_parallel_size
    plans: list[GpuPlan] = []
    next_gpu = 0

    def take(count: int) -> tuple[int, ...]:
        nonlocal next_gpu
        gpus = tuple(range(next_gpu, next_gpu + count))
        next_gpu += count
        return gpus

    if placement.colocated:
        engine, problems = engine_terms(cfg, shape, capacity)
        resting = learner_resting(cfg, shape)
        offloaded = [(name, b) for name, b in resting if name in ("reference", "ema", "runtime")]
        asleep = [("engine runtime", RUNTIME_BYTES), ("cuda graphs", dict(engine)["cuda graphs"])]
        phases = [Phase("start-up", _terms([*engine, *resting])), Phase("generate", _terms([*engine, *offloaded]))]
        for p in learner_phases(cfg, shape):
            phases.append(Phase(f"train: {p.name}", _terms([*((t.name, t.bytes) for t in p.terms), *asleep])))
        plans.append(GpuPlan(f"rollout engine {_span(range(rc.num_workers))} (TP {tp}) + learner rank "
                             f"{_span(range(lc.num_workers))}", take(lc.num_workers), tuple(phases), capacity,
                             tuple(problems)))  # fmt: skip
    else:
        if rc.num_gpus > 0:
            engine, problems = engine_terms(cfg, shape, capacity)
            per_gpu = max(1, round(1 / rc.num_gpus)) if tp == 1 else 1  # fractional GPUs: engines share a card
            phase = Phase("generate", _terms(engine * per_gpu))
            gpus = take(math.ceil(rc.num_workers * tp / per_gpu))
            plans.append(GpuPlan(f"rollout engine {_span(range(rc.num_workers))} (TP {tp})", gpus, (phase,),
                                 capacity, tuple(problems)))  # fmt: skip
        if lc.num_gpus > 0:
            per_gpu = max(1, round(1 / lc.num_gpus))
            phases = tuple(Phase(p.name, p.terms * per_gpu) for p in learner_phases(cfg, shape))
            plans.append(GpuPlan(f"learner rank {_span(range(lc.num_workers))}",
                                 take(math.ceil(lc.num_workers / per_gpu)), phases, capacity))  # fmt: skip
    if cfg.placement.scoring_num_gpus > 0:
        plans.append(GpuPlan("scoring", take(1), (Phase("score", _terms(scoring_terms(cfg))),), capacity))
    return plans


def _with(cfg: OmniRayConfig, changes: Sequence[tuple[str, Any]]) -> OmniRayConfig:
    out = copy.deepcopy(cfg)
    for key, value in changes:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return out


def _candidates(cfg: OmniRayConfig) -> list[tuple[str, Any]]:
    """Changes that lower a GPU's peak, in the order they are tried (the first that fits is suggested)."""
    lc, rc = cfg.learner, cfg.rollout
    out: list[tuple[str, Any]] = []
    if lc.num_gpus > 0 or cfg.placement.colocate:
        pairs = learner_step_shape(cfg).sequences // 2
        out += [("learner.micro_batch_size", k) for k in _halvings(pairs)]
        if not lc.gradient_checkpointing:
            out.append(("learner.gradient_checkpointing", True))
        if lc.zero_stage < 3:
            out.append(("learner.zero_stage", 3))
        if not lc.ref_offload and any(_loss_needs(cfg)):
            out.append(("learner.ref_offload", True))
    if rc.num_gpus > 0 or cfg.placement.colocate:
        steps = [round(0.95 - 0.05 * k, 2) for k in range(18)]
        out += [("rollout.gpu_memory_utilization", u) for u in steps if u != rc.gpu_memory_utilization]
    return out


def _halvings(n: int) -> list[int]:
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


def _suggest(cfg: OmniRayConfig, gpu_mem_gib: float) -> str | None:
    """The first single change that makes every GPU fit (not tightly); else the changes of each kind applied one
    after another (the largest micro-batch, checkpointing, ZeRO-3, offloading, the highest vLLM share that fits)
    until everything fits."""
    capacity = int(gpu_mem_gib * GIB)
    candidates = _candidates(cfg)

    def fits(changes: Sequence[tuple[str, Any]]) -> bool:  # with room to spare: a suggestion is never "tight"
        return all(g.verdict == "fits" for g in _gpu_plans(_with(cfg, changes), capacity))

    for change in candidates:
        if fits([change]):
            return _dotlist([change])
    options = {k: [c for c in candidates if c[0] == k] for k in dict.fromkeys(k for k, _ in candidates)}
    applied: list[tuple[str, Any]] = []
    for choices in options.values():
        applied.append(next((c for c in choices if fits([*applied, c])), choices[-1]))
        if fits(applied):
            break
    else:
        return None
    # Undo what the others made unnecessary, then take each kind's mildest value that still fits with the rest.
    for change in list(applied):
        if fits([c for c in applied if c is not change]):
            applied.remove(change)
    for i, (key, _) in enumerate(applied):
        applied[i] = next(c for c in options[key] if fits([*applied[:i], c, *applied[i + 1 :]]))
    return _dotlist(applied)


def _dotlist(changes: Sequence[tuple[str, Any]]) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes)


def plan_memory(cfg: OmniRayConfig, gpu_mem_gib: float = 80.0) -> MemoryPlan:
    """Per role and GPU, the bytes the config needs (empty for CPU-only configs), and a change that makes it fit
    when it does not."""
    if not uses_gpus(cfg):
        return MemoryPlan((), gpu_mem_gib)
    plans = tuple(_gpu_plans(cfg, int(gpu_mem_gib * GIB)))
    suggestion = None if all(g.fits for g in plans) else _suggest(cfg, gpu_mem_gib)
    return MemoryPlan(plans, gpu_mem_gib, suggestion)


def check_fits(cfg: OmniRayConfig, gpu_mem_gib: float = 80.0) -> None:
    """Raise PlanError naming each role that cannot fit and its numbers. Configs without GPUs are not planned."""
    if not uses_gpus(cfg):
        return
    plan = plan_memory(cfg, gpu_mem_gib)
    if plan.fits:
        return
    lines = []
    for g in plan.gpus:
        if g.fits:
            continue
        peak = g.peak
        top = sorted(peak.terms, key=lambda t: -t.bytes)[:4]
        lines.append(
            f"{g.role} (GPU {g.gpu_label}) needs {peak.total / GIB:.1f} GiB at its peak ({peak.name}) of "
            f"{gpu_mem_gib:g} GiB: " + ", ".join(f"{t.name} {t.gib:.1f}" for t in top)
        )
        lines += [f"{g.role}: {p}" for p in g.problems]
    hint = f"; try {plan.suggestion}" if plan.suggestion else "; no single change tried makes it fit"
    raise PlanError("the config does not fit its GPUs: " + "; ".join(lines) + hint + " (omni-ray plan shows all)")


def format_plan(plan: MemoryPlan, all_phases: bool = False, width: int = 100) -> str:
    """The table a user reads: per GPU group its peak phase (every phase with `all_phases`), each term in GiB, the
    total and the verdict; the terms wrap at `width` characters."""
    if not plan.gpus:
        return "no role asks for a GPU: nothing to plan"
    rows = [("GPU", "role", "phase", "terms (GiB)", "total GiB", "verdict")]
    for g in plan.gpus:
        for p in g.phases if all_phases else (g.peak,):
            peak = p is g.peak
            lines = textwrap.wrap(", ".join(f"{t.name} {t.gib:.1f}" for t in p.terms), width)
            name = p.name + (" *" if all_phases and peak else "")
            rows.append((g.gpu_label, g.role, name, lines[0], f"{p.total / GIB:.1f}", g.verdict if peak else ""))
            rows += [("", "", "", line, "", "") for line in lines[1:]]
        for problem in g.problems:
            lines = textwrap.wrap(problem, width)
            rows += [("", "", "problem" if i == 0 else "", line, "", "") for i, line in enumerate(lines)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"memory plan, {plan.gpu_mem_gib:g} GiB per GPU" + (" (* the peak phase)" if all_phases else "")]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    largest = plan.largest_term
    if largest is not None:
        g, p, t = largest
        out.append(f"largest term: {t.name} {t.gib:.1f} GiB ({g.role}, {p.name})")
    out.append("verdict: every GPU fits" if plan.fits else "verdict: does not fit")
    if plan.suggestion:
        out.append(f"suggestion: {plan.suggestion}")
    return "\n".join(out)


__all__ = [
    "GIB",
    "GpuPlan",
    "KNOWN_MODELS",
    "MemoryPlan",
    "ModelShape",
    "Phase",
    "PlanError",
    "StepShape",
    "Term",
    "activation_phases",
    "check_fits",
    "format_plan",
    "inference_bytes",
    "layer_activation_bytes",
    "learner_phases",
    "learner_resting",
    "learner_step_shape",
    "model_shape",
    "plan_memory",
]
