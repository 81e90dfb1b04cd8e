"""Weights the learner forwards through without training them: the reference and the PoP EMA target.

Two kinds, one interface (`forward()` gives a model to run, `pieces()` this rank's tensors of it, for the EMA update
and the per-round reference copy):
- `FrozenCopy`: a separate copy of the policy's weights. Under ZeRO-3 a DeepSpeed ZeRO-3 engine without optimizer,
  partitioned like the policy (OpenRLHF's reference model), its partitions on CPU with `learner.ref_offload`;
  otherwise the module itself, on the device, or on CPU between forwards with `learner.ref_offload`.
- `AdapterView`: the policy itself seen through its LoRA adapters (learner/adapters.py): the reference is the base
  model with the adapters off, the EMA target is the policy with its "ema" adapter on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from omni_ray.models.adapters import TRAINED, adapter_parameters


def local_pieces(params: Any) -> list[torch.Tensor]:
    """Each parameter's tensor held by this rank: its ZeRO-3 partition, else the parameter itself."""
    return [getattr(p, "ds_tensor", p).data for p in params]


class FrozenCopy:
    def __init__(self, model: torch.nn.Module, *, zero3: bool, device: torch.device, offload: bool,
                 ds_config: dict) -> None:  # fmt: skip
        model.eval()
        model.requires_grad_(False)
        self.zero3, self.device, self.offload = zero3, device, offload and device.type != "cpu"
        if zero3:
            import deepspeed

            self.model, *_ = deepspeed.initialize(model=model, config=ds_config)
            self.model.eval()
        else:
            self.model = model.to("cpu" if self.offload else device)

    @contextlib.contextmanager
    def forward(self) -> Iterator[Any]:
        visits = self.offload and not self.zero3  # ZeRO-3 offload is DeepSpeed's own
        if visits:
            self.model.to(self.device)
        try:
            yield self.model
        finally:
            if visits:
                self.model.to("cpu")
                torch.cuda.empty_cache()

    def pieces(self) -> list[torch.Tensor]:
        return local_pieces(getattr(self.model, "module", self.model).parameters())


class AdapterView:
    """adapter None: the base model (adapters disabled); else the policy with that adapter active."""

    def __init__(self, engine: Any, adapter: str | None) -> None:
        self.engine, self.adapter = engine, adapter

    @contextlib.contextmanager
    def forward(self) -> Iterator[Any]:
        model = self.engine.module
        if self.adapter is None:
            with model.disable_adapter():
                yield self.engine
            return
        model.set_adapter(self.adapter, inference_mode=True)
        try:
            yield self.engine
        finally:
            model.set_adapter(TRAINED)

    def pieces(self) -> list[torch.Tensor]:
        if self.adapter is None:
            raise TypeError("the base model is not a copy: it has no pieces of its own")
        return local_pieces(adapter_parameters(self.engine.module, self.adapter))


class LivePolicy:
    """The policy as it is now, forwarded without gradient (the PoP `fixed` target)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @contextlib.contextmanager
    def forward(self) -> Iterator[Any]:
        yield self.engine

    def pieces(self) -> list[torch.Tensor]:
        raise TypeError("the live policy is not a copy: it has no pieces of its own")
