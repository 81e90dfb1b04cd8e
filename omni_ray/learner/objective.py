"""From `loss.name` to a loss on a batch of per-sequence log-probs: the one place losses are selected.

Log-prob convention per loss ("auto"): the papers' own. DPO, IPO, cDPO, margin/offset DPO, DPO-PoP and RPO's DPO term
use summed log-probs L(y); SimPO, Omni-DPO (and so omni_pop) and RFT's NLL use length-normalised l(y) = L(y)/|y|.
RPO's NLL term is length-normalised whatever the convention (it divides by `chosen_lengths` when inputs are summed).
PoP margins and their clip bounds [m_min, m_max] are in the units of whichever convention the loss uses (methods.md
sec. 4, "unit mismatch").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from omni_ray.config import LossConfig, PopConfig
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

POP_LOSSES = ("pop", "omni_pop")
_LENGTH_NORMALISED = ("simpo", "omni_dpo", "omni_pop", "rft")
_REFERENCE_FREE = ("simpo", "rft")


@dataclass
class BatchLogps:
    """Per-example (B,) tensors for one batch of training pairs, already in the loss's convention.

    `target_margin` is the PoP target M_target(u) of each strong pair's weak partner (ema / fixed targets, computed
    by the learner) or the estimator's Bradley-Terry margin (bt target); None for non-PoP losses.
    `chosen_lengths` are the chosen responses' token counts |y_w| (float), needed by rpo with summed log-probs.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    score_chosen: Tensor
    score_rejected: Tensor
    target_margin: Tensor | None = None
    chosen_lengths: Tensor | None = None


class Objective:
    """The configured loss. `uses_pop` says the learner must supply `target_margin`."""

    def __init__(self, loss: LossConfig, pop: PopConfig):
        self.cfg = loss
        self.pop = pop
        self.name = loss.name
        self.uses_pop = loss.name in POP_LOSSES
        self.uses_reference = loss.name not in _REFERENCE_FREE
        mode = loss.logprobs
        self.length_normalised = loss.name in _LENGTH_NORMALISED if mode == "auto" else mode == "mean"

    def convention(self, summed: Tensor, lengths: Tensor) -> Tensor:
        """Summed log-probs -> the loss's convention."""
        return summed / lengths if self.length_normalised else summed

    def implicit_margin(self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
        """M = [l(y_w) - l_ref(y_w)] - [l(y_l) - l_ref(y_l)] (or with L): the PoP paper's implicit margin."""
        return (pc - rc) - (pr - rr)

    def __call__(self, b: BatchLogps) -> LossOutput:
        c, p = self.cfg, self.pop
        if self.name in ("dpo", "cdpo", "ipo", "margin_dpo", "odpo"):
            margin: Tensor | float | None = None
            if self.name == "margin_dpo":
                margin = (b.score_chosen - b.score_rejected) if c.margin_source == "score_gap" else c.margin
            elif self.name == "odpo":
                margin = odpo_margin(b.score_chosen, b.score_rejected, alpha=c.odpo_alpha)
            return dpo_loss(
                b.policy_chosen,
                b.policy_rejected,
                b.ref_chosen,
                b.ref_rejected,
                beta=c.beta,
                margin=margin,
                label_smoothing=c.label_smoothing,
                loss_type="ipo" if self.name == "ipo" else "sigmoid",
            )
        if self.name == "simpo":
            return simpo_loss(b.policy_chosen, b.policy_rejected, beta=c.beta, gamma=c.simpo_gamma)
        if self.name == "rft":
            return rft_loss(b.policy_chosen, b.score_chosen, tau_good=c.tau_good)
        if self.name == "rpo":
            lengths = (
                torch.ones_like(b.policy_chosen)
                if self.length_normalised
                else _required(b.chosen_lengths, "rpo needs chosen_lengths: the learner did not supply them")
            )
            return rpo_loss(
                b.policy_chosen,
                b.policy_rejected,
                b.ref_chosen,
                b.ref_rejected,
                lengths,
                beta=c.beta,
                alpha=c.rpo_alpha,
            )
        if self.name == "pop":
            m_theta = self.implicit_margin(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected)
            return pop_loss(m_theta, _required(b.target_margin, _NO_TARGET), beta=c.beta, m_min=p.m_min, m_max=p.m_max)
        margin = None
        if self.name == "omni_pop":
            # The PoP margin m_s is in implicit-margin units; omni_dpo_loss subtracts margins after the beta product.
            margin = c.beta * torch.clamp(_required(b.target_margin, _NO_TARGET).detach(), p.m_min, p.m_max)
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


_NO_TARGET = "a PoP loss needs target margins: the learner did not supply them"


def _required(value: Tensor | None, message: str) -> Tensor:
    if value is None:
        raise ValueError(message)
    return value
