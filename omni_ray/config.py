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


LOSSES = ("dpo", "ipo", "cdpo", "simpo", "margin_dpo", "odpo", "omni_dpo", "pop", "omni_pop")


@dataclass
class RunConfig:
    name: str = _f("local_tiny", help="run directory name under output_dir")
    output_dir: str = _f("runs", help="parent of runs/<name>/")
    seed: int = _f(0, ge=0)
    rounds: int = _f(3, ge=1, help="online rounds: generate -> score -> pair -> PoP -> train -> sync")
    resume: str = _f("never", choices=("never", "auto"), help="auto: continue from the newest good checkpoint")
    save_checkpoints: bool = _f(True, help="write checkpoints/round_NNNN/ at the end of every round")
    dump_rollouts: bool = _f(False, help="write every round's scored samples to rounds/round_NNNN/samples.jsonl")


@dataclass
class TinyModelConfig:
    """The offline tiny Llama built by `omni-ray make-tiny` (sec. 5 of methods.md: 2.4M params learn arith)."""

    hidden_size: int = _f(256, gt=0)
    num_layers: int = _f(4, gt=0)
    num_heads: int = _f(8, gt=0)
    num_kv_heads: int = _f(4, gt=0)
    intermediate_size: int = _f(512, gt=0)
    max_position_embeddings: int = _f(64, gt=0)
    sft_steps: int = _f(330, ge=0, help="warm-start SFT steps; stop while accuracy still rises (methods.md sec. 5)")
    sft_lr: float = _f(1e-3, gt=0)
    sft_batch_size: int = _f(64, gt=0)


@dataclass
class ModelConfig:
    path: str = _f("models/tiny-arith", help="HF model dir (save_pretrained layout)")
    build_tiny_if_missing: bool = _f(True, help="run make-tiny when `path` does not exist")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    trust_remote_code: bool = _f(False, help="only true when you trust the model repo's code")


@dataclass
class DataConfig:
    source: str = _f("task", choices=("task", "preferences"), help="task: built-in prompts; preferences: offline")
    task: str = _f("arith", choices=("arith",))
    max_operand: int = _f(99, gt=0, help="arith: operands drawn from 0..max_operand")
    prompts_per_round: int = _f(512, gt=0)
    eval_prompts: int = _f(500, gt=0, help="held-out prompts, fixed by the seed, disjoint from training prompts")


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
    eval_batch_size: int = _f(512, gt=0)
    timeout_s: float = _f(600.0, gt=0, help="a generate call that takes longer raises")


@dataclass
class ScorerSpec:
    type: str = _f("arith_verifier", choices=("arith_verifier", "reward_model", "python"))
    weight: float = _f(1.0, gt=0)
    path: str = _f("", help="reward_model: HF sequence-classification model dir")
    target: str = _f("", help="python: 'module:name' of a Scorer class or a function (prompts, responses) -> scores")
    scale_low: float = _f(0.0, help="the declared score scale; scores are mapped from it to scoring.rescale range")
    scale_high: float = _f(10.0)


@dataclass
class ScoringConfig:
    scorers: list[ScorerSpec] = field(default_factory=lambda: [ScorerSpec()])
    rescale: str = _f("declared", choices=("none", "declared", "per_round"), help="how scores reach the loss scale")
    rescale_low: float = _f(0.0)
    rescale_high: float = _f(10.0)
    num_cpus: float = _f(0.25, gt=0)
    timeout_s: float = _f(300.0, gt=0)


@dataclass
class PairsConfig:
    strategy: str = _f("best_worst", choices=("best_worst", "best_random", "math"))
    min_gap: float = _f(0.0, ge=0, help="pairs whose score gap is below this are dropped and counted")
    good_threshold: float = _f(6.0, help="math rule: chosen needs a score above this")


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


@dataclass
class LossConfig:
    name: str = _f("omni_pop", choices=LOSSES)
    beta: float = _f(2.0, gt=0)
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
    logprobs: str = _f(
        "auto", choices=("auto", "sum", "mean"), help="sequence log-prob L(y) or l(y)=L(y)/|y|; auto: the paper's"
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
    grad_clip: float = _f(1.0, ge=0)
    ref_update: str = _f("fixed", choices=("fixed", "per_round"), help="reference: round-0 policy or last round's")
    timeout_s: float = _f(1800.0, gt=0)


@dataclass
class SyncConfig:
    strategy: str = _f("object_store", choices=("object_store", "disk"))
    timeout_s: float = _f(120.0, gt=0)


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


@dataclass
class RayConfig:
    address: str = _f("", help="empty: join RAY_ADDRESS / the job's cluster if any, else start a local one")
    num_cpus: int = _f(0, ge=0, help="local cluster only: logical CPUs to declare (0 = detect)")


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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


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
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' = {value!r} must be one of {', '.join(map(str, meta['choices']))}")


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
    if cfg.scoring.rescale_high <= cfg.scoring.rescale_low:
        raise ConfigError("scoring.rescale_high must be > scoring.rescale_low")
    if cfg.learner.batch_size % cfg.learner.num_workers:
        raise ConfigError(
            f"learner.batch_size ({cfg.learner.batch_size}) must divide by learner.num_workers "
            f"({cfg.learner.num_workers}): every rank takes an equal share of a step"
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
