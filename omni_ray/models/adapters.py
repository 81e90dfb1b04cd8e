"""LoRA adapters through peft (`learner.lora.rank > 0`): the policy is the frozen base model plus trained adapters.

What changes with them (docs/gpu.md, LoRA):
- the reference is the base model itself, with the adapters switched off (peft's `disable_adapter`): no second copy;
- the PoP EMA target is a second adapter, "ema", an EMA of the trained one ("default"), inside the same model;
- optimizer state, gradients and checkpoints are the adapters' only; checkpoints use peft's own format;
- the rollout workers receive the adapter tensors only, or, for the nccl broadcast, the merged weights, computed one
  layer at a time, never a second full copy on a rank (`weight_entries`, `materialize`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

TRAINED, EMA = "default", "ema"
#: peft's prefix of every name inside a PeftModel, and the infix of a wrapped layer's own weights.
PEFT_PREFIX, BASE_LAYER = "base_model.model.", ".base_layer"


def projection_names(model: torch.nn.Module) -> list[str]:
    """The leaf names of every linear projection inside the decoder layers (q_proj, ..., down_proj for Llama):
    what LoRA targets by default; the embeddings and the LM head are left alone."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in name})  # fmt: skip


def resolve_targets(model: torch.nn.Module, configured: Sequence[str]) -> list[str]:
    """`learner.lora.target_modules`, or the default; a name the model does not have is refused with the model's
    names listed."""
    available = projection_names(model)
    if not configured:
        return available
    unknown = sorted(set(configured) - {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()})
    if unknown:
        from omni_ray.config import ConfigError

        raise ConfigError(
            f"learner.lora.target_modules: {unknown} are not modules of this model; its linear projections are "
            f"{available}"
        )
    return list(configured)


def rollout_settings(cfg: Any, model_path: str) -> dict[str, Any] | None:
    """What rollout workers need to take adapter-only weight updates (None without LoRA): the adapter's shape, its
    target modules resolved on the model's own module names (on the meta device: no weights are read). A target the
    model does not have is refused here, before any actor starts."""
    lora = cfg.learner.lora
    if lora.rank == 0:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    targets = resolve_targets(model, lora.target_modules)
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": targets}


def adapter_tensor_names(checkpoint_names: Sequence[str], target_modules: Sequence[str]) -> frozenset[str]:
    """The saved names of an adapter on a checkpoint with these tensor names: lora_A and lora_B of every weight of a
    target module."""
    names = set()
    for n in checkpoint_names:
        module, _, leaf = n.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in target_modules:
            names.update(f"{PEFT_PREFIX}{module}.lora_{x}.weight" for x in "AB")
    return frozenset(names)


def peft_config(lora: Any, targets: Sequence[str]) -> Any:
    """peft's LoraConfig from `learner.lora` (or the same keys as a dict)."""
    import peft

    get = lora.get if isinstance(lora, dict) else lambda k: getattr(lora, k)
    return peft.LoraConfig(r=get("rank"), lora_alpha=get("alpha"), lora_dropout=get("dropout"),
                           target_modules=list(targets), bias="none")  # fmt: skip


def with_adapters(model: torch.nn.Module, lora: Any, targets: Sequence[str], *, ema: bool) -> Any:
    """The base model with the trained adapter (and an "ema" adapter starting equal to it, not trained)."""
    import peft

    config = peft_config(lora, targets)
    policy = peft.get_peft_model(model, config, adapter_name=TRAINED)
    if ema:
        policy.add_adapter(EMA, config)
        with torch.no_grad():
            for e, t in zip(adapter_parameters(policy, EMA), adapter_parameters(policy, TRAINED), strict=True):
                e.copy_(t)
        policy.set_adapter(TRAINED)
    return policy


def adapter_parameters(model: Any, adapter: str) -> list[torch.nn.Parameter]:
    """The adapter's parameters in model order (the trained and the EMA adapter line up one to one)."""
    return [p for n, p in model.named_parameters() if f".{adapter}." in n and ".lora_" in n]


def saved_name(name: str, adapter: str = TRAINED) -> str:
    """A parameter's name in peft's saved format (adapter_model.safetensors): the adapter's name dropped."""
    return name.replace(f".{adapter}.", ".")


def base_name(name: str) -> str:
    """The base model's HF name of a PeftModel parameter."""
    return name.removeprefix(PEFT_PREFIX).replace(BASE_LAYER + ".", ".")


def weight_entries(model: Any, *, adapter_only: bool = False, tied: bool = True) -> list[tuple[str, Any, Any]]:
    """What the policy's weights are made of, in model order: (HF name, parameter, LoRA layer to merge or None).

    Without adapters, every parameter under its checkpoint name (`tied`: shared tensors under each of their names,
    as a state dict has them). With adapters: the base model's weights under the base's names, each wrapped layer's
    weight with its LoRA layer to merge; or, `adapter_only`, the trained adapter's tensors under peft's saved names.
    """
    from omni_ray.weight_sync.broadcast import normalize_hf_name

    params = list(model.named_parameters(remove_duplicate=not tied))
    if not any(".lora_" in n for n, _ in params):
        return [(normalize_hf_name(n), p, None) for n, p in params]
    if adapter_only:
        return [(saved_name(n), p, None) for n, p in params if f".{TRAINED}." in n and ".lora_" in n]
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    entries = []
    for name, p in params:
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        layer = layers.get(owner.removesuffix(BASE_LAYER)) if owner.endswith(BASE_LAYER) and leaf == "weight" else None
        entries.append((base_name(name), p, layer))
    return entries


def materialize(entries: list[tuple[str, Any, Any]], *, zero3: bool, device: Any,
                keep: bool) -> Iterator[tuple[str, torch.Tensor | None]]:  # fmt: skip
    """(name, full tensor on `device`) per entry, LoRA merged in (W + scaling * B A), gathering one layer at a time
    under ZeRO-3: nothing is merged in place and no rank holds a second full copy. Collective under ZeRO-3: every
    rank runs it to its end; tensors are None where not `keep`."""
    import deepspeed

    for name, p, layer in entries:
        extra = [layer.lora_A[TRAINED].weight, layer.lora_B[TRAINED].weight] if layer is not None else []
        with torch.no_grad(), deepspeed.zero.GatheredParameters([p, *extra], enabled=zero3):
            if not keep:
                yield name, None
                continue
            weight = p.detach()
            if layer is not None:
                weight = weight + layer.get_delta_weight(TRAINED).to(weight.dtype)
            yield name, weight.to(device, copy=True)
