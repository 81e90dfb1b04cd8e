"""Loss selection by name, without DeepSpeed or Ray."""

import math

import pytest
import torch

from omni_ray.config import load_config
from omni_ray.learner.objective import LOSSES, BatchLogps, Objective
from omni_ray.losses import dpo_loss, omni_dpo_loss, pop_loss, rft_loss, rpo_loss


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def _batch(target=None, lengths=(2.0, 4.0)):
    return BatchLogps(
        t(-1.0, -2.0),
        t(-3.0, -1.5),
        t(-1.5, -2.0),
        t(-2.5, -2.0),
        t(10.0, 7.0),
        t(2.0, 6.0),
        target if target is None else t(*target),
        chosen_lengths=None if lengths is None else t(*lengths),
    )


def _objective(*overrides):
    cfg = load_config(None, list(overrides))
    return Objective(cfg.loss, cfg.pop)


@pytest.mark.parametrize("name", LOSSES)
def test_every_configured_loss_name_builds_and_returns_a_finite_loss(name):
    cfg = load_config(None, [f"loss.name={name}", "loss.label_smoothing=0.1" if name == "cdpo" else "run.seed=0"])
    obj = Objective(cfg.loss, cfg.pop)
    out = obj(_batch([0.5, 2.0] if obj.uses_pop else None))
    assert math.isfinite(float(out.loss))


def test_conventions_follow_the_papers():
    conv = {
        n: Objective(
            load_config(None, [f"loss.name={n}", "loss.label_smoothing=0.1"]).loss, load_config().pop
        ).length_normalised
        for n in LOSSES
    }
    assert conv["omni_dpo"] and conv["omni_pop"] and conv["simpo"]
    assert not conv["dpo"] and not conv["pop"] and not conv["ipo"]
    forced = load_config(None, ["loss.name=dpo", "loss.logprobs=mean"])
    assert Objective(forced.loss, forced.pop).length_normalised


def test_omni_pop_subtracts_beta_times_clipped_target_margin():
    cfg = load_config(None, ["loss.name=omni_pop", "pop.m_min=0", "pop.m_max=1", "loss.beta=2"])
    b = _batch([0.5, 3.0])  # 3.0 is clipped to m_max=1
    got = Objective(cfg.loss, cfg.pop)(b)
    c = cfg.loss
    want = omni_dpo_loss(
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
        margin=torch.tensor([1.0, 2.0], dtype=torch.float64),
    )
    torch.testing.assert_close(got.per_example, want.per_example)


def test_pop_uses_the_implicit_margin_of_the_strong_pair():
    cfg = load_config(None, ["loss.name=pop"])
    b = _batch([0.5, 0.0])
    m = (b.policy_chosen - b.ref_chosen) - (b.policy_rejected - b.ref_rejected)
    want = pop_loss(m, b.target_margin, beta=cfg.loss.beta, m_min=cfg.pop.m_min, m_max=cfg.pop.m_max)
    torch.testing.assert_close(Objective(cfg.loss, cfg.pop)(b).per_example, want.per_example)


def test_margin_dpo_with_score_gap_margin():
    cfg = load_config(None, ["loss.name=margin_dpo", "loss.margin_source=score_gap"])
    b = _batch()
    want = dpo_loss(
        b.policy_chosen,
        b.policy_rejected,
        b.ref_chosen,
        b.ref_rejected,
        beta=cfg.loss.beta,
        margin=b.score_chosen - b.score_rejected,
    )
    torch.testing.assert_close(Objective(cfg.loss, cfg.pop)(b).per_example, want.per_example)


def test_pop_loss_without_targets_is_a_clear_error():
    cfg = load_config(None, ["loss.name=pop"])
    with pytest.raises(ValueError, match="target margins"):
        Objective(cfg.loss, cfg.pop)(_batch())


def test_rpo_is_dpo_on_summed_log_probs_plus_nll_over_the_chosen_length():
    obj = _objective("loss.name=rpo", "loss.beta=0.1", "loss.rpo_alpha=0.5")
    assert obj.uses_reference and not obj.length_normalised and not obj.uses_pop
    b = _batch()
    got = obj(b)
    want = rpo_loss(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected, t(2.0, 4.0), beta=0.1, alpha=0.5)
    torch.testing.assert_close(got.per_example, want.per_example)
    torch.testing.assert_close(got.stats["nll"], t(0.5, 0.5))


def test_rpo_with_alpha_zero_selects_the_same_loss_as_dpo():
    rpo = _objective("loss.name=rpo", "loss.rpo_alpha=0")
    dpo = _objective("loss.name=dpo")
    torch.testing.assert_close(rpo(_batch()).per_example, dpo(_batch()).per_example, rtol=0, atol=0)


def test_rpo_needs_chosen_lengths_with_summed_log_probs_but_not_with_mean_ones():
    summed = _objective("loss.name=rpo")
    with pytest.raises(ValueError, match="rpo needs chosen_lengths"):
        summed(_batch(lengths=None))
    mean = _objective("loss.name=rpo", "loss.logprobs=mean")
    assert mean.length_normalised
    torch.testing.assert_close(mean(_batch(lengths=None)).stats["nll"], t(1.0, 2.0))  # already l(y): not re-divided


def test_rft_is_reference_free_length_normalised_and_uses_tau_good():
    obj = _objective("loss.name=rft", "loss.tau_good=10.0")
    assert not obj.uses_reference and obj.length_normalised and not obj.uses_pop
    b = _batch()
    got = obj(b)
    torch.testing.assert_close(got.per_example, rft_loss(b.policy_chosen, b.score_chosen, tau_good=10.0).per_example)
    torch.testing.assert_close(got.stats["nll_mask"], t(1.0, 0.0))  # score 7 is not verified


def test_only_simpo_and_rft_skip_the_reference():
    names = {n for n in LOSSES if not _objective(f"loss.name={n}", "loss.label_smoothing=0.1").uses_reference}
    assert names == {"simpo", "rft"}
