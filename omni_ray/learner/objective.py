"""From `loss.name` to a loss on a batch of per-sequence log-probs: the registry of losses, the one place they are
selected.

Each loss is registered once with what it needs from the learner: a reference model or not, length-normalised or
summed log-probs (the papers' own conventions, used when `loss.logprobs=auto`), PoP target margins or not.
`LOSSES` and `POP_LOSSES` are read off the registry. The conventions (docs/methods.md sec. 4, "unit mismatch"):
DPO, IPO, cDPO, margin/offset DPO, DPO-PoP and RPO's DPO term use summed log-probs L(y); SimPO, Omni-DPO (and so
omni_pop) and RFT's NLL use l(y) = L(y)/|y|. RPO's NLL term is length-normalised whatever the convention. PoP
margins and their clip bounds [m_min, m_max] are in the units of whichever convention the loss uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from omni_ray.losses import (
    LossOutput,
    dpo_loss,
    odpo_margin,
    omni_dpo_loss,
    pop_loss,
    rft_loss,
    rpo_loss,
    simpo_loss,
)

if TYPE_CHECKING:
    from omni_ray.config import LossConfig, PopConfig


@dataclass
class BatchLogps:
    """Per-example (B,) tensors for one batch of training pairs, already in the loss's convention.

    `target_margin` is the PoP margin each strong pair must beat before clipping: the weak partner's implicit margin
    under the target model (ema / fixed), the estimator's Bradley-Terry margin (bt), or the floor m_min for a pair PoP
    could not compare; None for non-PoP losses. `chosen_lengths` are |y_w| (float), needed by rpo on summed log-probs.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    score_chosen: Tensor
    score_rejected: Tensor
    target_margin: Tensor | None = None
    chosen_lengths: Tensor | None = None


