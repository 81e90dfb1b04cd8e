"""Loss selection by name (omni_ray.learner.objective), without DeepSpeed or Ray.

Every expected value is worked out by hand from the papers' equations (docs/methods.md sec. 1-3) with math.log /
math.exp on literal numbers, never by calling omni_ray.losses.
"""

import dataclasses
import math

import pytest
import torch

from omni_ray.config import load_config
from omni_ray.learner.objective import LOSSES, POP_LOSSES, BatchLogps, Objective


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def nls(z: float) -> float:
    """-log sigma(z)."""
    return math.log1p(math.exp(-z))


def _objective(*overrides: str) -> Objective:
    cfg = load_config(None, list(overrides))
    return Objective(cfg.loss, cfg.pop)


# Summed log-probs L(y) of a 2-pair batch and the response lengths |y| (all != 1):
#   pair 0: pc -2 (|y_w| 2), pr -6 (|y_l| 4), rc -3, rr -5, scores 9 / 1 (gap 8)
#   pair 1: pc -6 (|y_w| 3), pr -3 (|y_l| 2), rc -4.5, rr -4, scores 6 / 5 (gap 1)
# Summed implicit margins M = (pc - rc) - (pr - rr):        [1 - (-1), -1.5 - 1]        = [2.0, -2.5]
# Length-normalised l = L / |y|: pc [-1, -2], pr [-1.5, -1.5], rc [-1.5, -1.5], rr [-1.25, -2]
#   M = (pc - rc) - (pr - rr):                               [0.5 + 0.25, -0.5 - 0.5]     = [0.75, -1.0]
#   pc - pr (SimPO / Omni-DPO policy-only margin):                                        = [0.5, -0.5]
SUMMED = {"pc": t(-2.0, -6.0), "pr": t(-6.0, -3.0), "rc": t(-3.0, -4.5), "rr": t(-5.0, -4.0)}
CHOSEN_LENGTHS, REJECTED_LENGTHS = t(2.0, 3.0), t(4.0, 2.0)
TARGETS = (0.5, 3.0)  # PoP target margins before clipping; 3.0 lies above m_max = 1.5


def _batch(obj: Objective, target: tuple[float, float] | None = TARGETS) -> BatchLogps:
    """The batch above, put into the objective's convention as the learner does."""
    return BatchLogps(
        policy_chosen=obj.convention(SUMMED["pc"], CHOSEN_LENGTHS),
        policy_rejected=obj.convention(SUMMED["pr"], REJECTED_LENGTHS),
        ref_chosen=obj.convention(SUMMED["rc"], CHOSEN_LENGTHS),
        ref_rejected=obj.convention(SUMMED["rr"], REJECTED_LENGTHS),
        score_chosen=t(9.0, 6.0),
        score_rejected=t(1.0, 5.0),
        target_margin=None if target is None else t(*target),
        chosen_lengths=CHOSEN_LENGTHS,
    )


DPO_BETA = "loss.beta=0.5"  # z = beta * M (summed) = [1.0, -1.25]
POP_CLIP = ("pop.m_min=0", "pop.m_max=1.5")  # targets [0.5, 3.0] -> m = [0.5, 1.5]
OMNI = ("loss.beta=2", "loss.eta=0.5", "loss.gamma=2", "loss.tau_ref=0.5", "loss.lam=0.5", "loss.tau_good=6")


def _omni(margin: tuple[float, float]) -> list[float]:
    # dr = 2 * [0.75, -1.0] = [1.5, -2.0]; w_qual = sigma(0.5 * [8, 1]);
    # w_perf = (1 - sigma(2 * [0.5, -0.5] - 0.5))^2 = (1 - sigma([0.5, -1.5]))^2;
    # nll mask: pair 0 rc -1.5 < pc -1 (no); pair 1 rc -1.5 > pc -2 and score 6 >= tau_good 6 (yes): nll = 2.
    w_qual, w_perf = (sig(4.0), sig(0.5)), ((1 - sig(0.5)) ** 2, (1 - sig(-1.5)) ** 2)
    pref = (nls(1.5 - margin[0]), nls(-2.0 - margin[1]))
    return [w_qual[0] * w_perf[0] * pref[0], w_qual[1] * w_perf[1] * pref[1] + 0.5 * 2.0]


