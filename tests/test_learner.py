"""The learner: one rank in-process against independent computations; real DeepSpeed ranks over gloo (forked
processes, tests/learner_ranks.py) for micro-batching, ZeRO-3, checkpointing, the PoP targets and resume from a
saved learner state."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from omni_ray.config import load_config
from omni_ray.learner.objective import LOSSES
from omni_ray.learner.worker import LearnerWorker
from tests.learner_ranks import round_data

LR = 1e-3
# At the first step policy == reference, so the calibrated NLL's mask 1[l_ref(y_w) > l(y_w)] is decided by float
# rounding (it differs with the batch layout); tau_good above every score keeps it empty where a test compares
# layouts. rft trains on verified chosen responses only, so it keeps a threshold the chosen scores (10) pass.
COMMON = ["learner.batch_size=8", "learner.epochs=1", f"learner.lr={LR}", "loss.tau_good=11"]
LOSS_ARGS = {"cdpo": ["loss.label_smoothing=0.1"], "rft": ["loss.tau_good=9.5"]}


def _loss(name: str) -> list[str]:
    return [f"loss.name={name}", *LOSS_ARGS.get(name, [])]


CASES = [
    *(
        {
            "name": f"{name}-{layout}",
            "world": world,
            "overrides": [*COMMON, *_loss(name), f"learner.micro_batch_size={mbs}"],
        }  # fmt: skip
        for name in LOSSES
        for layout, world, mbs in (("1x8", 1, 8), ("2x4", 2, 4), ("8x1", 2, 1))
    ),
    *(
        {"name": f"omni_pop-{variant}", "world": 2, "overrides": [*COMMON, *_loss("omni_pop"), *extra]}
        for variant, extra in (
            ("zero3", ["learner.zero_stage=3", "learner.micro_batch_size=2"]),
            ("checkpointing", ["learner.gradient_checkpointing=true", "learner.micro_batch_size=2"]),
            ("tokens", ["learner.max_tokens_per_micro_batch=40"]),
        )
    ),
    # Two steps per round: the EMA target moves after the first one.
    *(
        {"name": name, "world": 2, "overrides": [*COMMON, "learner.batch_size=4", *extra]}
        for name, extra in (
            ("omni_pop-ema0.99", ["loss.name=omni_pop"]),
            ("omni_pop-ema0.5", ["loss.name=omni_pop", "pop.ema_tau=0.5"]),
            ("omni_pop-ema0.5-zero3", ["loss.name=omni_pop", "pop.ema_tau=0.5", "learner.zero_stage=3"]),
            ("omni_pop-ema1", ["loss.name=omni_pop", "pop.ema_tau=1"]),
            ("omni_pop-ema0", ["loss.name=omni_pop", "pop.ema_tau=0"]),
            ("omni_pop-fixed", ["loss.name=omni_pop", "pop.target=fixed"]),
            ("pop-ema1", ["loss.name=pop", "pop.ema_tau=1"]),
            ("dpo-2steps", ["loss.name=dpo"]),
        )
    ),
    *(
        {
            "name": f"lora-{variant}",
            "world": 2,
            "overrides": [*COMMON, "loss.name=omni_pop", "learner.lora.rank=4", "learner.lora.alpha=8", *extra],
        }
        for variant, extra in (
            ("2x4", ["learner.micro_batch_size=4"]),
            ("8x1", ["learner.micro_batch_size=1"]),
            ("zero3", ["learner.zero_stage=3", "learner.micro_batch_size=2"]),
            ("ema0.5", ["learner.batch_size=4", "pop.ema_tau=0.5"]),
            ("ema0.5-zero3", ["learner.batch_size=4", "pop.ema_tau=0.5", "learner.zero_stage=3"]),
            ("ema1", ["learner.batch_size=4", "pop.ema_tau=1"]),
        )
    ),  # fmt: skip
    # A round with fewer pairs than ranks (a binary verifier on a weak model): rank 1's share is empty.
    *(
        {
            "name": f"omni_pop-1pair-{layout}",
            "world": world,
            "pairs": 1,
            "overrides": [*COMMON, *_loss("omni_pop"), *extra],
        }
        for layout, world, extra in (("1rank", 1, []), ("2ranks-zero3", 2, ["learner.zero_stage=3"]))
    ),  # fmt: skip
    {
        "name": "trust",
        "world": 2,
        "save": True,
        "overrides": [*COMMON, "loss.name=omni_pop", "model.trust_remote_code=true"],
    },  # fmt: skip
    *(
        {
            "name": f"dpo-ref-{update}",
            "world": 2,
            "rounds": 2,
            "overrides": [*COMMON, "loss.name=dpo", f"learner.ref_update={update}"],
        }
        for update in ("fixed", "per_round")
    ),  # fmt: skip
    *(
        {
            "name": f"resume-lora{rank}",
            "world": 2,
            "rounds": 2,
            "resume": True,
            "overrides": [
                "learner.batch_size=4",
                "learner.epochs=1",
                "learner.zero_stage=1",
                "learner.lr=1e-3",
                "learner.warmup_ratio=0.5",
                "loss.name=omni_pop",
                "pop.target=ema",
                f"learner.lora.rank={rank}",
            ],
        }
        for rank in (0, 4)
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_model_dir) -> dict[str, dict]:
    """Every case of CASES, run once on real ranks; name -> rank 0's result."""
    out = tmp_path_factory.mktemp("learner_ranks")
    cases = out / "cases.json"
    cases.write_text(json.dumps(CASES))
    proc = subprocess.run([sys.executable, "tests/learner_ranks.py", str(cases), tiny_model_dir, str(out)],
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {c["name"]: torch.load(out / c["name"], weights_only=False) for c in CASES}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def initial(tiny_model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()


# Weights after one AdamW step agree to a small fraction of the learning rate (~2% of lr here, float rounding of the
# different batch layouts), but for a stray few whose gradient is of the order of Adam's eps (1e-8): their step
# lr * g / (|g| + eps) moves with g's rounding (seen on one CPU: 2 of the 2.4M weights up to 0.3 lr apart; which ones
# and how many depends on the CPU). A wrong per-pair weighting or a lost micro-batch moves many weights by up to 2 lr
# (Adam's first step is lr * sign(g)): one pair of 8 left out puts 7% of them (171,307) more than 0.2 lr apart, and
# the EMA's move in a second step 22% (4e-4 of a LoRA adapter's). The step's loss and gradient norm agree to float
# rounding.
WEIGHTS_ATOL = 0.2 * LR
STRAY_SHARE = 1e-5  # 23 of the model's 2.4M weights, none of a rank-4 LoRA adapter's 65,536


def _share_apart(a: dict, b: dict) -> float:
    """The share of the weights of a and b that are more than WEIGHTS_ATOL apart."""
    assert a.keys() == b.keys()
    return sum(int(((a[k] - b[k]).abs() > WEIGHTS_ATOL).sum()) for k in a) / sum(a[k].numel() for k in a)


@pytest.mark.integration
@pytest.mark.parametrize("name", LOSSES)
def test_a_step_is_the_same_for_one_global_batch_whatever_the_micro_batches_and_ranks(ranks, initial, name):
    one, two, eight = (ranks[f"{name}-{layout}"] for layout in ("1x8", "2x4", "8x1"))
    assert _max_diff(one["state"], initial) > 0.5 * LR, "the step must move the weights for the test to mean anything"
    for other in (two, eight):
        assert _share_apart(other["state"], one["state"]) <= STRAY_SHARE
        (a,), (b,) = one["rounds"][0]["steps"], other["rounds"][0]["steps"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert a["pairs"] == b["pairs"] == 8
        assert other["rounds"][0]["pair_stats"].keys() == one["rounds"][0]["pair_stats"].keys() == set(range(8))


@pytest.mark.integration
def test_a_round_with_fewer_pairs_than_ranks_trains_like_one_rank(ranks, initial):
    one, two = ranks["omni_pop-1pair-1rank"], ranks["omni_pop-1pair-2ranks-zero3"]
    assert _max_diff(one["state"], initial) > 0.5 * LR
    assert _share_apart(two["state"], one["state"]) <= STRAY_SHARE
    (a,), (b,) = one["rounds"][0]["steps"], two["rounds"][0]["steps"]
    assert a["pairs"] == b["pairs"] == 1
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    assert two["rounds"][0]["pair_stats"].keys() == {0}


@pytest.mark.integration
def test_a_zero3_ema_target_moves_like_a_replicated_one(ranks):
    """Two steps at tau 0.5: the second step's PoP margins come from the EMA updated on each rank's partitions (an
    EMA left at the initial model would take the tau = 1 step)."""
    moved, frozen = ranks["omni_pop-ema0.5"]["state"], ranks["omni_pop-ema1"]["state"]
    assert _share_apart(moved, frozen) > STRAY_SHARE, "the EMA's move must change the second step"
    assert _share_apart(ranks["omni_pop-ema0.5-zero3"]["state"], moved) <= STRAY_SHARE


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["zero3", "checkpointing", "tokens"])
def test_zero3_models_checkpointing_and_token_budgets_take_the_same_step(ranks, variant):
    """ZeRO-3 partitions the policy, the reference and the EMA target; checkpointing recomputes activations; a token
    budget cuts shares by length: none of it changes the step, or the reference log-probs."""
    base, other = ranks["omni_pop-2x4"], ranks[f"omni_pop-{variant}"]
    assert _share_apart(other["state"], base["state"]) <= STRAY_SHARE
    torch.testing.assert_close(other["reference"], base["reference"], rtol=0, atol=1e-5)
    assert other["rounds"][0]["steps"][0]["grad_norm"] == pytest.approx(base["rounds"][0]["steps"][0]["grad_norm"],
                                                                         rel=1e-4)  # fmt: skip


@pytest.mark.integration
def test_reference_log_probs_are_the_models_own_sequence_log_probs(ranks, tiny_model_dir):
    """Gathered over 2 ranks (ZeRO-1 copies and ZeRO-3 partitions alike), against a naive per-sequence computation
    of the full log-softmax without padding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pairs = round_data(tiny_model_dir).pairs
    with torch.no_grad():
        want = torch.tensor([[_naive_logp(model, p.prompt_token_ids, r) for r in (p.chosen_token_ids,
                              p.rejected_token_ids)] for p in pairs])  # fmt: skip
    for case in ("omni_pop-2x4", "omni_pop-zero3"):
        torch.testing.assert_close(ranks[case]["reference"], want, rtol=0, atol=1e-4)


def _naive_logp(model, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([list(prompt) + list(response)])
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return float(sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)))


@pytest.mark.integration
def test_ema_target_with_tau_zero_is_the_policy_and_with_tau_one_stays_the_reference(ranks):
    """theta_ema <- tau theta_ema + (1 - tau) theta: at tau = 0 the EMA follows the policy, so its margins are the
    `fixed` target's; at tau = 1 it stays the initial model (= the reference), so every target margin is 0 and the PoP
    loss is plain DPO."""
    assert _share_apart(ranks["omni_pop-ema0"]["state"], ranks["omni_pop-fixed"]["state"]) <= STRAY_SHARE
    ema0, ema99 = ranks["omni_pop-ema0"]["state"], ranks["omni_pop-ema0.99"]["state"]
    assert _share_apart(ema0, ema99) > STRAY_SHARE, "ema 0.99 must differ"
    assert _share_apart(ranks["pop-ema1"]["state"], ranks["dpo-2steps"]["state"]) <= STRAY_SHARE


@pytest.mark.integration
def test_per_round_reference_restarts_each_round_from_the_policy(ranks):
    """ref_update=per_round: round 2 starts with reference = policy, so its first step's implicit reward is 0; with
    the fixed reference it is not."""
    first = {u: ranks[f"dpo-ref-{u}"]["rounds"][1]["steps"][0] for u in ("fixed", "per_round")}
    assert abs(first["per_round"]["chosen_reward"]) < 1e-5 and abs(first["per_round"]["reward_margin"]) < 1e-5
    assert abs(first["fixed"]["reward_margin"]) > 1e-3


def test_single_rank_first_step_matches_an_independent_computation(tiny_model_dir):
    """In-process, one rank, one step over all 8 pairs: w_qual = sigma(eta * gap) per pair; policy = reference =
    EMA at the first step, so the reward margins and the PoP margins are 0; the loss equals omni_dpo_loss on
    log-probs computed here by a naive full log-softmax."""
    from transformers import AutoModelForCausalLM

    from omni_ray.losses import omni_dpo_loss

    cfg = load_config(None, ["learner.num_workers=1", *COMMON, "loss.name=omni_pop", "pop.target=ema"])
    data = round_data(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logp = torch.tensor([[_naive_logp(model, p.prompt_token_ids, r) for r in (p.chosen_token_ids,
                              p.rejected_token_ids)] for p in data.pairs], dtype=torch.float32)  # fmt: skip
    lengths = torch.tensor([[len(p.chosen_token_ids), len(p.rejected_token_ids)] for p in data.pairs])
    mean = logp / lengths
    c = cfg.loss
    want = omni_dpo_loss(mean[:, 0], mean[:, 1], mean[:, 0], mean[:, 1],
                         torch.tensor([p.score_chosen for p in data.pairs]),
                         torch.tensor([p.score_rejected for p in data.pairs]), beta=c.beta, eta=c.eta, gamma=c.gamma,
                         tau_ref=c.tau_ref, lam=c.lam, tau_good=c.tau_good)  # fmt: skip
    worker = LearnerWorker(cfg, tiny_model_dir)
    worker.init_process_group(*worker.rendezvous())
    try:
        out = worker.train_round(data)
    finally:
        torch.distributed.destroy_process_group()
    (step,) = out["steps"]
    assert step["loss"] == pytest.approx(float(want.loss), rel=1e-5)
    assert abs(step["reward_margin"]) < 1e-5 and abs(step["margin"]) < 1e-6
    for i, pair in enumerate(data.pairs):
        gap = pair.score_chosen - pair.score_rejected
        assert out["pair_stats"][i]["w_qual"] == pytest.approx(1 / (1 + math.exp(-c.eta * gap)), rel=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_saved_learner_state_resumes_to_identical_training(ranks, lora_rank):
    """Optimizer moments (ZeRO-1 shards of both ranks), LR schedule, EMA target (with LoRA: the EMA adapter) and step
    counter all come back: round 2 after a reload into a fresh learner trains to the weights of an uninterrupted
    round 2 (a missing piece of state would change them)."""
    result = ranks[f"resume-lora{lora_rank}"]
    resumed, out = result["resumed"], result["rounds"][-1]
    assert resumed["loaded_step"] == 2
    assert _max_diff(resumed["loaded"], resumed["fresh"]) > 0, "the load must replace the initial weights"
    again = resumed["round"]
    assert again["global_step"] == out["global_step"] == 4
    assert [s["lr"] for s in again["steps"]] == [s["lr"] for s in out["steps"]]
    assert result["checksums"][0] == result["checksums"][1]
    for name, tensor in result["state"].items():
        torch.testing.assert_close(resumed["state"][name], tensor, rtol=0, atol=1e-9, msg=name)
    assert resumed["exported_bytes"] > 0


@pytest.mark.integration
def test_lora_steps_agree_across_micro_batches_ranks_and_zero3_and_its_ema_adapter_moves(ranks):
    base = ranks["lora-2x4"]
    for other in ("lora-8x1", "lora-zero3"):
        assert _share_apart(ranks[other]["state"], base["state"]) <= STRAY_SHARE, other
        assert _share_apart(ranks[other]["adapter"], base["adapter"]) <= STRAY_SHARE, other
    moved, frozen = ranks["lora-ema0.5"]["adapter"], ranks["lora-ema1"]["adapter"]
    assert _share_apart(moved, frozen) > STRAY_SHARE, "the EMA adapter's move must change the second step"
    assert _share_apart(ranks["lora-ema0.5-zero3"]["adapter"], moved) <= STRAY_SHARE


@pytest.mark.integration
def test_lora_reference_is_the_base_model_and_training_leaves_the_base_weights_alone(ranks, initial, tiny_model_dir):
    """With LoRA the reference log-probs are the base model's (adapters off: no copy of the model), and after a round
    the merged weights are exactly the initial ones plus scaling * B A of the trained adapter."""
    from transformers import AutoModelForCausalLM

    result = ranks["lora-2x4"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pairs = round_data(tiny_model_dir).pairs
    with torch.no_grad():
        want = torch.tensor([[_naive_logp(model, p.prompt_token_ids, r) for r in (p.chosen_token_ids,
                              p.rejected_token_ids)] for p in pairs])  # fmt: skip
    torch.testing.assert_close(result["reference"], want, rtol=0, atol=1e-4)
    adapter, merged, scaling = result["adapter"], result["state"], 8 / 4
    assert adapter and max(float(t.abs().max()) for k, t in adapter.items() if ".lora_B." in k) > 0, "B trained"
    targets = 0
    for name, weight in initial.items():
        a = adapter.get(f"base_model.model.{name[: -len('.weight')]}.lora_A.weight")
        delta = 0 if a is None else scaling * adapter[f"base_model.model.{name[: -len('.weight')]}.lora_B.weight"] @ a
        targets += a is not None
        torch.testing.assert_close(merged[name], weight + delta, rtol=0, atol=1e-6)
    assert targets == 4 * 7, "every projection of the 4 layers (q, k, v, o, gate, up, down) carries an adapter"


@pytest.mark.integration
def test_trust_remote_code_reaches_every_loader_of_the_learner(ranks):
    """The policy, reference and EMA loads and save_pretrained's tokenizer load all pass the config's value."""
    loaders = ranks["trust"]["loaders"]
    assert {name for name, _ in loaders} >= {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(value is True for _, value in loaders), loaders