LossFn = Callable[[BatchLogps, "Objective"], LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and what the learner must give it."""

    fn: LossFn
    uses_reference: bool = True
    length_normalised: bool = False
    uses_pop: bool = False


LOSS_REGISTRY: dict[str, LossSpec] = {}


def register_loss(name: str, **needs: bool) -> Callable[[LossFn], LossFn]:
    """Register `fn(batch, objective) -> LossOutput` under `name` (a `loss.name` value)."""

    def add(fn: LossFn) -> LossFn:
        if name in LOSS_REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSS_REGISTRY[name] = LossSpec(fn, **needs)
        return fn

    return add


def _required(value: Tensor | None, message: str) -> Tensor:
    if value is None:
        raise ValueError(message)
    return value


_NO_TARGET = "a PoP loss needs target margins: the learner did not supply them"


def _dpo_family(b: BatchLogps, o: Objective, *, margin=None, loss_type: str = "sigmoid") -> LossOutput:
    return dpo_loss(
        b.policy_chosen,
        b.policy_rejected,
        b.ref_chosen,
        b.ref_rejected,
        beta=o.cfg.beta,
        margin=margin,
        label_smoothing=o.cfg.label_smoothing,
        loss_type=loss_type,  # type: ignore[arg-type]
    )


@register_loss("dpo")
def _dpo(b: BatchLogps, o: Objective) -> LossOutput:
    return _dpo_family(b, o)


@register_loss("ipo")
def _ipo(b: BatchLogps, o: Objective) -> LossOutput:
    return _dpo_family(b, o, loss_type="ipo")


@register_loss("cdpo")
def _cdpo(b: BatchLogps, o: Objective) -> LossOutput:
    return _dpo_family(b, o)


@register_loss("margin_dpo")
def _margin_dpo(b: BatchLogps, o: Objective) -> LossOutput:
    margin = (b.score_chosen - b.score_rejected) if o.cfg.margin_source == "score_gap" else o.cfg.margin
    return _dpo_family(b, o, margin=margin)


@register_loss("odpo")
def _odpo(b: BatchLogps, o: Objective) -> LossOutput:
    return _dpo_family(b, o, margin=odpo_margin(b.score_chosen, b.score_rejected, alpha=o.cfg.odpo_alpha))


@register_loss("simpo", uses_reference=False, length_normalised=True)
def _simpo(b: BatchLogps, o: Objective) -> LossOutput:
    return simpo_loss(b.policy_chosen, b.policy_rejected, beta=o.cfg.beta, gamma=o.cfg.simpo_gamma)


@register_loss("rft", uses_reference=False, length_normalised=True)
def _rft(b: BatchLogps, o: Objective) -> LossOutput:
    return rft_loss(b.policy_chosen, b.score_chosen, tau_good=o.cfg.tau_good)


@register_loss("rpo")
def _rpo(b: BatchLogps, o: Objective) -> LossOutput:
    lengths = (
        torch.ones_like(b.policy_chosen)
        if o.length_normalised
        else _required(b.chosen_lengths, "rpo needs chosen_lengths: the learner did not supply them")
    )
    c = o.cfg
    return rpo_loss(
        b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected, lengths, beta=c.beta, alpha=c.rpo_alpha
    )


@register_loss("pop", uses_pop=True)
def _pop(b: BatchLogps, o: Objective) -> LossOutput:
    m_theta = o.implicit_margin(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected)
    return pop_loss(
        m_theta, _required(b.target_margin, _NO_TARGET), beta=o.cfg.beta, m_min=o.pop.m_min, m_max=o.pop.m_max
    )


def _omni(b: BatchLogps, o: Objective, margin: Tensor | None) -> LossOutput:
    c = o.cfg
    return omni_dpo_loss(
        b.policy_chosen,
        b.policy_rejected,
        b.ref_chosen,
        b.ref_rejected,
        b.score_chosen,
        b.score_rejected,
        beta=c.beta,
        eta=c.eta,
        gamma=c.gamma,
        tau_ref=c.tau_ref,
        lam=c.lam,
        tau_good=c.tau_good,
        margin=margin,
        detach_perf_weight=c.detach_perf_weight,
    )


@register_loss("omni_dpo", length_normalised=True)
def _omni_dpo(b: BatchLogps, o: Objective) -> LossOutput:
    return _omni(b, o, None)


@register_loss("omni_pop", length_normalised=True, uses_pop=True)
def _omni_pop(b: BatchLogps, o: Objective) -> LossOutput:
    # m_s is in implicit-margin units; omni_dpo_loss subtracts margins after the beta product.
    target = _required(b.target_margin, _NO_TARGET).detach()
    return _omni(b, o, o.cfg.beta * torch.clamp(target, o.pop.m_min, o.pop.m_max))


LOSSES: tuple[str, ...] = tuple(LOSS_REGISTRY)
POP_LOSSES: tuple[str, ...] = tuple(n for n, s in LOSS_REGISTRY.items() if s.uses_pop)


class Objective:
    """The configured loss, and what it needs: `uses_reference`, `uses_pop` (the learner supplies target margins),
    `length_normalised` (the log-prob convention, `loss.logprobs` or the paper's)."""

    def __init__(self, loss: LossConfig, pop: PopConfig):
        if loss.name not in LOSS_REGISTRY:
            raise ValueError(f"unknown loss {loss.name!r}; registered: {', '.join(LOSSES)}")
        self.cfg, self.pop, self.name = loss, pop, loss.name
        self.spec = LOSS_REGISTRY[loss.name]
        self.uses_pop = self.spec.uses_pop
        self.uses_reference = self.spec.uses_reference
        mode = loss.logprobs
        self.length_normalised = self.spec.length_normalised if mode == "auto" else mode == "mean"

    def convention(self, summed: Tensor, lengths: Tensor) -> Tensor:
        """Summed log-probs -> the loss's convention."""
        return summed / lengths if self.length_normalised else summed

    def implicit_margin(self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
        """M = [l(y_w) - l_ref(y_w)] - [l(y_l) - l_ref(y_l)] (or with L): the PoP paper's implicit margin."""
        return (pc - rc) - (pr - rr)

    def __call__(self, b: BatchLogps) -> LossOutput:
        return self.spec.fn(b, self)