# loss name -> (config overrides, per-example loss on the batch above)
EXPECTED: dict[str, tuple[tuple[str, ...], list[float]]] = {
    "dpo": ((DPO_BETA,), [nls(1.0), nls(-1.25)]),
    # IPO: (M - 1 / (2 beta))^2 = ([2.0, -2.5] - 1)^2
    "ipo": ((DPO_BETA,), [1.0, 12.25]),
    "cdpo": (
        (DPO_BETA, "loss.label_smoothing=0.2"),
        [0.8 * nls(1.0) + 0.2 * nls(-1.0), 0.8 * nls(-1.25) + 0.2 * nls(1.25)],
    ),
    # margin 0.3 subtracted after the beta product
    "margin_dpo": ((DPO_BETA, "loss.margin=0.3"), [nls(0.7), nls(-1.55)]),
    # ODPO offset alpha * log(gap) = 0.5 * log([8, 1])
    "odpo": ((DPO_BETA, "loss.odpo_alpha=0.5"), [nls(1.0 - 0.5 * math.log(8.0)), nls(-1.25)]),
    # SimPO on l: beta * (pc - pr) - gamma = 2 * [0.5, -0.5] - 0.5
    "simpo": (("loss.beta=2", "loss.simpo_gamma=0.5"), [nls(0.5), nls(-1.5)]),
    # RFT on l: -pc where score >= tau_good (6): both pairs
    "rft": (("loss.tau_good=6",), [1.0, 2.0]),
    # RPO: DPO + alpha * (-pc / |y_w|) = DPO + 0.5 * [2 / 2, 6 / 3]
    "rpo": ((DPO_BETA, "loss.rpo_alpha=0.5"), [nls(1.0) + 0.5, nls(-1.25) + 1.0]),
    # PoP on summed M: beta * (M - m) = 0.5 * ([2.0, -2.5] - [0.5, 1.5]) = [0.75, -2.0]
    "pop": ((DPO_BETA, *POP_CLIP), [nls(0.75), nls(-2.0)]),
    "omni_dpo": (OMNI, _omni((0.0, 0.0))),
    # margin = beta * clip(target) = 2 * [0.5, 1.5]
    "omni_pop": ((*OMNI, *POP_CLIP), _omni((1.0, 3.0))),
}


def test_every_registered_loss_has_a_hand_computed_value():
    assert set(LOSSES) == set(EXPECTED)


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_gives_its_hand_computed_per_example_value(name):
    overrides, want = EXPECTED[name]
    obj = _objective(f"loss.name={name}", *overrides)
    out = obj(_batch(obj))
    torch.testing.assert_close(out.per_example, t(*want), rtol=1e-12, atol=1e-12)
    assert out.loss.item() == pytest.approx(sum(want) / 2, rel=1e-12)


def test_margin_dpo_with_the_score_gap_margin_subtracts_the_gap():
    # z - gap = [1.0 - 8, -1.25 - 1]
    obj = _objective("loss.name=margin_dpo", DPO_BETA, "loss.margin_source=score_gap", "loss.margin=0.3")
    torch.testing.assert_close(obj(_batch(obj)).per_example, t(nls(-7.0), nls(-2.25)), rtol=1e-12, atol=1e-12)


