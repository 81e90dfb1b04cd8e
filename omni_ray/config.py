"""The whole system's configuration: OmegaConf structured config built from dataclasses.

`load_config(path, overrides)` merges, in order: the dataclass defaults, a YAML file, and `key=value` dotlist
overrides from the command line, then validates every value. Everything wrong is refused here, at load time, with
the key named; nothing is discovered mid-run:

- an unknown key (``loss.betta=2``) raises :class:`ConfigError` naming the key and the valid keys nearby;
- a wrong type (``loss.beta=abc``) raises naming the key and the expected type;
- a bad value (``loss.beta=0``, ``pop.label_noise=1.5``, ``rollout.num_workers=-1``) raises naming the key and the rule.

Value rules live next to each field as metadata (``gt``, ``ge``, ``le``, ``choices``), so a field and its rule are
read together and the validator is one loop.
"""

from __future__ import annotations

import difflib
import os
import re
import string
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


def _f(default: Any, *, help: str = "", **rules: Any) -> Any:
    """A dataclass field with a default, a one-line help text and validation rules (gt, ge, le, lt, choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


def _loss_names() -> tuple[str, ...]:
    """The registered losses (omni_ray/learner/objective.py); read when a config is validated, so loading the
    config module does not import torch."""
    from omni_ray.learner.objective import LOSSES

    return LOSSES


@dataclass
class RunConfig:
    name: str = _f("local_tiny", help="run directory name under output_dir")
    output_dir: str = _f("runs", help="parent of runs/<name>/")
    seed: int = _f(0, ge=0)
    rounds: int = _f(3, ge=1, help="online rounds: generate -> score -> pair -> PoP -> train -> sync")
    resume: str = _f("never", choices=("never", "auto"), help="auto: continue from the newest good checkpoint")
    save_checkpoints: bool = _f(True, help="write checkpoints/round_NNNN/ at the end of every round")
    keep_checkpoints: int = _f(2, ge=1, help="newest checkpoints kept; older ones are deleted after a good save")
    dump_rollouts: bool = _f(False, help="write every round's scored samples to rounds/round_NNNN/samples.jsonl")
    save_merged: bool = _f(False, help="LoRA: also write the merged model (HF layout) to checkpoints/*/merged/")


@dataclass
class TinyModelConfig:
    """The offline tiny Llama built by `omni-ray make-tiny` (sec. 5 of docs/methods.md: 2.4M params learn arith)."""

    hidden_size: int = _f(256, gt=0)
    num_layers: int = _f(4, gt=0)
    num_heads: int = _f(8, gt=0)
    num_kv_heads: int = _f(4, gt=0)
    intermediate_size: int = _f(512, gt=0)
    max_position_embeddings: int = _f(64, gt=0)
    sft_target_accuracy: float = _f(
        0.30,
        ge=0,
        le=1,
        help="warm-start SFT stops at the first held-out greedy check at or above this accuracy, while accuracy "
        "still rises (docs/methods.md sec. 5); 1: train sft_max_steps",
    )
    sft_max_steps: int = _f(1000, ge=0, help="warm-start SFT step cap; reaching it below the target logs a warning")
    sft_check_every: int = _f(10, gt=0, help="warm-start SFT steps between held-out accuracy checks (~2 steps' cost)")
    sft_lr: float = _f(1e-3, gt=0, help="warm-start SFT learning rate (AdamW, 50 warm-up steps, then constant)")
    sft_batch_size: int = _f(64, gt=0, help="warm-start SFT problems per step")


@dataclass
class ModelConfig:
    path: str = _f("models/tiny-arith", help="HF model dir (save_pretrained layout)")
    build_tiny_if_missing: bool = _f(True, help="run make-tiny when `path` does not exist")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    trust_remote_code: bool = _f(False, help="only true when you trust the model repo's code")


@dataclass
class DataConfig:
    source: str = _f(
        "task",
        choices=("task", "prompts", "preferences"),
        help="task: built-in arith prompts; prompts: online on a prompt dataset; preferences: offline scored pairs",
    )
    max_operand: int = _f(99, gt=0, help="arith: operands drawn from 0..max_operand")
    prompts_per_round: int = _f(512, gt=0)
    eval_prompts: int = _f(500, gt=0, help="held-out prompts, fixed by the seed, disjoint from training prompts")
    path: str = _f("", help="prompts / preferences: HF dataset name, dataset dir, .jsonl or .parquet")
    split: str = _f("train")
    subset: str = _f("", help="prompts / preferences: the dataset's subset (HF config name, e.g. gsm8k's main)")
    prompt_column: str = _f("prompt", help="prompts: the prompt column (a string or a chat message list)")
    answer_column: str = _f("", help="prompts: reference-answer column handed to the scorers (references=); optional")
    extra_columns: list[str] = _f([], help="prompts: more columns of each row handed to python / http scorers by name")
    eval_split: str = _f("", help="prompts: held-out split; empty: hold out eval_prompts rows of `split` by seed")
    max_prompt_tokens: int = _f(512, gt=0)
    max_response_tokens: int = _f(512, gt=0)
    on_overlong: str = _f("truncate", choices=("truncate", "skip"))
    on_bad_row: str = _f("raise", choices=("raise", "skip"), help="raise names the file and row; skip counts them")


@dataclass
class RolloutConfig:
    backend: str = _f("auto", choices=("auto", "vllm", "hf"), help="auto: vLLM when importable, else HF generate")
    num_workers: int = _f(1, ge=1)
    num_cpus: float = _f(1.0, gt=0)
    num_gpus: float = _f(0.0, ge=0)
    samples_per_prompt: int = _f(8, ge=2)
    temperature: float = _f(1.0, ge=0)
    top_p: float = _f(1.0, gt=0, le=1)
    max_new_tokens: int = _f(8, gt=0)
    timeout_s: float = _f(600.0, gt=0, help="a generate call that takes longer raises")
    max_retries: int = _f(2, ge=0, help="a worker that dies mid-call is restarted and its batch retried this often")
    tensor_parallel_size: int = _f(1, ge=1, help="GPUs per vLLM engine (one engine per worker); 1 on CPU")
    max_model_len: int = _f(0, ge=0, help="prompt + completion token budget; 0: model.tiny.max_position_embeddings")
    gpu_memory_utilization: float = _f(0.85, gt=0, le=1, help="vLLM on GPU: share of each GPU for weights + KV")
    enforce_eager: str = _f("auto", choices=("auto", "true", "false"), help="auto: eager on CPU, CUDA graphs on GPU")


@dataclass
class ScorerSpec:
    type: str = _f(
        "arith_verifier", choices=("arith_verifier", "math_verifier", "reward_model", "python", "http", "judge")
    )
    weight: float = _f(1.0, gt=0)
    path: str = _f("", help="reward_model: HF sequence-classification model dir; judge: HF causal LM dir")
    target: str = _f("", help="python: 'module:name' of a Scorer class or a function (prompts, responses) -> scores")
    scale_low: float = _f(0.0, help="the declared score scale; scores are mapped from it to scoring.rescale range")
    scale_high: float = _f(10.0)
    batch_size: int = _f(0, ge=0, help="items per request / forward / judge call; 0: the scorer's default")
    # http (omni_ray/scoring/remote.py): POST {"prompts": [...], "responses": [...]} -> {"scores": [...]}
    url: str = _f("", help="http: the endpoint (http:// or https://); redirects are refused, never followed")
    token_env: str = _f("", help="http: NAME of the env var holding a bearer token (the token never enters config)")
    timeout_s: float = _f(30.0, gt=0, help="http: per-request connect/read timeout")
    retries: int = _f(3, ge=0, help="http: retries after a failed request (connection error, timeout, 408/429/5xx)")
    backoff_s: float = _f(0.5, ge=0, help="http: first retry delay; doubles per retry, capped at backoff_max_s")
    backoff_max_s: float = _f(8.0, ge=0)
    correct_at: float | None = _f(None, help="a score (declared scale) at or above this counts as a correct answer")
    # judge (omni_ray/scoring/judge.py): rating prompt -> greedy generation -> first number on the declared scale
    template: str = _f("", help="judge: rating prompt with {prompt} / {response}; empty: the built-in template")
    backend: str = _f("auto", choices=("auto", "vllm", "hf"), help="judge: generation engine")
    max_new_tokens: int = _f(8, gt=0, help="judge: tokens generated per rating")
    max_model_len: int = _f(0, ge=0, help="judge: prompt + output token budget; 0: the model's max positions")
    chat_template: bool = _f(False, help="judge: wrap the rating prompt in the tokenizer's chat template")


@dataclass
class ScoringConfig:
    scorers: list[ScorerSpec] = field(default_factory=lambda: [ScorerSpec()])
    rescale: str = _f("declared", choices=("none", "declared", "per_round"), help="how scores reach the loss scale")
    rescale_low: float = _f(0.0)
    rescale_high: float = _f(10.0)
    num_cpus: float = _f(0.25, gt=0)
    timeout_s: float = _f(300.0, gt=0)
    max_retries: int = _f(2, ge=0, help="a scoring actor that dies mid-call is restarted and the batch retried")


@dataclass
class PairsConfig:
    strategy: str = _f("best_worst", choices=("best_worst", "best_random", "math"))
    min_gap: float = _f(0.0, ge=0, help="pairs whose score gap is below this are dropped and counted")
    good_threshold: float = _f(6.0, help="math rule: chosen needs a score above this")
    swap_prob: float = _f(0.0, ge=0, le=1, help="null control: swap chosen and rejected with this probability")


@dataclass
class PopConfig:
    """PoP margins (arXiv 2509.22851); used when loss.name is pop or omni_pop."""

    target: str = _f("ema", choices=("ema", "fixed", "bt"), help="where the weak pair's margin comes from")
    strategy: str = _f("iterative", choices=("iterative", "random"))
    k: int = _f(1, ge=1, help="PoP comparisons per pair")
    label_noise: float = _f(0.0, ge=0, le=1, help="probability a PoP label is flipped")
    m_min: float = _f(0.0, help="clip bounds of the margin, in the units of the loss's log-prob convention")
    m_max: float = _f(10.0)
    ema_tau: float = _f(0.99, ge=0, le=1, help="theta_ema <- tau*theta_ema + (1-tau)*theta after each step")
    num_cpus: float = _f(0.25, gt=0)
    labels: str = _f("gap", choices=("gap", "judge"), help="who says which pair is stronger: score gaps or an LLM")
    judge_path: str = _f("", help="labels=judge: HF causal LM dir of the PoP judge")
    judge_backend: str = _f("auto", choices=("auto", "vllm", "hf"))
    judge_template: str = _f("", help="labels=judge: {prompt_a} {chosen_a} {rejected_a} + _b fields; empty: built-in")
    judge_choices: list[str] = _f(["A", "B"], help="labels=judge: the two answers naming the first / second pair")
    judge_max_new_tokens: int = _f(4, gt=0)
    judge_max_model_len: int = _f(0, ge=0, help="labels=judge: token budget; 0: the model's max positions")
    judge_batch_size: int = _f(64, gt=0)
    judge_both_orders: bool = _f(False, help="ask with both pair orders; disagreeing verdicts count as no label")
    timeout_s: float = _f(300.0, gt=0, help="a PoP estimator call (judge labels included) that takes longer raises")
    max_retries: int = _f(2, ge=0, help="a PoP estimator that dies mid-call is restarted and the call retried")


@dataclass
class LossConfig:
    name: str = _f("omni_pop", choices=_loss_names, help="the objective (docs/methods.md sec. 1-3)")
    beta: float = _f(2.0, gt=0, help="inverse temperature of the implicit reward (log-ratio scale)")
    eta: float = _f(0.7, ge=0, help="Omni-DPO quality weight sharpness")
    gamma: float = _f(3.0, ge=0, help="Omni-DPO focal exponent of the performance weight")
    tau_ref: float = _f(1.0, help="Omni-DPO performance-weight offset")
    lam: float = _f(0.2, ge=0, help="calibrated NLL coefficient")
    tau_good: float = _f(8.0, help="calibrated NLL applies to chosen responses scored at least this")
    label_smoothing: float = _f(0.0, ge=0, le=0.5, help="cDPO epsilon")
    simpo_gamma: float = _f(0.5, help="SimPO target margin")
    margin: float = _f(0.0, help="margin_dpo fixed margin (used when margin_source=fixed)")
    margin_source: str = _f("fixed", choices=("fixed", "score_gap"), help="margin_dpo margin: fixed or S_w - S_l")
    odpo_alpha: float = _f(1.0, gt=0)
    detach_perf_weight: bool = _f(False)
    rpo_alpha: float = _f(1.0, ge=0, help="rpo: weight of the chosen response's length-normalised NLL added to DPO")
    logprobs: str = _f(
        "auto", choices=("auto", "sum", "mean"), help="sequence log-prob L(y) or l(y)=L(y)/|y|; auto: the paper's"
    )


@dataclass
class LoraConfig:
    """LoRA adapters through peft (omni_ray/models/adapters.py); rank 0 trains every weight."""

    rank: int = _f(0, ge=0, help="adapter rank; 0: full fine-tuning")
    alpha: float = _f(16.0, gt=0, help="scaling alpha / rank of the adapter's update")
    dropout: float = _f(0.0, ge=0, lt=1)
    target_modules: list[str] = _f(
        [], help="module names to adapt (e.g. [q_proj, v_proj]); empty: every linear projection of the decoder layers"
    )


@dataclass
class LearnerConfig:
    num_workers: int = _f(2, ge=1, help="DeepSpeed ranks")
    num_cpus: float = _f(0.5, gt=0)
    num_gpus: float = _f(0.0, ge=0)
    zero_stage: int = _f(1, ge=0, le=3)
    lr: float = _f(3e-5, gt=0)
    weight_decay: float = _f(0.0, ge=0)
    scheduler: str = _f("constant", choices=("constant", "cosine"))
    warmup_ratio: float = _f(0.0, ge=0, le=1)
    epochs: int = _f(2, ge=1, help="passes over a round's pairs")
    batch_size: int = _f(32, gt=0, help="global batch (pairs) per optimizer step, split over ranks")
    micro_batch_size: int = _f(
        0, ge=0, help="pairs per rank per forward/backward (gradients accumulate); 0: a rank's whole share at once"
    )
    max_tokens_per_micro_batch: int = _f(
        0, ge=0, help="cut a rank's share by padded tokens (chosen + rejected) instead; 0: off"
    )
    gradient_checkpointing: bool = _f(False, help="recompute each layer's activations in the backward pass (HF's)")
    ref_offload: bool = _f(False, help="reference and EMA target live on CPU between their forwards")
    grad_clip: float = _f(1.0, ge=0)
    ref_update: str = _f("fixed", choices=("fixed", "per_round"), help="reference: round-0 policy or last round's")
    lora: LoraConfig = field(default_factory=LoraConfig)
    timeout_s: float = _f(1800.0, gt=0)


@dataclass
class SyncConfig:
    strategy: str = _f(
        "object_store",
        choices=("object_store", "disk", "nccl"),
        help="nccl: bucketed broadcast from learner rank 0 into every engine (GPU; gloo on CPU for tests)",
    )
    timeout_s: float = _f(120.0, gt=0)
    bucket_mb: float = _f(512.0, gt=0, help="nccl: tensors are broadcast in flat buckets of at most this size")
    collective_backend: str = _f(
        "auto", choices=("auto", "nccl", "gloo"), help="nccl strategy transport; auto: nccl with CUDA, else gloo"
    )


@dataclass
class PlacementConfig:
    """Where role actors go on a GPU cluster (omni_ray/placement.py). Ignored when no role asks for GPUs."""

    learner_strategy: str = _f(
        "PACK",
        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        help="Ray placement-group strategy of the learner ranks' bundles",
    )
    rollout_strategy: str = _f(
        "STRICT_PACK",
        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        help="strategy of each engine's tensor-parallel bundles (STRICT_PACK: one node, NVLink)",
    )
    colocate: bool = _f(False, help="rollout engines and learner ranks share GPUs; vLLM sleeps while training")
    colocate_rollout_gpu_share: float = _f(
        0.5, gt=0, lt=1, help="Ray GPU accounting of an engine worker on a shared GPU (the learner gets the rest)"
    )
    sleep_level: int = _f(
        2, ge=1, le=2, help="vLLM sleep while colocated: 2 drops the weights (the sync replaces them), 1 keeps them"
    )
    scoring_num_gpus: float = _f(0.0, ge=0, le=1, help="GPU of the scoring actor (reward models); 0: CPU")
    timeout_s: float = _f(600.0, gt=0, help="waiting for placement groups longer than this raises")


@dataclass
class WandbConfig:
    mode: str = _f("disabled", choices=("online", "offline", "disabled"))
    project: str = _f("omni-ray")
    entity: str = _f("")
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    console: bool = _f(True, help="print the per-round table")
    tensorboard: bool = _f(False, help="also write TensorBoard event files to runs/<name>/tensorboard/")
    sample_rows: int = _f(8, ge=0, help="pairs per round shown in the W&B samples table")
    progress: str = _f(
        "auto", choices=("auto", "always", "never"), help="a progress bar of rounds and stages; auto: on a terminal"
    )


@dataclass
class RayConfig:
    address: str = _f("", help="empty: join RAY_ADDRESS / the job's cluster if any, else start a local one")
    num_cpus: int = _f(0, ge=0, help="local cluster only: logical CPUs to declare (0 = detect)")


@dataclass
class PipelineConfig:
    mode: str = _f(
        "sync",
        choices=("sync", "async"),
        help="sync: exact on-policy rounds; async: round r+1 is generated and scored while round r trains "
        "(one policy version off)",
    )


@dataclass
class OmniRayConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    pop: PopConfig = field(default_factory=PopConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# ---------------------------------------------------------------------------------------------------------------------
# loading


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass schema (lists of dataclasses contribute their item schema as key[0].x)."""
    keys: list[str] = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        child = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
        if is_dataclass(child):
            keys += _valid_keys(child, key + ".")
    return keys


