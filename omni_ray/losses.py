"""Preference-optimisation losses: DPO family, SimPO, Omni-DPO and DPO-PoP (pure PyTorch, no Ray).

The equations follow docs/methods.md sections 1-3; each function cites its paper by arXiv id.

Notation (per example b of a batch of B preference pairs):

    L(y)        summed log-prob of the response tokens (prompt masked)
    l(y)        = L(y) / |y|, the length-normalised (mean per-token) log-prob
    pc, pr      policy log-probs of the chosen (y_w) and rejected (y_l) response: ``policy_chosen``, ``policy_rejected``
    rc, rr      reference log-probs of the same responses: ``ref_chosen``, ``ref_rejected``
    M           = (pc - rc) - (pr - rr), the implicit (log-ratio) margin of the pair
    S_w, S_l    quality scores of chosen / rejected: ``score_chosen``, ``score_rejected``
    sigma       the logistic sigmoid; every ``log sigma`` is computed with ``F.logsigmoid`` (stable for any input)

The caller decides whether the log-prob inputs are summed (L) or length-normalised (l); the functions only say which
convention their paper uses. All per-example inputs are 1-D tensors of shape (B,).

Margins. ``dpo_loss`` and ``omni_dpo_loss`` take ``margin`` in *logit* units, subtracted after the beta product:
``-log sigma(beta * M - margin)``. ``pop_loss`` takes margins in *implicit-margin* units (the same units as M):
``-log sigma(beta * (M - m))``. A PoP margin m_s plugged into ``dpo_loss`` / ``omni_dpo_loss`` is therefore passed as
``beta * m_s``. A tensor ``margin`` is used as given: pass a detached tensor when it is data.

Every loss returns a :class:`LossOutput`. Its ``stats`` are detached, per-example tensors of shape (B,) (not batch
means) so that the caller can aggregate them over micro-batches / ranks or log their distributions; e.g. the batch
accuracy is ``stats["accuracy"].mean()``.

Validation: NaN anywhere in a tensor input, inputs that are not 1-D floating-point tensors of one common shape, a
non-finite hyper-parameter, ``beta <= 0`` or a response length ``<= 0`` raise ``ValueError`` naming the function and
the argument. The NaN check reads a flag back to the host (one device sync per tensor input).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LossOutput",
    "Margin",
    "dpo_loss",
    "odpo_margin",
    "omni_dpo_loss",
    "pop_loss",
    "rft_loss",
    "rpo_loss",
    "simpo_loss",
]

Margin: TypeAlias = float | Tensor | None
"""A margin: None (no margin, i.e. 0), one float for the whole batch, or a (B,) tensor of per-example margins."""

# Smallest score gap odpo_margin takes the log of; ties and inverted pairs are clamped up to it.
_ODPO_MIN_GAP = 1e-6


@dataclass(frozen=True)
class LossOutput:
    """Result of a loss function.

    loss:        scalar, the plain mean of ``per_example`` over the batch (differentiable).
    per_example: (B,) per-example losses (differentiable).
    stats:       name -> detached (B,) tensor of per-example diagnostics (see each loss for the keys).
    """

    loss: Tensor
    per_example: Tensor
    stats: dict[str, Tensor]


def _check_inputs(fn: str, tensors: Mapping[str, Tensor | float | None], **scalars: float) -> None:
    """Raise ``ValueError`` (prefixed with ``fn``, naming the argument) if an input is malformed.

    ``tensors`` are the per-example arguments: each must be a non-empty, 1-D floating-point tensor with the shape of
    the first one and no NaN. An entry that is a number (a scalar margin) is checked like ``scalars``; None is skipped.
    ``scalars`` are hyper-parameters: each must be a finite real number, and ``beta`` must be > 0.
    """
    first: tuple[str, tuple[int, ...]] | None = None
    for name, value in tensors.items():
        if value is None:
            continue
        if not isinstance(value, Tensor):
            scalars[name] = value
            continue
        shape = tuple(value.shape)
        if value.ndim != 1 or value.numel() == 0:
            raise ValueError(f"{fn}: {name} must be a non-empty 1-D tensor of per-example values, got shape {shape}")
        if not value.is_floating_point():
            raise ValueError(f"{fn}: {name} must be a floating-point tensor, got dtype {value.dtype}")
        if first is None:
            first = (name, shape)
        elif shape != first[1]:
            raise ValueError(
                f"{fn}: shape mismatch: {name} has shape {shape} but {first[0]} has shape {first[1]}; "
                "all per-example inputs must have the same shape"
            )
        nan = torch.isnan(value)
        if bool(nan.any()):
            count = int(nan.sum())
            index = int(nan.nonzero()[0, 0])
            total = f" ({count} NaN values in total)" if count > 1 else ""
            raise ValueError(f"{fn}: {name} contains NaN at index {index}{total}")
    for name, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if "beta" in scalars and scalars["beta"] <= 0:
        raise ValueError(f"{fn}: beta must be > 0, got {scalars['beta']!r}")
    lengths = tensors.get("chosen_lengths")
    if isinstance(lengths, Tensor) and bool((lengths <= 0).any()):
        raise ValueError(f"{fn}: chosen_lengths must be > 0 (every response has at least one token)")


def _per_example_margin(margin: Margin, like: Tensor) -> Tensor:
    """The margin as a (B,) tensor with the dtype and device of ``like`` (None means 0)."""
    if isinstance(margin, Tensor):
        return margin.to(like)
    return torch.full_like(like, 0.0 if margin is None else float(margin))


def _reward_stats(chosen_reward: Tensor, rejected_reward: Tensor) -> dict[str, Tensor]:
    """Implicit rewards of chosen / rejected, their difference, and per-example accuracy (1 if the margin > 0)."""
    reward_margin = chosen_reward - rejected_reward
    return {
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "reward_margin": reward_margin,
        "accuracy": (reward_margin > 0).to(chosen_reward.dtype),
    }


def _output(per_example: Tensor, **stats: Tensor) -> LossOutput:
    """Batch-mean loss plus detached per-example stats."""
    return LossOutput(
        loss=per_example.mean(),
        per_example=per_example,
        stats={name: value.detach() for name, value in stats.items()},
    )


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    margin: Margin = None,
    label_smoothing: float = 0.0,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
) -> LossOutput:
    """DPO (arXiv 2305.18290) with optional margin, cDPO label smoothing, or the IPO loss (arXiv 2310.12036).

    With ``M = (pc - rc) - (pr - rr)`` and ``z = beta * M - margin``:

        sigmoid:  loss_b = (1 - eps) * (-log sigma(z)) + eps * (-log sigma(-z))
        ipo:      loss_b = (M - margin / beta - 1 / (2 beta))^2

    * ``margin = None`` and ``eps = 0`` is plain DPO: ``-log sigma(beta * M)``. Summed log-probs give DPO as in the
      paper; length-normalised ones give length-normalised DPO.
    * ``margin`` (logit units, see the module docstring) gives margin DPO: a fixed float, the score gap
      ``S_w - S_l``, a PoP margin times beta, or :func:`odpo_margin` for Offset-DPO (ODPO, arXiv 2402.10571).
    * ``label_smoothing = eps`` is conservative DPO (cDPO; E. Mitchell, "A note on DPO with noisy preferences and
      relationship to IPO", 2023, no arXiv id): the label is assumed flipped with probability eps.
      eps = 0.5 makes the loss symmetric in chosen / rejected.
    * ``loss_type = "ipo"`` regresses M onto 1 / (2 beta) (the IPO paper's tau is beta here). A margin is applied
      in the same logit units, i.e. the target becomes (margin + 1/2) / beta. Label smoothing is not defined for IPO.

    Stats (per example): chosen_reward = beta (pc - rc), rejected_reward = beta (pr - rr), reward_margin = beta M,
    accuracy = 1[beta M > 0], margin (the one applied).
    """
    fn = "dpo_loss"
    _check_inputs(
        fn,
        {
            "policy_chosen": policy_chosen,
            "policy_rejected": policy_rejected,
            "ref_chosen": ref_chosen,
            "ref_rejected": ref_rejected,
            "margin": margin,
        },
        beta=beta,
        label_smoothing=label_smoothing,
    )
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"{fn}: loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError(f"{fn}: label_smoothing applies to loss_type='sigmoid' only, got {label_smoothing!r} with ipo")

    m = _per_example_margin(margin, policy_chosen)
    log_ratio_margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "ipo":
        per_example = (log_ratio_margin - m / beta - 1.0 / (2.0 * beta)) ** 2
    else:
        z = beta * log_ratio_margin - m
        per_example = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return _output(
        per_example,
        **_reward_stats(beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)),
        margin=m,
    )


def odpo_margin(score_chosen: Tensor, score_rejected: Tensor, *, alpha: float) -> Tensor:
    """Offset-DPO margin (ODPO, arXiv 2402.10571): ``Delta_b = alpha * log(S_w - S_l)``, to pass to ``dpo_loss``.

    ODPO is margin DPO, ``-log sigma(beta M - Delta)``, with this offset. The log is undefined for a zero or negative
    gap (ties, inverted pairs), so the gap is clamped from below at 1e-6 first: such pairs get the finite offset
    ``alpha * log(1e-6) ~= -13.8 alpha``, the smallest one any pair gets (the limit of the formula as the gap goes
    to 0+, i.e. the weakest requirement). Gaps below 1 give negative offsets, as in the paper. Scores are data: the
    result carries no gradient. Returns a (B,) tensor.
    """
    _check_inputs("odpo_margin", {"score_chosen": score_chosen, "score_rejected": score_rejected}, alpha=alpha)
    gap = (score_chosen - score_rejected).detach()
    return alpha * torch.log(gap.clamp(min=_ODPO_MIN_GAP))


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, *, beta: float, gamma: float) -> LossOutput:
    """SimPO (arXiv 2405.14734), reference-free: ``loss_b = -log sigma(beta * pc - beta * pr - gamma)``.

    Inputs are expected length-normalised (l_theta(y_w), l_theta(y_l)); ``gamma`` is SimPO's target reward margin
    (logit units).

    Stats (per example): chosen_reward = beta pc, rejected_reward = beta pr, reward_margin = beta (pc - pr),
    accuracy = 1[reward_margin > 0], margin = gamma.
    """
    _check_inputs(
        "simpo_loss", {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected}, beta=beta, gamma=gamma
    )
    per_example = -F.logsigmoid(beta * (policy_chosen - policy_rejected) - gamma)
    return _output(
        per_example,
        **_reward_stats(beta * policy_chosen, beta * policy_rejected),
        margin=torch.full_like(policy_chosen, gamma),
    )


def omni_dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    score_chosen: Tensor,
    score_rejected: Tensor,
    *,
    beta: float,
    eta: float,
    gamma: float,
    tau_ref: float,
    lam: float,
    tau_good: float,
    margin: Margin = None,
    detach_perf_weight: bool = False,
) -> LossOutput:
    """Omni-DPO (arXiv 2506.10054, also called Uni-DPO), with an optional margin for DPO-PoP (arXiv 2509.22851).

    Log-prob inputs are expected length-normalised (l, not L). Per pair:

        dr     = beta * ((pc - rc) - (pr - rr))
        w_qual = sigma(eta * (S_w - S_l))                                data-quality weight (no gradient)
        w_perf = (1 - sigma(beta * pc - beta * pr - tau_ref))^gamma      model-dynamics (focal) weight
        nll    = -1[rc > pc] * 1[S_w >= tau_good] * pc                   calibrated NLL (the mask has no gradient)
        loss_b = w_qual * w_perf * (-log sigma(dr - margin)) + lam * nll
        loss   = mean_b loss_b                                           (plain batch mean, no weight normalisation)

    * w_perf uses the policy-only (SimPO-style) margin, not dr, with tau_ref subtracted after the beta product. It
      is not detached by default: the gradient flows through it as in focal loss, as in the authors' code.
      ``detach_perf_weight=True`` treats it as a constant. It is computed as exp(gamma * log sigma(-x)), which equals
      (1 - sigma(x))^gamma and is stable for any x; gamma = 0 gives exactly 1.
    * w_qual uses the raw score difference (eta = 0 gives exactly 1/2).
    * ``margin`` (logit units) is 0 in Omni-DPO; DPO-PoP margins plug in here as ``beta * m_s``.
    * With w_qual = w_perf = 1, margin = 0 and lam = 0 this is length-normalised DPO.

    Stats (per example): chosen_reward = beta (pc - rc), rejected_reward = beta (pr - rr), reward_margin = dr,
    accuracy = 1[dr > 0], margin, w_qual, w_perf, preference_loss = -log sigma(dr - margin) (unweighted),
    nll_mask (0/1), nll (not multiplied by lam).
    """
    fn = "omni_dpo_loss"
    _check_inputs(
        fn,
        {
            "policy_chosen": policy_chosen,
            "policy_rejected": policy_rejected,
            "ref_chosen": ref_chosen,
            "ref_rejected": ref_rejected,
            "score_chosen": score_chosen,
            "score_rejected": score_rejected,
            "margin": margin,
        },
        beta=beta,
        eta=eta,
        gamma=gamma,
        tau_ref=tau_ref,
        lam=lam,
        tau_good=tau_good,
    )
    if gamma < 0:
        raise ValueError(f"{fn}: gamma must be >= 0, got {gamma!r}")

    m = _per_example_margin(margin, policy_chosen)
    dr = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    w_qual = torch.sigmoid(eta * (score_chosen - score_rejected).detach().to(policy_chosen))
    if gamma == 0:
        w_perf = torch.ones_like(dr)
    else:
        policy_logit = beta * (policy_chosen - policy_rejected) - tau_ref
        w_perf = torch.exp(gamma * F.logsigmoid(-policy_logit))
        if detach_perf_weight:
            w_perf = w_perf.detach()
    preference_loss = -F.logsigmoid(dr - m)
    nll_mask = ((ref_chosen > policy_chosen) & (score_chosen >= tau_good)).to(policy_chosen.dtype)
    nll = -nll_mask * policy_chosen
    per_example = w_qual * w_perf * preference_loss + lam * nll
    return _output(
        per_example,
        **_reward_stats(beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)),
        margin=m,
        w_qual=w_qual,
        w_perf=w_perf,
        preference_loss=preference_loss,
        nll_mask=nll_mask,
        nll=nll,
    )


def pop_loss(
    policy_margin_strong: Tensor, target_margin_weak: Tensor, *, beta: float, m_min: float, m_max: float
) -> LossOutput:
    """DPO-PoP adaptive-margin loss (arXiv 2509.22851) for PoP tuples (s stronger pair, u weaker pair).

    Inputs are implicit margins M (policy minus reference log-ratio differences), not log-probs:
    ``policy_margin_strong`` = M_theta(s) (gets the gradient), ``target_margin_weak`` = M_target(u).

        m_s    = clip(stopgrad(M_target(u)), m_min, m_max)
        loss_b = -log sigma(beta * (M_theta(s) - m_s))

    ``m_min`` / ``m_max`` are in the units of M (the paper's defaults [0, 10] are for summed log-probs at beta 0.1).

    Stats (per example): policy_margin = M_theta(s), reward_margin = beta M_theta(s), accuracy = 1[M_theta(s) > 0],
    target_margin = M_target(u) before clipping, margin = m_s, clipped = 1 if the target lay outside
    [m_min, m_max] (its mean is the fraction clipped).
    """
    fn = "pop_loss"
    _check_inputs(
        fn,
        {"policy_margin_strong": policy_margin_strong, "target_margin_weak": target_margin_weak},
        beta=beta,
        m_min=m_min,
        m_max=m_max,
    )
    if m_min > m_max:
        raise ValueError(f"{fn}: m_min must be <= m_max, got m_min={m_min!r}, m_max={m_max!r}")

    target = target_margin_weak.detach().to(policy_margin_strong)
    m_s = target.clamp(m_min, m_max)
    per_example = -F.logsigmoid(beta * (policy_margin_strong - m_s))
    dtype = policy_margin_strong.dtype
    return _output(
        per_example,
        policy_margin=policy_margin_strong,
        reward_margin=beta * policy_margin_strong,
        accuracy=(policy_margin_strong > 0).to(dtype),
        target_margin=target,
        margin=m_s,
        clipped=((target < m_min) | (target > m_max)).to(dtype),
    )


def rpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_lengths: Tensor,
    *,
    beta: float,
    alpha: float,
) -> LossOutput:
    """RPO, iterative reasoning preference optimisation (arXiv 2404.19733): DPO plus the chosen response's NLL.

    Log-prob inputs are expected summed (L, the DPO paper's convention); ``chosen_lengths`` = |y_w| (token counts as
    floats). With ``M = (pc - rc) - (pr - rr)``:

        nll    = -pc / |y_w|                                   length-normalised NLL of the chosen response
        loss_b = -log sigma(beta * M) + alpha * nll

    alpha = 0 is exactly DPO; the paper uses alpha = 1 and normalises the NLL by the length of the whole chosen
    response (its reasoning c_w plus answer y_w, i.e. |y_w| here). Pass ``chosen_lengths`` of ones when
    ``policy_chosen`` is already length-normalised.

    Stats (per example): those of :func:`dpo_loss` (chosen_reward, rejected_reward, reward_margin, accuracy, margin),
    preference_loss = -log sigma(beta M), nll (not multiplied by alpha).
    """
    fn = "rpo_loss"
    _check_inputs(
        fn,
        {
            "policy_chosen": policy_chosen,
            "policy_rejected": policy_rejected,
            "ref_chosen": ref_chosen,
            "ref_rejected": ref_rejected,
            "chosen_lengths": chosen_lengths,
        },
        beta=beta,
        alpha=alpha,
    )
    if alpha < 0:
        raise ValueError(f"{fn}: alpha must be >= 0, got {alpha!r}")
    chosen_reward, rejected_reward = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    preference_loss = -F.logsigmoid(chosen_reward - rejected_reward)
    nll = -policy_chosen / chosen_lengths.to(policy_chosen)
    return _output(
        preference_loss + alpha * nll,
        **_reward_stats(chosen_reward, rejected_reward),
        margin=torch.zeros_like(preference_loss),
        preference_loss=preference_loss,
        nll=nll,
    )


def rft_loss(policy_chosen: Tensor, score_chosen: Tensor, *, tau_good: float) -> LossOutput:
    """Rejection-sampling fine-tuning (RFT, arXiv 2308.01825) on the chosen responses that pass the verifier.

    Reference-free supervised fine-tuning on the model's own samples: ``policy_chosen`` is expected length-normalised
    (l_theta(y_w)), and only chosen responses scored at least ``tau_good`` (verified) are trained on:

        verified_b = 1[S_w >= tau_good]                        (no gradient)
        loss_b     = -verified_b * pc
        loss       = mean_b loss_b                             (plain batch mean: unverified pairs contribute 0)

    The rejected response is not used. Because the mean runs over the whole batch, the step size scales with the
    verified fraction, as the calibrated NLL of :func:`omni_dpo_loss` does.

    Stats (per example): nll_mask = verified_b (0/1; its sum counts the pairs trained on), nll = -pc (unmasked),
    margin = 0 (no margin is applied).
    """
    _check_inputs("rft_loss", {"policy_chosen": policy_chosen, "score_chosen": score_chosen}, tau_good=tau_good)
    verified = (score_chosen >= tau_good).to(policy_chosen.dtype)
    nll = -policy_chosen
    return _output(verified * nll, nll_mask=verified, nll=nll, margin=torch.zeros_like(policy_chosen))