def test_pop_clips_the_target_above_m_max_and_records_it():
    obj = _objective("loss.name=pop", DPO_BETA, *POP_CLIP)
    stats = obj(_batch(obj)).stats
    torch.testing.assert_close(stats["margin"], t(0.5, 1.5), rtol=0, atol=0)
    torch.testing.assert_close(stats["clipped"], t(0.0, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(stats["policy_margin"], t(2.0, -2.5), rtol=1e-12, atol=1e-12)


def test_omni_pop_margin_is_beta_times_the_clipped_target_and_carries_no_gradient():
    obj = _objective("loss.name=omni_pop", *OMNI, *POP_CLIP)
    target = t(*TARGETS).requires_grad_(True)
    batch = _batch(obj)
    batch = dataclasses.replace(batch, policy_chosen=batch.policy_chosen.requires_grad_(True), target_margin=target)
    out = obj(batch)
    torch.testing.assert_close(out.stats["margin"], t(1.0, 3.0), rtol=0, atol=0)
    out.loss.backward()
    assert target.grad is None and batch.policy_chosen.grad is not None


def test_conventions_follow_the_papers():
    # name -> (uses_reference, uses_pop, length_normalised) under loss.logprobs=auto
    mapping = {
        "dpo": (True, False, False),
        "ipo": (True, False, False),
        "cdpo": (True, False, False),
        "margin_dpo": (True, False, False),
        "odpo": (True, False, False),
        "rpo": (True, False, False),
        "pop": (True, True, False),
        "simpo": (False, False, True),
        "rft": (False, False, True),
        "omni_dpo": (True, False, True),
        "omni_pop": (True, True, True),
    }
    got = {}
    for name in LOSSES:
        obj = _objective(f"loss.name={name}", "loss.label_smoothing=0.1")
        got[name] = (obj.uses_reference, obj.uses_pop, obj.length_normalised)
    assert got == mapping
    assert set(POP_LOSSES) == {"pop", "omni_pop"}
    omni, dpo = _objective("loss.name=omni_dpo"), _objective("loss.name=dpo")
    torch.testing.assert_close(omni.convention(t(-6.0, 2.0), t(3.0, 4.0)), t(-2.0, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(dpo.convention(t(-6.0, 2.0), t(3.0, 4.0)), t(-6.0, 2.0), rtol=0, atol=0)


def test_logprobs_setting_overrides_the_papers_convention():
    assert _objective("loss.name=dpo", "loss.logprobs=mean").length_normalised
    assert not _objective("loss.name=omni_dpo", "loss.logprobs=sum").length_normalised
    assert _objective("loss.name=dpo", "loss.logprobs=auto").length_normalised is False


def test_implicit_margin_is_the_log_ratio_difference():
    m = _objective("loss.name=pop").implicit_margin(t(-1.0), t(-4.0), t(-3.0), t(-2.0))
    torch.testing.assert_close(m, t(4.0), rtol=0, atol=0)  # (-1 + 3) - (-4 + 2)


@pytest.mark.parametrize("name", ["pop", "omni_pop"])
def test_pop_loss_without_targets_is_a_clear_error(name):
    obj = _objective(f"loss.name={name}")
    with pytest.raises(ValueError, match="target margins"):
        obj(_batch(obj, target=None))


def test_rpo_needs_chosen_lengths_with_summed_log_probs_but_not_with_mean_ones():
    summed = _objective("loss.name=rpo")
    with pytest.raises(ValueError, match="rpo needs chosen_lengths"):
        summed(dataclasses.replace(_batch(summed), chosen_lengths=None))
    mean = _objective("loss.name=rpo", DPO_BETA, "loss.rpo_alpha=0.5", "loss.logprobs=mean")
    out = mean(dataclasses.replace(_batch(mean), chosen_lengths=None))
    # l(y) is already per token: nll = -pc = [1, 2], not divided again; DPO on M = [0.75, -1.0]
    torch.testing.assert_close(out.stats["nll"], t(1.0, 2.0), rtol=0, atol=0)
    torch.testing.assert_close(out.per_example, t(nls(0.375) + 0.5, nls(-0.5) + 1.0), rtol=1e-12, atol=1e-12)


def test_rft_trains_only_on_chosen_responses_at_or_above_tau_good():
    obj = _objective("loss.name=rft", "loss.tau_good=9")  # pair 0 scores exactly 9, pair 1 scores 6
    out = obj(_batch(obj))
    torch.testing.assert_close(out.stats["nll_mask"], t(1.0, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(out.per_example, t(1.0, 0.0), rtol=0, atol=0)


def test_unknown_loss_name_is_refused_listing_the_registered_ones():
    cfg = load_config(None, [])
    loss = dataclasses.replace(cfg.loss, name="hinge")
    with pytest.raises(ValueError, match="unknown loss 'hinge'; registered: .*omni_pop"):
        Objective(loss, cfg.pop)