def _unknown_key_error(bad_key: str, source: str) -> ConfigError:
    known = _valid_keys(OmniRayConfig)
    parent = bad_key.rsplit(".", 1)[0] if "." in bad_key else ""
    siblings = [k for k in known if k.rsplit(".", 1)[0] == parent and k.count(".") == bad_key.count(".")]
    near = difflib.get_close_matches(bad_key, known, n=3, cutoff=0.6) or siblings[:12]
    return ConfigError(f"{source}: unknown config key '{bad_key}'. Did you mean: {', '.join(near)}?")


def _full_key(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
    return str(key)


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise _unknown_key_error(_full_key(exc), source) from None
    except ValidationError as exc:
        raise ConfigError(f"{source}: bad value for '{_full_key(exc)}': {exc.msg}") from None
    except TypeError as exc:  # e.g. `scoring.scorers.0.type=x`: list items are replaced whole, from a YAML file
        raise ConfigError(f"{source}: cannot apply {other}: {exc} (set lists of sections in a YAML file)") from None


def _dotlist(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> OmniRayConfig:
    """Defaults <- YAML file <- `key=value` overrides, then validation. Returns the typed dataclass tree."""
    cfg: DictConfig = OmegaConf.structured(OmniRayConfig)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as exc:  # yaml syntax errors come in several types
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        cfg = _merge(cfg, file_cfg, str(p))
    if overrides:
        cfg = _merge(cfg, _dotlist(overrides), "command line")
    config: OmniRayConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(config)
    return config


def choices_of(meta: dict) -> tuple:
    """A field's allowed values: its `choices`, called when it is a function (registries resolved on use)."""
    choices = meta["choices"]
    return tuple(choices() if callable(choices) else choices)


def _check_rules(value: Any, meta: dict, key: str) -> None:
    rules = {
        "gt": (lambda v, r: v > r, ">"),
        "ge": (lambda v, r: v >= r, ">="),
        "lt": (lambda v, r: v < r, "<"),
        "le": (lambda v, r: v <= r, "<="),
    }
    for name, (ok, sym) in rules.items():
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(f"config key '{key}' = {value!r} must be {sym} {meta[name]}")
    if "choices" in meta and value not in choices_of(meta):
        raise ConfigError(f"config key '{key}' = {value!r} must be one of {', '.join(map(str, choices_of(meta)))}")


def _validate_node(schema: Any, node: Any, prefix: str) -> None:
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        value = getattr(node, f.name)
        child_default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
        if is_dataclass(child_default):
            _validate_node(type(child_default), value, key + ".")
        elif isinstance(child_default, list) and child_default and is_dataclass(child_default[0]):
            for i, item in enumerate(value):
                _validate_node(type(child_default[0]), item, f"{key}[{i}].")
        else:
            _check_rules(value, f.metadata, key)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _template_fields(template: str) -> set[str] | None:
    """The ``{name}`` fields of a str.format template, or None when it is not a valid template."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:
        return None


def _validate_remote_and_judge(s: ScorerSpec, key: str) -> None:
    """Cross-field rules of the http and judge scorer types (the value of token_env is never echoed: it may be a
    token pasted by mistake)."""
    if s.token_env and not _ENV_NAME.fullmatch(s.token_env):
        raise ConfigError(
            f"{key}.token_env must be the NAME of an environment variable (letters, digits, _), not a token; "
            "the value given is not shown"
        )
    if s.type == "http":
        from urllib.parse import urlsplit

        parts = urlsplit(s.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{key}.url: an http scorer needs an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ConfigError(f"{key}.url must not carry credentials (user:password@); use {key}.token_env")
    if s.type == "judge":
        if not s.path:
            raise ConfigError(f"{key}.path: a judge scorer needs a causal LM dir")
        if s.template:
            names = _template_fields(s.template)
            if names is None or "response" not in names or not names <= {"prompt", "response"}:
                raise ConfigError(
                    f"{key}.template must contain {{response}} and no placeholders but {{prompt}} / {{response}} "
                    "(write literal braces as {{ and }})"
                )


def _validate_pop_labels(p: PopConfig) -> None:
    if p.labels != "judge":
        return
    if not p.judge_path:
        raise ConfigError("pop.judge_path: pop.labels=judge needs the judge's causal LM dir")
    if p.label_noise > 0:
        raise ConfigError("pop.label_noise simulates annotator noise on gap labels; set it to 0 with pop.labels=judge")
    choices = [str(c) for c in p.judge_choices]
    if len(choices) != 2 or not all(c.strip() for c in choices) or choices[0].strip() == choices[1].strip():
        raise ConfigError("pop.judge_choices must be two different non-empty answers, e.g. [A, B]")
    if p.judge_template:
        names = _template_fields(p.judge_template)
        allowed = {f"{f}_{s}" for f in ("prompt", "chosen", "rejected", "choice") for s in ("a", "b")}
        if names is None or not names <= allowed or not {"chosen_a", "chosen_b"} <= names:
            raise ConfigError(
                "pop.judge_template may only use {prompt_a} {chosen_a} {rejected_a} {prompt_b} {chosen_b} "
                "{rejected_b} {choice_a} {choice_b} and must show both pairs (at least {chosen_a} and {chosen_b})"
            )


def validate(cfg: OmniRayConfig) -> None:
    """Per-field rules, then the cross-field rules that no single field can state."""
    _validate_node(OmniRayConfig, cfg, "")
    t = cfg.model.tiny
    if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
        raise ConfigError("model.tiny: hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    if t.hidden_size // t.num_heads < 32:
        raise ConfigError("model.tiny: head_dim = hidden_size / num_heads must be >= 32 (vLLM's CPU attention)")
    if cfg.pop.m_min > cfg.pop.m_max:
        raise ConfigError(f"pop.m_min ({cfg.pop.m_min}) must be <= pop.m_max ({cfg.pop.m_max})")
    if not cfg.scoring.scorers:
        raise ConfigError("scoring.scorers must list at least one scorer")
    for i, s in enumerate(cfg.scoring.scorers):
        if s.scale_high <= s.scale_low:
            raise ConfigError(f"scoring.scorers[{i}]: scale_high must be > scale_low")
        if s.type == "reward_model" and not s.path:
            raise ConfigError(f"scoring.scorers[{i}].path: a reward_model scorer needs a model dir")
        if s.type == "python" and ":" not in s.target:
            raise ConfigError(f"scoring.scorers[{i}].target: a python scorer needs 'module:name', got {s.target!r}")
        _validate_remote_and_judge(s, f"scoring.scorers[{i}]")
    _validate_pop_labels(cfg.pop)
    if cfg.data.source == "prompts" and not cfg.data.answer_column:
        if any(s.type == "math_verifier" for s in cfg.scoring.scorers):
            raise ConfigError("data.answer_column: a math_verifier scorer needs the prompts' reference answers")
    if cfg.data.source in ("prompts", "preferences") and not cfg.data.path:
        raise ConfigError(
            f"data.path: data.source={cfg.data.source} needs a dataset (HF name, dir, .jsonl or .parquet)"
        )
    if cfg.scoring.rescale_high <= cfg.scoring.rescale_low:
        raise ConfigError("scoring.rescale_high must be > scoring.rescale_low")
    if cfg.pipeline.mode == "async" and cfg.data.source == "preferences":
        raise ConfigError(
            "pipeline.mode=async overlaps sampling with training; data.source=preferences samples nothing"
        )
    if cfg.learner.batch_size % cfg.learner.num_workers:
        raise ConfigError(
            f"learner.batch_size ({cfg.learner.batch_size}) must divide by learner.num_workers "
            f"({cfg.learner.num_workers}): every rank takes an equal share of a step"
        )
    if cfg.learner.lora.rank > 0 and cfg.learner.ref_update == "per_round":
        raise ConfigError(
            "learner.ref_update=per_round with learner.lora.rank > 0: with LoRA the reference is the base model "
            "(adapters off), which a per-round reference would have to merge into; use ref_update=fixed"
        )
    if cfg.loss.name == "cdpo" and cfg.loss.label_smoothing <= 0:
        raise ConfigError("loss.name=cdpo needs loss.label_smoothing > 0 (the cDPO epsilon)")


def to_yaml(cfg: OmniRayConfig) -> str:
    """The resolved config as YAML (what runs/<name>/config.yaml holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> OmniRayConfig:
    """Inverse of `to_yaml` (used on resume), with the same validation as `load_config`."""
    config: OmniRayConfig = OmegaConf.to_object(
        _merge(OmegaConf.structured(OmniRayConfig), OmegaConf.create(text), "saved config")
    )  # type: ignore[assignment]
    validate(config)
    return config
