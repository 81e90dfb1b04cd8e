"""LoRA through peft: config refusals, adapter-only weight updates into the rollout engines, and two pipeline rounds
whose engine generates what the checkpoint's base-plus-adapter generates (the learner side: tests/test_learner.py)."""

from __future__ import annotations

import pytest
import torch

from omni_ray.config import ConfigError, load_config
from tests.conftest import ONE_RANK, require_vllm


def test_bad_lora_config_is_refused_naming_the_key(tiny_model_dir):
    from omni_ray.models.adapters import rollout_settings

    with pytest.raises(ConfigError, match="learner.lora.rank.*>= 0"):
        load_config(None, ["learner.lora.rank=-1"])
    with pytest.raises(ConfigError, match="learner.ref_update=per_round with learner.lora"):
        load_config(None, ["learner.lora.rank=8", "learner.ref_update=per_round"])
    cfg = load_config(None, ["learner.lora.rank=8", "learner.lora.target_modules=[q_proj,qkv]"])
    with pytest.raises(ConfigError, match=r"learner.lora.target_modules: \['qkv'\].*'down_proj'.*'v_proj'"):
        rollout_settings(cfg, tiny_model_dir)


def test_default_targets_are_every_projection_of_the_decoder_layers(tiny_model_dir):
    from omni_ray.models.adapters import rollout_settings

    settings = rollout_settings(load_config(None, ["learner.lora.rank=8"]), tiny_model_dir)
    assert settings["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert rollout_settings(load_config(), tiny_model_dir) is None


def _adapted(model_dir: str, settings: dict, seed: int):
    """The base model with a random (not zero) adapter, in-process with peft: the reference for the engines."""
    import peft
    from transformers import AutoModelForCausalLM

    from omni_ray.models.adapters import peft_config

    torch.manual_seed(seed)
    config = peft_config(settings, settings["target_modules"])
    config.init_lora_weights = False  # B != 0: the adapter changes the outputs
    return peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).eval()


def _greedy(model, prompts: list[list[int]], steps: int = 6) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(steps):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == model.config.eos_token_id:
                    break
            out.append(ids[len(p) :])
    return out


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_an_adapter_only_update_makes_the_engine_generate_what_base_plus_adapter_generates(tiny_model_dir, backend):
    if backend == "vllm":
        require_vllm()
    import peft

    from omni_ray.data import encode_prompt
    from omni_ray.models.adapters import adapter_tensor_names, rollout_settings
    from omni_ray.rollout import RolloutWorker
    from omni_ray.rollout.base import checkpoint_tensor_names
    from omni_ray.weight_sync import serialize_state_dict

    settings = rollout_settings(load_config(None, ["learner.lora.rank=4"]), tiny_model_dir)
    expected = adapter_tensor_names(checkpoint_tensor_names(tiny_model_dir), settings["target_modules"])
    worker = RolloutWorker(tiny_model_dir, backend=backend, lora=settings)
    try:
        prompts = [encode_prompt(worker.tokenizer, t) for t in ("12+34=", "7+8=", "40+59=")]
        before = [c[0].token_ids for c in worker.generate(prompts, n=1, temperature=0.0, max_new_tokens=6, seed=0)]
        for version, seed in ((1, 1), (2, 2)):  # a second adapter replaces the first
            adapted = _adapted(tiny_model_dir, settings, seed)
            adapter = peft.get_peft_model_state_dict(adapted)
            assert set(adapter) == expected  # what the update session checks it received
            worker.load_weights(serialize_state_dict(adapter), version)
            got = [c[0].token_ids for c in worker.generate(prompts, n=1, temperature=0.0, max_new_tokens=6, seed=0)]
            assert got == _greedy(adapted, prompts)
        assert got != before, "the adapters must change the outputs for the test to mean anything"
        worker.begin_weight_update()
        with pytest.raises(ValueError, match="lacks 2 of the adapter's"):
            worker.load_weight_bucket(serialize_state_dict(dict(list(adapter.items())[2:])))
            worker.finish_weight_update(3)
    finally:
        worker.close()


@pytest.mark.integration
def test_two_lora_rounds_leave_the_engine_generating_what_the_checkpoints_adapter(ray_local, tmp_path, tiny_model_dir):
    require_vllm()
    import peft
    from transformers import AutoModelForCausalLM

    from omni_ray.data import encode_prompt
    from omni_ray.driver import Driver
    from omni_ray.models.tiny import build_tokenizer

    cfg = load_config("configs/local_tiny.yaml", [
        f"run.output_dir={tmp_path}", "run.name=lora", "run.rounds=2", f"model.path={tiny_model_dir}",
        "rollout.backend=vllm", "data.prompts_per_round=48", "data.eval_prompts=32", "rollout.samples_per_prompt=4",
        "learner.batch_size=16", "learner.epochs=1", "learner.lr=1e-3", "learner.lora.rank=8",
        "logging.console=false", ONE_RANK,
    ])  # fmt: skip
    driver = Driver(cfg)
    try:
        driver.start_roles()
        rows = [driver.run_round(0), driver.run_round(1)]
        prompts = [encode_prompt(build_tokenizer(), t) for t in ("1+2=", "12+34=", "40+59=", "8+8=")]
        import ray

        served = ray.get(driver.roles.rollout[0].generate.remote(prompts, n=1, temperature=0.0, max_new_tokens=6,
                                                                 seed=0))  # fmt: skip
    finally:
        driver.close()
    assert all(r["pairs_kept"] > 0 and not r.get("skipped") for r in rows)
    ckpt = tmp_path / "lora" / "checkpoints" / "round_0002"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists(), "a LoRA checkpoint holds the adapter, not a copy of the model"
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(ckpt)).eval()
    assert [c[0].token_ids for c in served] == _greedy(adapted, prompts)
