"""The learner: DeepSpeed ranks as Ray actors over gloo (integration), and one rank in-process."""

from __future__ import annotations

import math

import pytest

from omni_ray.config import load_config
from omni_ray.learner.worker import LearnerWorker, RoundData, TrainPair


def _round(tokenizer, n: int = 24) -> RoundData:
    from omni_ray.models.tiny import encode_prompt

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]

    pairs = [
        TrainPair(encode_prompt(tokenizer, f"{a}+{a}="), ids(str(2 * a)), ids(str(2 * a + 5)), 10.0, 10.0 - 0.3 * a)
        for a in range(n)
    ]
    return RoundData(pairs=pairs, items=[(i, (i + 3) % n, math.nan) for i in range(n)], round_index=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_single_rank_in_process_trains_and_moves_the_margin(tiny_model_dir, tokenizer):
    cfg = load_config(None, ["learner.num_workers=1", "learner.batch_size=8", "learner.epochs=3", "learner.lr=1e-3",
                             "loss.name=omni_pop", "pop.target=ema"])  # fmt: skip
    w = LearnerWorker(cfg, tiny_model_dir)
    w.init_process_group(*w.node_address())
    before = w.parameter_checksum()
    out = w.train_round(_round(tokenizer))
    assert len(out["steps"]) == 3 * 3
    assert all(math.isfinite(s["loss"]) for s in out["steps"])
    assert 0 < out["steps"][0]["w_perf"] <= 1 and 0.5 < out["steps"][0]["w_qual"] < 1
    # Chosen log-ratios rise against rejected ones: the reward margin grows over the round.
    assert out["steps"][-1]["reward_margin"] > out["steps"][0]["reward_margin"]
    assert w.parameter_checksum() != before
    assert set(out["pair_stats"]) == set(range(24))
    assert all(0 < st["w_perf"] <= 1 for st in out["pair_stats"].values())
    blob = w.export_weights()
    from safetensors.torch import load

    assert "model.embed_tokens.weight" in load(blob)
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_two_deepspeed_ranks_as_ray_actors_agree_on_parameters(ray_local, tiny_model_dir, tokenizer, zero_stage):
    from omni_ray.learner.group import LearnerGroup

    cfg = load_config(None, ["learner.num_workers=2", "learner.batch_size=8", "learner.epochs=1",
                             "learner.num_cpus=0.5", f"learner.zero_stage={zero_stage}", "learner.lr=1e-3",
                             "loss.name=omni_pop", "pop.target=fixed"])  # fmt: skip
    group = LearnerGroup(cfg, tiny_model_dir, {"DS_ACCELERATOR": "cpu"})
    try:
        before = group.parameter_checksums()
        out = group.train_round(_round(tokenizer))
        after = group.parameter_checksums()
        assert len(out["steps"]) == 3
        assert out["steps"][0]["pairs"] == 8  # rank-reduced count: both ranks' shares
        assert before[0] == before[1]
        assert after[0] == pytest.approx(after[1], rel=0, abs=1e-9)
        assert after[0] != before[0]
        assert len(ray_local.get(group.export_weights_ref())) > 0
    finally:
        group.shutdown()


@pytest.mark.integration
def test_saved_learner_state_resumes_to_identical_training(ray_local, tiny_model_dir, tokenizer, tmp_path):
    """Optimizer moments (ZeRO-1 shards of both ranks), LR schedule, EMA target and step counter all come back: round
    2 after a reload into a fresh group trains to the parameters of an uninterrupted round 2 (a missing piece of
    state would change them)."""
    import dataclasses

    from omni_ray.learner.group import LearnerGroup

    cfg = load_config(None, ["learner.num_workers=2", "learner.batch_size=8", "learner.epochs=1",
                             "learner.num_cpus=0.5", "learner.zero_stage=1", "learner.lr=1e-3",
                             "learner.warmup_ratio=0.5", "loss.name=omni_pop", "pop.target=ema"])  # fmt: skip
    second = dataclasses.replace(_round(tokenizer), round_index=1)
    group = LearnerGroup(cfg, tiny_model_dir, {"DS_ACCELERATOR": "cpu"})
    try:
        group.train_round(_round(tokenizer))
        group.save_state(str(tmp_path / "state"))
        out = group.train_round(second)
        uninterrupted = group.parameter_checksums()[0]
    finally:
        group.shutdown()
    resumed = LearnerGroup(cfg, tiny_model_dir, {"DS_ACCELERATOR": "cpu"})
    try:
        fresh = resumed.parameter_checksums()[0]
        assert resumed.load_state(str(tmp_path / "state")) == 3
        assert resumed.parameter_checksums()[0] != fresh
        again = resumed.train_round(second)
        assert again["global_step"] == out["global_step"] == 6
        assert [s["lr"] for s in again["steps"]] == [s["lr"] for s in out["steps"]]
        assert resumed.parameter_checksums()[0] == pytest.approx(uninterrupted, rel=0, abs=1e-9)
    finally:
        resumed.shutdown()
