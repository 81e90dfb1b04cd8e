"""`model.trust_remote_code` reaches every loader: a spy on transformers' `from_pretrained` records the value of every
call the driver's set-up, the in-process evaluation and the preference metrics make (the learner's loaders are
checked on real ranks in tests/test_learner.py)."""

from __future__ import annotations

import json

import pytest

from omni_ray.config import load_config


@pytest.fixture
def loader_calls(monkeypatch):
    import transformers

    calls: list[tuple[str, object]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_the_driver_the_evaluation_and_the_preference_metrics_pass_trust_remote_code(loader_calls, tmp_path,
                                                                                       tiny_model_dir):  # fmt: skip
    from omni_ray.driver import Driver
    from omni_ray.evaluate import held_out_eval, preference_eval

    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"model.path={tiny_model_dir}", "data.eval_prompts=4",
                             "model.trust_remote_code=true"])  # fmt: skip
    driver = Driver(cfg)
    driver.close()
    held_out_eval(tiny_model_dir, cfg, prompts=2)
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3", "score_chosen": 10.0,
                                 "score_rejected": 1.0}) + "\n")  # fmt: skip
    preference_eval(str(prefs), tiny_model_dir, reference_path=tiny_model_dir, trust_remote_code=True)
    names = {name for name, _ in loader_calls}
    assert names >= {"AutoTokenizer", "AutoModelForCausalLM"}
    assert all(value is True for _, value in loader_calls), loader_calls
