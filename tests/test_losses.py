"""Tests for omni_ray.losses: hand-computed values, reductions between losses, gradients, stability, validation.

Expected values are written out with math.log / math.exp from the equations, never by calling the code under test.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from omni_ray.losses import LossOutput, dpo_loss, odpo_margin, omni_dpo_loss, pop_loss, rft_loss, rpo_loss, simpo_loss


def t(*values: float, grad: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def neg_log_sig(z: float) -> float:
    """-log sigma(z) = log(1 + exp(-z))."""
    return math.log1p(math.exp(-z))


def assert_values(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=actual.dtype), rtol=1e-12, atol=1e-12)


# A 2-pair batch shared by the DPO tests. With beta = 0.5:
#   M_0 = (-1.0 + 1.5) - (-3.0 + 2.5) = 1.0   -> z_0 = 0.5
#   M_1 = (-2.0 + 2.0) - (-1.5 + 1.0) = 0.5   -> z_1 = 0.25
def dpo_batch(grad: bool = False) -> dict[str, torch.Tensor]:
    return {
        "policy_chosen": t(-1.0, -2.0, grad=grad),
        "policy_rejected": t(-3.0, -1.5, grad=grad),
        "ref_chosen": t(-1.5, -2.0),
        "ref_rejected": t(-2.5, -1.0),
    }


# A 3-pair batch for Omni-DPO with beta=2, eta=0.7, gamma=3, tau_ref=1, lam=0.2, tau_good=5:
#   pair 0: dr = 2*((-1+1.2) - (-1.5+1.4)) = 0.6,  x = 2*(-1+1.5) - 1 = 0,  gap 6,    mask 0 (ref below policy)
#   pair 1: dr = 2*((-2+1.5) - (-1+1.2))  = -1.4, x = 2*(-2+1) - 1 = -3,    gap -0.5, mask 1, nll = 2
#   pair 2: dr = 2*((-0.5+0.4) - (-2+1.5)) = 0.8, x = 2*(-0.5+2) - 1 = 2,   gap 3,    mask 0 (score 4 < tau_good)
OMNI_KW = {"beta": 2.0, "eta": 0.7, "gamma": 3.0, "tau_ref": 1.0, "lam": 0.2, "tau_good": 5.0}


def omni_batch(grad: bool = False) -> dict[str, torch.Tensor]:
    return {
        "policy_chosen": t(-1.0, -2.0, -0.5, grad=grad),
        "policy_rejected": t(-1.5, -1.0, -2.0, grad=grad),
        "ref_chosen": t(-1.2, -1.5, -0.4),
        "ref_rejected": t(-1.4, -1.2, -1.5),
        "score_chosen": t(8.0, 6.0, 4.0),
        "score_rejected": t(2.0, 6.5, 1.0),
    }


# ---------------------------------------------------------------- hand-computed values


def test_dpo_matches_hand_computed_values() -> None:
    out = dpo_loss(**dpo_batch(), beta=0.5)
    expected = [neg_log_sig(0.5), neg_log_sig(0.25)]
    assert_values(out.per_example, expected)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-12)
    assert_values(out.stats["chosen_reward"], [0.5 * 0.5, 0.0])
    assert_values(out.stats["rejected_reward"], [0.5 * -0.5, 0.5 * -0.5])
    assert_values(out.stats["reward_margin"], [0.5, 0.25])
    assert_values(out.stats["accuracy"], [1.0, 1.0])
    assert_values(out.stats["margin"], [0.0, 0.0])


def test_dpo_float_margin_is_subtracted_after_beta() -> None:
    out = dpo_loss(**dpo_batch(), beta=0.5, margin=0.2)
    assert_values(out.per_example, [neg_log_sig(0.5 - 0.2), neg_log_sig(0.25 - 0.2)])
    assert_values(out.stats["margin"], [0.2, 0.2])


def test_dpo_margin_equal_to_beta_times_implicit_margin_gives_log_two() -> None:
    out = dpo_loss(**dpo_batch(), beta=0.5, margin=t(0.5, 0.25))
    assert_values(out.per_example, [math.log(2.0), math.log(2.0)])


def test_cdpo_label_smoothing_matches_hand_computed_values() -> None:
    eps = 0.1
    out = dpo_loss(**dpo_batch(), beta=0.5, label_smoothing=eps)
    expected = [(1 - eps) * neg_log_sig(z) + eps * neg_log_sig(-z) for z in (0.5, 0.25)]
    assert_values(out.per_example, expected)


def test_cdpo_with_half_smoothing_is_symmetric_in_chosen_and_rejected() -> None:
    b = dpo_batch()
    swapped = {
        "policy_chosen": b["policy_rejected"],
        "policy_rejected": b["policy_chosen"],
        "ref_chosen": b["ref_rejected"],
        "ref_rejected": b["ref_chosen"],
    }
    forward = dpo_loss(**b, beta=0.5, label_smoothing=0.5)
    backward = dpo_loss(**swapped, beta=0.5, label_smoothing=0.5)
    torch.testing.assert_close(forward.per_example, backward.per_example)
    assert not torch.allclose(dpo_loss(**b, beta=0.5).loss, dpo_loss(**swapped, beta=0.5).loss)


def test_ipo_matches_hand_computed_values() -> None:
    # beta = 0.5 -> target 1 / (2 beta) = 1: (1.0 - 1)^2 = 0, (0.5 - 1)^2 = 0.25
    out = dpo_loss(**dpo_batch(), beta=0.5, loss_type="ipo")
    assert_values(out.per_example, [0.0, 0.25])
    assert out.loss.item() == pytest.approx(0.125, rel=1e-12)


def test_ipo_margin_is_applied_in_logit_units() -> None:
    # margin 0.25 at beta 0.5 moves the target to 0.25/0.5 + 1 = 1.5
    out = dpo_loss(**dpo_batch(), beta=0.5, margin=0.25, loss_type="ipo")
    assert_values(out.per_example, [(1.0 - 1.5) ** 2, (0.5 - 1.5) ** 2])


def test_ipo_target_is_one_over_two_beta() -> None:
    # summed margins M = [1.0, -0.5] at beta 2: target 1/4, (1 - 0.25)^2 = (-0.5 - 0.25)^2 = 0.5625
    zero = t(0.0, 0.0)
    out = dpo_loss(t(1.0, -0.5), zero, zero, zero, beta=2.0, loss_type="ipo")
    assert_values(out.per_example, [0.5625, 0.5625])


def test_cdpo_with_full_smoothing_trains_on_the_flipped_label() -> None:
    out = dpo_loss(**dpo_batch(), beta=0.5, label_smoothing=1.0)
    assert_values(out.per_example, [neg_log_sig(-0.5), neg_log_sig(-0.25)])


def test_accuracy_counts_a_zero_margin_as_wrong() -> None:
    zero = t(0.0, 0.0, 0.0)
    out = dpo_loss(t(-0.5, 0.0, 0.5), zero, zero, zero, beta=1.0)
    assert_values(out.stats["accuracy"], [0.0, 0.0, 1.0])


def test_a_batch_of_one_pair_is_accepted() -> None:
    one = t(-1.0)
    assert_values(dpo_loss(one, t(-2.0), one, one, beta=1.0).per_example, [neg_log_sig(1.0)])


def test_simpo_matches_hand_computed_values() -> None:
    # z = beta * (pc - pr) - gamma: 2 * 0.5 - 0.5 = 0.5 and 2 * (-0.3) - 0.5 = -1.1
    out = simpo_loss(t(-0.5, -1.2), t(-1.0, -0.9), beta=2.0, gamma=0.5)
    assert_values(out.per_example, [neg_log_sig(0.5), neg_log_sig(-1.1)])
    assert_values(out.stats["chosen_reward"], [-1.0, -2.4])
    assert_values(out.stats["rejected_reward"], [-2.0, -1.8])
    assert_values(out.stats["accuracy"], [1.0, 0.0])
    assert_values(out.stats["margin"], [0.5, 0.5])


def test_omni_matches_hand_computed_values() -> None:
    out = omni_dpo_loss(**omni_batch(), **OMNI_KW)
    w_qual = [sig(0.7 * 6.0), sig(0.7 * -0.5), sig(0.7 * 3.0)]
    w_perf = [(1 - sig(0.0)) ** 3, (1 - sig(-3.0)) ** 3, (1 - sig(2.0)) ** 3]
    pref = [neg_log_sig(0.6), neg_log_sig(-1.4), neg_log_sig(0.8)]
    nll = [0.0, 2.0, 0.0]
    expected = [w_qual[i] * w_perf[i] * pref[i] + 0.2 * nll[i] for i in range(3)]
    assert_values(out.per_example, expected)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert_values(out.stats["w_qual"], w_qual)
    assert_values(out.stats["w_perf"], w_perf)
    assert_values(out.stats["preference_loss"], pref)
    assert_values(out.stats["nll_mask"], [0.0, 1.0, 0.0])
    assert_values(out.stats["nll"], nll)
    assert_values(out.stats["reward_margin"], [0.6, -1.4, 0.8])
    assert_values(out.stats["accuracy"], [1.0, 0.0, 1.0])


def test_omni_margin_is_subtracted_from_dr() -> None:
    kw = {**OMNI_KW, "lam": 0.0}
    out = omni_dpo_loss(**omni_batch(), **kw, margin=t(0.6, 0.0, -0.2))
    w = out.stats["w_qual"] * out.stats["w_perf"]
    expected = [math.log(2.0), neg_log_sig(-1.4), neg_log_sig(1.0)]
    assert_values(out.per_example / w, expected)


def test_pop_clips_the_target_margin_and_matches_hand_computed_values() -> None:
    out = pop_loss(t(1.0, 2.0, 3.0), t(-1.0, 5.0, 20.0), beta=0.1, m_min=0.0, m_max=10.0)
    # m_s = [0, 5, 10]; z = 0.1 * (M_s - m_s) = [0.1, -0.3, -0.7]
    assert_values(out.per_example, [neg_log_sig(0.1), neg_log_sig(-0.3), neg_log_sig(-0.7)])
    assert_values(out.stats["margin"], [0.0, 5.0, 10.0])
    assert_values(out.stats["target_margin"], [-1.0, 5.0, 20.0])
    assert_values(out.stats["clipped"], [1.0, 0.0, 1.0])
    assert out.stats["clipped"].mean().item() == pytest.approx(2 / 3)


def test_omni_perf_weight_with_gamma_one_is_one_minus_sigmoid() -> None:
    out = omni_dpo_loss(**omni_batch(), **{**OMNI_KW, "gamma": 1.0})
    assert_values(out.stats["w_perf"], [1 - sig(0.0), 1 - sig(-3.0), 1 - sig(2.0)])


def test_pop_stats_accuracy_reward_margin_and_clip_boundaries() -> None:
    # targets at exactly m_min / m_max are inside the bounds (not clipped); accuracy needs M > 0
    out = pop_loss(t(-1.0, 0.0, 0.5, 2.0), t(0.0, 10.0, -3.0, 11.0), beta=0.1, m_min=0.0, m_max=10.0)
    assert_values(out.stats["clipped"], [0.0, 0.0, 1.0, 1.0])
    assert_values(out.stats["accuracy"], [0.0, 0.0, 1.0, 1.0])
    assert_values(out.stats["reward_margin"], [-0.1, 0.0, 0.05, 0.2])
    assert_values(out.stats["policy_margin"], [-1.0, 0.0, 0.5, 2.0])


def test_pop_with_equal_bounds_uses_that_one_margin() -> None:
    out = pop_loss(t(1.0, 3.0), t(-5.0, 5.0), beta=1.0, m_min=1.0, m_max=1.0)
    assert_values(out.stats["margin"], [1.0, 1.0])
    assert_values(out.per_example, [math.log(2.0), neg_log_sig(2.0)])


def test_odpo_margin_is_alpha_log_score_gap() -> None:
    margin = odpo_margin(t(3.0, 5.0), t(1.0, 4.5), alpha=0.5)
    assert_values(margin, [0.5 * math.log(2.0), 0.5 * math.log(0.5)])


def test_odpo_margin_clamps_zero_and_negative_gaps_to_a_finite_offset() -> None:
    margin = odpo_margin(t(1.0, 1.0), t(1.0, 2.0), alpha=1.0)
    assert torch.isfinite(margin).all()
    assert_values(margin, [math.log(1e-6), math.log(1e-6)])


def test_odpo_is_margin_dpo_with_the_odpo_offset() -> None:
    score_chosen, score_rejected = t(3.0, 5.0, grad=True), t(1.0, 4.5)
    margin = odpo_margin(score_chosen, score_rejected, alpha=1.0)
    assert not margin.requires_grad
    out = dpo_loss(**dpo_batch(), beta=0.5, margin=margin)
    assert_values(out.per_example, [neg_log_sig(0.5 - math.log(2.0)), neg_log_sig(0.25 - math.log(0.5))])


def test_rpo_matches_hand_computed_values() -> None:
    # DPO part as above (z = 0.5, 0.25); NLL = -pc / |y_w| = 1.0 / 2 and 2.0 / 5; alpha 0.5
    out = rpo_loss(**dpo_batch(), chosen_lengths=t(2.0, 5.0), beta=0.5, alpha=0.5)
    expected = [neg_log_sig(0.5) + 0.5 * 0.5, neg_log_sig(0.25) + 0.5 * 0.4]
    assert_values(out.per_example, expected)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-12)
    assert_values(out.stats["nll"], [0.5, 0.4])
    assert_values(out.stats["preference_loss"], [neg_log_sig(0.5), neg_log_sig(0.25)])
    assert_values(out.stats["reward_margin"], [0.5, 0.25])


def test_rpo_gradient_adds_the_length_normalised_nll_to_dpo() -> None:
    b = dpo_batch(grad=True)
    rpo_loss(**b, chosen_lengths=t(2.0, 5.0), beta=0.5, alpha=0.5).per_example.sum().backward()
    assert_values(b["policy_chosen"].grad, [-0.5 * sig(-0.5) - 0.5 / 2.0, -0.5 * sig(-0.25) - 0.5 / 5.0])
    assert_values(b["policy_rejected"].grad, [0.5 * sig(-0.5), 0.5 * sig(-0.25)])


def test_rft_trains_only_on_verified_chosen_responses() -> None:
    pc = t(-0.5, -2.0, -1.0, grad=True)
    out = rft_loss(pc, t(10.0, 9.9, 10.0), tau_good=10.0)
    assert_values(out.per_example, [0.5, 0.0, 1.0])
    assert out.loss.item() == pytest.approx(1.5 / 3, rel=1e-12)  # plain batch mean: the unverified pair counts as 0
    assert_values(out.stats["nll_mask"], [1.0, 0.0, 1.0])
    assert_values(out.stats["nll"], [0.5, 2.0, 1.0])
    assert_values(out.stats["margin"], [0.0, 0.0, 0.0])
    out.loss.backward()
    assert_values(pc.grad, [-1 / 3, 0.0, -1 / 3])


def test_rft_ignores_the_log_probs_of_unverified_pairs() -> None:
    scores = t(10.0, 3.0, 10.0)
    a = rft_loss(t(-0.5, -2.0, -1.0), scores, tau_good=10.0)
    b = rft_loss(t(-0.5, -50.0, -1.0), scores, tau_good=10.0)
    assert torch.equal(a.per_example, b.per_example)
    none = rft_loss(t(-0.5, -2.0, -1.0), t(9.0, 3.0, 0.0), tau_good=10.0)
    assert none.loss.item() == 0.0 and none.stats["nll_mask"].sum().item() == 0.0


# ---------------------------------------------------------------- reductions


def test_rpo_with_alpha_zero_is_dpo() -> None:
    rpo = rpo_loss(**dpo_batch(), chosen_lengths=t(2.0, 5.0), beta=0.5, alpha=0.0)
    dpo = dpo_loss(**dpo_batch(), beta=0.5)
    torch.testing.assert_close(rpo.per_example, dpo.per_example, rtol=0, atol=0)
    for key, value in dpo.stats.items():
        torch.testing.assert_close(rpo.stats[key], value, rtol=0, atol=0)


def test_omni_eta_zero_gives_quality_weight_of_exactly_one_half() -> None:
    out = omni_dpo_loss(**omni_batch(), **{**OMNI_KW, "eta": 0.0})
    assert torch.equal(out.stats["w_qual"], torch.full((3,), 0.5, dtype=torch.float64))


def test_omni_gamma_zero_gives_perf_weight_of_exactly_one() -> None:
    out = omni_dpo_loss(**omni_batch(), **{**OMNI_KW, "gamma": 0.0})
    assert torch.equal(out.stats["w_perf"], torch.ones(3, dtype=torch.float64))


def test_omni_reduces_to_length_normalised_dpo_when_weights_are_one() -> None:
    b = omni_batch()
    b["score_chosen"], b["score_rejected"] = t(100.0, 100.0, 100.0), t(0.0, 0.0, 0.0)  # sigma(1 * 100) == 1.0
    omni = omni_dpo_loss(**b, **{**OMNI_KW, "eta": 1.0, "gamma": 0.0, "lam": 0.0}, margin=0.0)
    dpo = dpo_loss(b["policy_chosen"], b["policy_rejected"], b["ref_chosen"], b["ref_rejected"], beta=2.0)
    assert torch.equal(omni.stats["w_qual"], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(omni.per_example, dpo.per_example, rtol=0, atol=0)


def test_omni_with_eta_zero_is_half_length_normalised_dpo() -> None:
    b = omni_batch()
    omni = omni_dpo_loss(**b, **{**OMNI_KW, "eta": 0.0, "gamma": 0.0, "lam": 0.0}, margin=0.0)
    dpo = dpo_loss(b["policy_chosen"], b["policy_rejected"], b["ref_chosen"], b["ref_rejected"], beta=2.0)
    torch.testing.assert_close(omni.per_example / omni.stats["w_qual"], dpo.per_example, rtol=0, atol=0)
    torch.testing.assert_close(omni.per_example, 0.5 * dpo.per_example, rtol=0, atol=0)


# ---------------------------------------------------------------- gradients


def _omni_grad_policy_chosen(detach: bool) -> tuple[torch.Tensor, LossOutput]:
    b = omni_batch(grad=True)
    out = omni_dpo_loss(**b, **{**OMNI_KW, "lam": 0.0}, detach_perf_weight=detach)
    out.per_example.sum().backward()
    return b["policy_chosen"].grad, out


def test_omni_gradient_flows_through_perf_weight_unless_detached() -> None:
    beta, gamma = OMNI_KW["beta"], OMNI_KW["gamma"]
    grad_detached, out = _omni_grad_policy_chosen(detach=True)
    grad_focal, _ = _omni_grad_policy_chosen(detach=False)
    assert not torch.allclose(grad_detached, grad_focal)

    dr, x = [0.6, -1.4, 0.8], [0.0, -3.0, 2.0]
    w_qual, w_perf = out.stats["w_qual"].tolist(), out.stats["w_perf"].tolist()
    # d(-log sigma(dr))/d pc = -sigma(-dr) * beta ; d w_perf / d pc = gamma * w_perf * (-sigma(x)) * beta
    through_loss = [w_qual[i] * w_perf[i] * -sig(-dr[i]) * beta for i in range(3)]
    through_weight = [w_qual[i] * neg_log_sig(dr[i]) * gamma * w_perf[i] * -sig(x[i]) * beta for i in range(3)]
    assert_values(grad_detached, through_loss)
    assert_values(grad_focal, [a + b for a, b in zip(through_loss, through_weight, strict=True)])


def test_omni_nll_mask_selects_ref_above_policy_and_good_score_and_has_no_gradient() -> None:
    b = omni_batch(grad=True)
    b["ref_chosen"].requires_grad_(True)
    b["score_chosen"].requires_grad_(True)
    with_nll = omni_dpo_loss(**b, **OMNI_KW)
    with_nll.per_example.sum().backward()
    grads = {k: None if v.grad is None else v.grad.clone() for k, v in b.items()}
    assert_values(with_nll.stats["nll_mask"], [0.0, 1.0, 0.0])
    assert not with_nll.stats["nll_mask"].requires_grad
    assert grads["score_chosen"] is None  # scores are data: neither w_qual nor the mask carries gradient

    for v in b.values():
        v.grad = None
    without_nll = omni_dpo_loss(**b, **{**OMNI_KW, "lam": 0.0})
    without_nll.per_example.sum().backward()
    # the NLL term only adds -lam * mask to d/d pc, and nothing to d/d ref_chosen
    assert_values(grads["policy_chosen"] - b["policy_chosen"].grad, [0.0, -0.2, 0.0])
    torch.testing.assert_close(grads["ref_chosen"], b["ref_chosen"].grad)


def test_omni_nll_mask_includes_score_equal_to_tau_good_and_excludes_ref_equal_to_policy() -> None:
    # pair 0: ref above policy, score == tau_good (inside); pair 1: ref == policy (outside);
    # pair 2: ref above policy, score just below tau_good (outside); pair 3: ref just above policy (inside)
    out = omni_dpo_loss(
        t(-1.0, -2.0, -1.0, -1.0),
        t(-2.0, -2.0, -2.0, -2.0),
        t(-0.5, -2.0, -0.5, -1.0 + 1e-9),
        t(-2.0, -2.0, -2.0, -2.0),
        t(5.0, 9.0, 5.0 - 1e-9, 9.0),
        t(0.0, 0.0, 0.0, 0.0),
        **OMNI_KW,
    )
    assert_values(out.stats["nll_mask"], [1.0, 0.0, 0.0, 1.0])
    assert_values(out.stats["nll"], [1.0, 0.0, 0.0, 1.0])


def test_omni_perf_weight_is_not_detached_by_default() -> None:
    grad_focal, _ = _omni_grad_policy_chosen(detach=False)
    b = omni_batch(grad=True)
    omni_dpo_loss(**b, **{**OMNI_KW, "lam": 0.0}).per_example.sum().backward()
    torch.testing.assert_close(b["policy_chosen"].grad, grad_focal, rtol=0, atol=0)


def test_pop_gradient_reaches_the_strong_margin_only() -> None:
    strong, target = t(1.0, 2.0, 3.0, grad=True), t(-1.0, 5.0, 20.0, grad=True)
    out = pop_loss(strong, target, beta=0.1, m_min=0.0, m_max=10.0)
    out.loss.backward()
    assert target.grad is None
    # d/dM_s mean(-log sigma(beta (M_s - m_s))) = -beta * sigma(-z) / B
    assert_values(strong.grad, [-0.1 * sig(-z) / 3 for z in (0.1, -0.3, -0.7)])


def test_dpo_gradient_matches_analytic_derivative() -> None:
    b = dpo_batch(grad=True)
    dpo_loss(**b, beta=0.5).per_example.sum().backward()
    assert_values(b["policy_chosen"].grad, [-0.5 * sig(-0.5), -0.5 * sig(-0.25)])
    assert_values(b["policy_rejected"].grad, [0.5 * sig(-0.5), 0.5 * sig(-0.25)])


# ---------------------------------------------------------------- numerical stability

EXTREME = [(1e4, -1e4, 0.0, 0.0), (-1e4, 1e4, 0.0, 0.0), (1e4, 1e4, -1e4, -1e4), (-1e4, -1e4, 1e4, 1e4)]


def _extreme(grad: bool = True) -> dict[str, torch.Tensor]:
    columns = list(zip(*EXTREME, strict=True))
    names = ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"]
    return {n: t(*c, grad=grad, dtype=torch.float32) for n, c in zip(names, columns, strict=True)}


def _assert_finite(out: LossOutput, *inputs: torch.Tensor) -> None:
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.per_example).all()
    assert all(torch.isfinite(v).all() for v in out.stats.values())
    for x in inputs:
        if x.requires_grad:
            assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs", [{}, {"label_smoothing": 0.2}, {"loss_type": "ipo"}, {"margin": 1e4}])
def test_dpo_is_finite_with_gradients_for_extreme_log_probs(kwargs: dict) -> None:
    b = _extreme()
    _assert_finite(dpo_loss(**b, beta=2.0, **kwargs), *b.values())


def test_dpo_at_extreme_logits_is_exact_not_clamped() -> None:
    # beta * M = [4e4, -4e4, 0]: loss = [0, 4e4, log 2], d loss / d M = -beta * sigma(-beta M) = [0, -beta, -beta/2]
    b = {
        "policy_chosen": t(2e4, -2e4, 0.0, grad=True),
        "policy_rejected": t(0.0, 0.0, 0.0, grad=True),
        "ref_chosen": t(0.0, 0.0, 0.0),
        "ref_rejected": t(0.0, 0.0, 0.0),
    }
    out = dpo_loss(**b, beta=2.0)
    assert_values(out.per_example, [0.0, 4e4, math.log(2.0)])
    out.per_example.sum().backward()
    assert_values(b["policy_chosen"].grad, [0.0, -2.0, -1.0])
    assert_values(b["policy_rejected"].grad, [0.0, 2.0, 1.0])


def test_simpo_is_finite_with_gradients_for_extreme_log_probs() -> None:
    b = _extreme()
    policy = (b["policy_chosen"], b["policy_rejected"])
    _assert_finite(simpo_loss(*policy, beta=2.0, gamma=1.0), *policy)


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 3.0])
def test_omni_is_finite_with_gradients_for_extreme_log_probs(detach: bool, gamma: float) -> None:
    b = _extreme()
    scores = {"score_chosen": t(1e4, -1e4, 9.0, 9.0, dtype=torch.float32)}
    scores["score_rejected"] = t(-1e4, 1e4, 0.0, 0.0, dtype=torch.float32)
    kw = {**OMNI_KW, "gamma": gamma, "tau_good": 0.0}
    out = omni_dpo_loss(**b, **scores, **kw, margin=-1e4, detach_perf_weight=detach)
    assert out.stats["nll_mask"].sum() > 0
    _assert_finite(out, *b.values())


def test_rpo_and_rft_are_finite_with_gradients_for_extreme_log_probs() -> None:
    b = _extreme()
    lengths = t(1.0, 1.0, 3.0, 3.0, dtype=torch.float32)
    _assert_finite(rpo_loss(**b, chosen_lengths=lengths, beta=2.0, alpha=1.0), *b.values())
    pc = t(1e4, -1e4, 1e4, -1e4, grad=True, dtype=torch.float32)
    _assert_finite(rft_loss(pc, t(10.0, 10.0, 0.0, 10.0, dtype=torch.float32), tau_good=10.0), pc)


def test_pop_is_finite_with_gradients_for_extreme_margins() -> None:
    strong = t(1e4, -1e4, 1e4, -1e4, grad=True, dtype=torch.float32)
    target = t(1e4, 1e4, -1e4, -1e4, dtype=torch.float32)
    _assert_finite(pop_loss(strong, target, beta=0.1, m_min=-1e4, m_max=1e4), strong)


# ---------------------------------------------------------------- outputs and validation

FUNCTIONS = {
    "dpo_loss": (dpo_loss, ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"], {"beta": 0.1}),
    "simpo_loss": (simpo_loss, ["policy_chosen", "policy_rejected"], {"beta": 2.0, "gamma": 0.5}),
    "omni_dpo_loss": (
        omni_dpo_loss,
        ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "score_chosen", "score_rejected"],
        OMNI_KW,
    ),
    "pop_loss": (pop_loss, ["policy_margin_strong", "target_margin_weak"], {"beta": 0.1, "m_min": 0.0, "m_max": 10.0}),
    "odpo_margin": (odpo_margin, ["score_chosen", "score_rejected"], {"alpha": 1.0}),
    "rpo_loss": (
        rpo_loss,
        ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_lengths"],
        {"beta": 0.1, "alpha": 1.0},
    ),
    "rft_loss": (rft_loss, ["policy_chosen", "score_chosen"], {"tau_good": 10.0}),
}
PREFERENCE_LOSSES = [f for f in FUNCTIONS if f not in ("odpo_margin", "rft_loss")]
ARGUMENTS = [(fn, arg) for fn, (_, args, _) in FUNCTIONS.items() for arg in args]


def _call(fn: str, replace: dict[str, torch.Tensor] | None = None, **extra: object):
    func, args, kwargs = FUNCTIONS[fn]
    inputs = [(replace or {}).get(a, torch.linspace(-2.0, 1.0, 5, dtype=torch.float64) + i) for i, a in enumerate(args)]
    return func(*inputs, **{**kwargs, **extra})


@pytest.mark.parametrize("fn", [f for f in FUNCTIONS if f != "odpo_margin"])
def test_every_loss_returns_frozen_output_with_detached_per_example_stats(fn: str) -> None:
    out = _call(fn)
    assert isinstance(out, LossOutput)
    assert out.loss.shape == () and out.per_example.shape == (5,)
    assert "margin" in out.stats  # the driver records every pair's margin
    assert {"reward_margin", "accuracy"} <= out.stats.keys() or fn == "rft_loss"
    for value in out.stats.values():
        assert value.shape == (5,) and not value.requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.loss = out.loss  # type: ignore[misc]


@pytest.mark.parametrize(("fn", "arg"), ARGUMENTS)
def test_nan_input_raises_value_error_naming_the_argument_and_index(fn: str, arg: str) -> None:
    bad = torch.zeros(5, dtype=torch.float64)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match=f"^{fn}: {arg} contains NaN at index 3$"):
        _call(fn, {arg: bad})


@pytest.mark.parametrize("fn", ["dpo_loss", "omni_dpo_loss"])
def test_nan_margin_raises_value_error(fn: str) -> None:
    margin = torch.tensor([0.0, float("nan"), 0.0, float("nan"), 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{fn}: margin contains NaN at index 1 \\(2 NaN values in total\\)"):
        _call(fn, margin=margin)
    with pytest.raises(ValueError, match="margin must be a finite number"):
        _call(fn, margin=float("nan"))


@pytest.mark.parametrize(("fn", "arg"), [(fn, arg) for fn, arg in ARGUMENTS if arg != FUNCTIONS[fn][1][0]])
def test_shape_mismatch_raises_value_error_naming_both_arguments(fn: str, arg: str) -> None:
    first = FUNCTIONS[fn][1][0]
    with pytest.raises(ValueError, match=f"shape mismatch: {arg} has shape \\(4,\\) but {first} has shape \\(5,\\)"):
        _call(fn, {arg: torch.zeros(4, dtype=torch.float64)})


@pytest.mark.parametrize("fn", ["dpo_loss", "omni_dpo_loss"])
def test_margin_of_wrong_shape_raises(fn: str) -> None:
    with pytest.raises(ValueError, match="shape mismatch: margin"):
        _call(fn, margin=torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_non_vector_input_raises(fn: str) -> None:
    arg = FUNCTIONS[fn][1][0]
    with pytest.raises(ValueError, match=f"{arg} must be a non-empty 1-D tensor"):
        _call(fn, {arg: torch.zeros(5, 1, dtype=torch.float64)})
    with pytest.raises(ValueError, match=f"{arg} must be a floating-point tensor"):
        _call(fn, {arg: torch.zeros(5, dtype=torch.long)})


@pytest.mark.parametrize("fn", PREFERENCE_LOSSES)
@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_non_positive_beta_raises(fn: str, beta: float) -> None:
    with pytest.raises(ValueError, match=f"{fn}: beta must be > 0"):
        _call(fn, beta=beta)


@pytest.mark.parametrize(
    ("fn", "extra", "message"),
    [
        ("dpo_loss", {"beta": float("inf")}, "beta must be a finite number"),
        ("dpo_loss", {"loss_type": "hinge"}, "loss_type must be 'sigmoid' or 'ipo'"),
        ("dpo_loss", {"label_smoothing": 1.5}, "label_smoothing must be in \\[0, 1\\]"),
        ("dpo_loss", {"label_smoothing": 0.1, "loss_type": "ipo"}, "label_smoothing applies to loss_type='sigmoid'"),
        ("omni_dpo_loss", {"gamma": -1.0}, "gamma must be >= 0"),
        ("omni_dpo_loss", {"tau_good": float("nan")}, "tau_good must be a finite number"),
        ("pop_loss", {"m_min": 5.0, "m_max": 1.0}, "m_min must be <= m_max"),
        ("odpo_margin", {"alpha": float("inf")}, "alpha must be a finite number"),
        ("rpo_loss", {"alpha": -1.0}, "alpha must be >= 0"),
        ("rft_loss", {"tau_good": float("nan")}, "tau_good must be a finite number"),
    ],
)
def test_invalid_hyperparameters_raise(fn: str, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"{fn}: {message}"):
        _call(fn, **extra)


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_empty_input_raises(fn: str) -> None:
    arg = FUNCTIONS[fn][1][0]
    with pytest.raises(ValueError, match=f"{fn}: {arg} must be a non-empty 1-D tensor"):
        _call(fn, {arg: torch.zeros(0, dtype=torch.float64)})


def test_a_bool_hyperparameter_is_refused() -> None:
    with pytest.raises(ValueError, match="dpo_loss: beta must be a finite number, got True"):
        _call("dpo_loss", beta=True)


def test_rpo_refuses_non_positive_lengths() -> None:
    with pytest.raises(ValueError, match="rpo_loss: chosen_lengths must be > 0"):
        _call("rpo_loss", {"chosen_lengths": t(1.0, 2.0, 0.0, 1.0, 1.0)})
