"""The memory plan (omni_ray/plan.py): its arithmetic by hand on a small shape, parameter counts against real models,
the shipped GPU configs fitting 80 GiB cards, oversized configs refused, unknown models a clear error, and one
measured learner step against the plan (benchmarks/learner_memory.py has the full calibration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_ray.config import load_config
from omni_ray.plan import (
    KNOWN_MODELS,
    ModelShape,
    PlanError,
    StepShape,
    activation_phases,
    check_fits,
    format_plan,
    learner_resting,
    model_shape,
    plan_memory,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GPU_CONFIGS = ["gemma2_9b_ultrafeedback", "qwen25_math_7b", "llama3_8b_instruct"]

# 2 layers, hidden 64, MLP 128, 2 heads of 32, 1 kv head, vocab 1000, untied.
SMALL = ModelShape(layers=2, hidden=64, intermediate=128, heads=2, kv_heads=1, head_dim=32, vocab=1000,
                   tied_embeddings=False, max_positions=64)  # fmt: skip
# q, o: 64 x 64 each; k, v: 64 x 32 each; gate, up, down: 64 x 128 each; 2 norms of 64.
SMALL_LAYER_PARAMS = 2 * 4096 + 2 * 2048 + 3 * 8192 + 2 * 64
SMALL_PARAMS = 2 * SMALL_LAYER_PARAMS + 1000 * 64 + 1000 * 64 + 64  # layers, embedding, LM head, final norm


def test_parameter_count_of_a_small_shape_is_the_hand_count():
    assert SMALL.layer_params == 36_992
    assert SMALL.params == SMALL_PARAMS == 202_048


def test_activation_terms_of_a_small_shape_are_the_hand_computed_bytes():
    """bf16, 4 sequences x 16 positions, 8 of them response positions."""
    step = StepShape(sequences=4, width=16, response=8)
    # Per token and layer: 2 norms x (fp32 copy 4 + normalised 2 + output 2) x 64; attention 4 x 2 x 64 (q, k, v
    # repeated to 2 heads, output) + the mask, 2 bytes x 16 positions; MLP 4 x 2 x 128.
    per_token_layer = 2 * 8 * 64 + (4 * 2 * 64 + 2 * 16) + 4 * 2 * 128
    assert per_token_layer == 2592
    layer = per_token_layer * 64  # 64 tokens
    final_norm = 8 * 64 * 64
    logits = 4 * 9 * 1000 * 2  # 4 rows x (8 + 1) positions x vocab x bf16
    chunk = 2 * 4 * 9 * 1000  # two float32 chunks of the 9 positions (a chunk covers 256 MiB)
    no_ckpt, no_ckpt_layers = activation_phases(SMALL, step, 2, checkpointing=False)
    assert {t.name: t.bytes for t in no_ckpt.terms} == {
        "activations": 2 * layer + final_norm,
        "logits": logits,
        "logits grad": 2 * logits,
        "log-softmax chunk": chunk,
    }
    assert no_ckpt.total == 652_544
    layer_grads = int(0.35 * layer)  # gradients in flight: the measured share of a layer's saved bytes
    assert {t.name: t.bytes for t in no_ckpt_layers.terms} == {"activations": 2 * layer, "layer grads": layer_grads}
    ckpt, ckpt_layers = activation_phases(SMALL, step, 2, checkpointing=True)
    inputs = 2 * 2 * 64 * 64  # each layer's input: 64 tokens x 64 x bf16
    assert {t.name: t.bytes for t in ckpt.terms}["checkpointed inputs"] == inputs + final_norm
    assert {t.name: t.bytes for t in ckpt_layers.terms} == {
        "checkpointed inputs": inputs,
        "recomputed layer": layer,
        "layer grads": layer_grads,
    }


def test_resting_terms_of_a_zero3_rank_are_sharded_four_ways():
    cfg = load_config(None, ["learner.num_workers=4", "learner.zero_stage=3", "model.dtype=bfloat16", "loss.name=dpo",
                             "learner.batch_size=8"])  # fmt: skip
    terms = dict(learner_resting(cfg, SMALL))
    assert terms["params"] == terms["grads"] == terms["reference"] == SMALL_PARAMS * 2 / 4
    assert terms["optimizer"] == 12 * SMALL_PARAMS / 4  # fp32 master + 2 moments, sharded
    assert terms["ema"] == 0  # dpo has no EMA target
    assert terms["zero-3 grad bucket"] == 500_000_000 * 2
    offloaded = dict(learner_resting(load_config(None, ["learner.ref_offload=true", "loss.name=dpo"]), SMALL))
    assert offloaded["reference"] == 0


def _built_params(config) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def test_parameter_count_equals_the_tiny_models(tmp_path):
    from omni_ray.models.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=512,
                        max_position_embeddings=64, seed=0)  # fmt: skip
    model.save_pretrained(tmp_path / "tiny")
    shape = model_shape(str(tmp_path / "tiny"))  # read back from its config.json, offline
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.layers, shape.hidden, shape.kv_heads, shape.head_dim) == (4, 256, 4, 32)


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
def test_parameter_count_equals_real_models_with_biases_and_tied_embeddings(kind):
    """Qwen2's q/k/v biases; Gemma-2's four norms per layer, tied embeddings and head_dim != hidden / heads."""
    from transformers import Gemma2Config, Qwen2Config

    small = dict(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)  # fmt: skip
    config = Qwen2Config(**small) if kind == "qwen2" else Gemma2Config(**small, head_dim=32)
    assert ModelShape.from_config(config).params == _built_params(config)


def test_known_models_have_their_published_parameter_counts():
    assert KNOWN_MODELS["meta-llama/Meta-Llama-3-8B-Instruct"].params == 8_030_261_248
    assert KNOWN_MODELS["google/gemma-2-9b-it"].params == pytest.approx(9.24e9, rel=2e-3)  # "9.24B" on its card
    assert KNOWN_MODELS["Qwen/Qwen2.5-Math-7B"].params == pytest.approx(7.61e9, rel=2e-3)  # "7.61B" (Qwen2.5-7B)
    # ArmoRM: the Llama-3-8B decoder without its 128256 x 4096 LM head, plus ~6.4M of heads.
    armo = KNOWN_MODELS["RLHFlow/ArmoRM-Llama3-8B-v0.1"].params
    assert 0 < armo - (8_030_261_248 - 128256 * 4096) < 7e6


def test_a_model_neither_local_nor_known_is_a_clear_error(tmp_path):
    with pytest.raises(PlanError, match="nobody/no-such-model.*huggingface-cli download nobody/no-such-model"):
        model_shape("nobody/no-such-model")
    with pytest.raises(PlanError, match="not in the local Hugging Face cache"):
        model_shape(str(tmp_path / "missing-dir"))


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_gpu_configs_fit_80_gib_cards_with_the_papers_batch(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.learner.batch_size == 128
    plan = plan_memory(cfg, gpu_mem_gib=80.0)
    assert plan.gpus
    assert [g.verdict for g in plan.gpus] == ["fits"] * len(plan.gpus), format_plan(plan, all_phases=True)
    check_fits(cfg)


def test_cpu_configs_are_not_planned():
    cfg = load_config(None)  # the defaults: every role on CPU
    assert plan_memory(cfg).gpus == ()
    check_fits(cfg)
    assert "nothing to plan" in format_plan(plan_memory(cfg))


def test_an_oversized_config_is_refused_naming_the_role_and_the_gib():
    cfg = load_config(CONFIGS / "gemma2_9b_ultrafeedback.yaml",
                      ["learner.micro_batch_size=64", "learner.gradient_checkpointing=false"])  # fmt: skip
    with pytest.raises(PlanError, match=r"learner rank 0-3 \(GPU 3-6\) needs [0-9.]+ GiB .* of 80 GiB") as info:
        check_fits(cfg)
    needed = float(str(info.value).split(" needs ")[1].split(" GiB")[0])
    assert needed > 80
    plan = plan_memory(cfg)
    assert not plan.fits and plan.largest_term is not None
    assert plan.largest_term[2].name == "activations"
    # The suggestion is a real fix: applied as overrides, the plan fits.
    assert plan.suggestion and plan.suggestion in str(info.value)
    fixed = load_config(CONFIGS / "gemma2_9b_ultrafeedback.yaml",
                        ["learner.micro_batch_size=64", "learner.gradient_checkpointing=false",
                         *plan.suggestion.split()])  # fmt: skip
    assert plan_memory(fixed).fits


def test_a_kv_cache_without_room_for_one_sequence_is_refused():
    cfg = load_config(CONFIGS / "qwen25_math_7b.yaml", ["rollout.gpu_memory_utilization=0.2"])
    plan = plan_memory(cfg)
    engines = next(g for g in plan.gpus if g.role.startswith("rollout engine"))
    assert not engines.fits and "KV cache" in engines.problems[0]
    assert plan.suggestion is not None and plan.suggestion.startswith("rollout.gpu_memory_utilization=")


def test_format_plan_shows_each_gpu_its_terms_and_the_verdict():
    text = format_plan(plan_memory(load_config(CONFIGS / "llama3_8b_instruct.yaml")), all_phases=True)
    for word in ("rollout engine 0-3 (TP 1) + learner rank 0-3", "start-up", "generate", "train: logits backward",
                 "kv cache", "scoring", "verdict: every GPU fits"):  # fmt: skip
        assert word in text


def test_one_measured_learner_step_is_within_40_percent_of_the_plan(tmp_path):
    """A float32 rank on this CPU (benchmarks/learner_memory.py measures it: torch's allocator events); the
    calibration's own tolerance is 25% (docs/gpu.md), this single cheap point gets a generous margin."""
    from benchmarks.learner_memory import planned, run_point

    point = {"hidden": 128, "intermediate": 384, "layers": 2, "pairs": 2, "prompt": 24, "response": 24,
             "checkpointing": False, "batch_size": 2, "micro": 2}  # fmt: skip
    measured = run_point(point, models=tmp_path)  # its own process: DeepSpeed's groups are per process
    plan = planned(point)
    peak = max(measured["logits_backward"], measured["layer_backward"])
    assert peak > 0
    assert max(plan["logits_backward"], plan["layer_backward"]) == pytest.approx(peak, rel=0.4)
    assert plan["resting"] == pytest.approx(measured["resting"], rel=0.4)


def test_deepspeed_defaults_are_the_ones_the_plan_counts():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from omni_ray import plan

    defaults = DeepSpeedZeroConfig()
    assert defaults.reduce_bucket_size == plan.REDUCE_BUCKET_SIZE
    assert defaults.max_live_parameters == plan.STAGE3_MAX_LIVE_PARAMETERS
    assert defaults.prefetch_bucket_size == plan.STAGE3_PREFETCH_BUCKET_SIZE
    assert defaults.sub_group_size == plan.SUB_GROUP_SIZE
    assert plan.GIB == 1 << 30


def test_lora_counts_the_adapters_alone_in_gradients_and_optimizer_and_no_reference_copy():
    llama = KNOWN_MODELS["meta-llama/Meta-Llama-3-8B-Instruct"]
    # Rank 16 on q, k, v, o (4096 x 4096, 4096 x 1024 twice, 4096 x 4096) and gate, up, down (4096 x 14336), 32 layers.
    assert llama.lora_params(16, []) == 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432) == 41_943_040
    assert llama.lora_params(8, ["q_proj", "v_proj"]) == 32 * 8 * (8192 + 5120)
    with pytest.raises(PlanError, match="not \\['mlp'\\]"):
        llama.lora_params(8, ["mlp"])
    base = ["loss.name=omni_pop", "learner.num_workers=4", "learner.zero_stage=3", "model.dtype=bfloat16"]
    full = dict(learner_resting(load_config(None, base), llama))
    lora = dict(learner_resting(load_config(None, [*base, "learner.lora.rank=16"]), llama))
    adapter = 41_943_040
    assert lora["grads"] == adapter * 2 / 4 and lora["optimizer"] == 12 * adapter / 4
    assert lora["reference"] == 0 < full["reference"]  # the base model with its adapters off is the reference
    assert lora["ema"] == adapter * 2 / 4  # the "ema" adapter
    assert lora["params"] == (llama.params + adapter) * 2 / 4
    assert sum(lora.values()) < sum(full.values()) / 3


def test_train_refuses_a_config_that_cannot_fit_before_any_actor_starts(monkeypatch, tmp_path, capsys):
    from omni_ray import cli
    from omni_ray.driver import loop

    def no_cluster(cfg):
        raise AssertionError("Ray was started for a config that cannot fit")

    monkeypatch.setattr(loop, "init_ray", no_cluster)
    code = cli.main(["train", str(CONFIGS / "gemma2_9b_ultrafeedback.yaml"), "learner.micro_batch_size=64",
                     "learner.gradient_checkpointing=false", f"run.output_dir={tmp_path}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "learner rank 0-3 (GPU 3-6) needs" in err and "of 80 GiB" in err and "try learner." in err
    assert not any(tmp_path.iterdir())  # no run dir either
