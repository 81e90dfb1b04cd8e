"""`omni-ray config`'s listing (omni_ray/config_help.py): keys, values, types, rules, defaults and help of a config."""

from __future__ import annotations

import pytest

from omni_ray.config import ConfigError, load_config
from omni_ray.config_help import config_keys, describe


def _key_lines(text: str) -> list[str]:
    """The `key = value  [...]` lines (help lines are indented)."""
    return [line for line in text.splitlines() if not line.startswith(" ")]


def _block(text: str, key: str) -> list[str]:
    """The line of `key` and its help line, if it has one."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
    return lines[i : i + 2] if i + 1 < len(lines) and lines[i + 1].startswith("    ") else lines[i : i + 1]


def test_loss_prefix_lists_every_loss_key_with_rule_and_help_and_nothing_else():
    text = describe(load_config(), "loss")
    keys = _key_lines(text)
    assert keys and all(line.startswith("loss.") for line in keys)
    assert "loss.beta = 2.0  [float; > 0; default 2.0]" in keys
    assert _block(text, "loss.eta") == ["loss.eta = 0.7  [float; >= 0; default 0.7]",
                                        "    Omni-DPO quality weight sharpness"]  # fmt: skip
    names = {line.split(" = ")[0] for line in keys}
    assert names >= {"loss.name", "loss.beta", "loss.gamma", "loss.lam", "loss.logprobs"}


def test_value_is_the_resolved_one_and_default_the_schemas():
    cfg = load_config(overrides=["loss.beta=0.5", "data.path=x.jsonl", "data.source=prompts"])
    text = describe(cfg, "")
    assert "loss.beta = 0.5  [float; > 0; default 2.0]" in text
    assert _block(text, "data.path")[0] == 'data.path = "x.jsonl"  [str; default ""]'


def test_rules_read_as_bounds_intervals_and_choices():
    text = describe(load_config())
    assert "pop.label_noise = 0.0  [float; in [0, 1]; default 0.0]" in text
    assert "rollout.top_p = 1.0  [float; in (0, 1]; default 1.0]" in text
    assert _block(text, "placement.colocate_rollout_gpu_share")[0].startswith(
        "placement.colocate_rollout_gpu_share = 0.5  [float; in (0, 1); default 0.5]"
    )
    assert _block(text, "run.resume")[0] == 'run.resume = "never"  [str; one of never, auto; default "never"]'


def test_choices_given_by_a_function_are_resolved():
    from omni_ray.learner.objective import LOSSES

    line = _block(describe(load_config(), "loss.name"), "loss.name")[0]
    assert f"one of {', '.join(LOSSES)};" in line
    assert "omni_pop" in LOSSES and "dpo" in LOSSES


def test_a_list_of_sections_shows_each_item():
    cfg = load_config(overrides=[
        'scoring.scorers=[{type: arith_verifier}, {type: python, target: "m:f", scale_high: 1, correct_at: 1}]'
    ])  # fmt: skip
    text = describe(cfg, "scoring.scorers")
    keys = _key_lines(text)
    assert keys[0].startswith("scoring.scorers = [2 items]  [list[ScorerSpec]; default [1 item]]")
    assert 'scoring.scorers[0].type = "arith_verifier"' in text
    assert 'scoring.scorers[1].target = "m:f"' in text
    assert "scoring.scorers[1].scale_high = 1.0  [float; default 10.0]" in text
    assert "scoring.scorers[1].correct_at = 1.0  [float | None; default null]" in text
    assert "scoring.scorers[0].correct_at = null" in text
    item_keys = [k for k in keys if k.startswith("scoring.scorers[1].")]
    assert len(item_keys) == len([k for k in keys if k.startswith("scoring.scorers[0].")]) > 10


def test_every_section_and_key_appears_without_a_prefix():
    cfg = load_config()
    keys = _key_lines(describe(cfg))
    assert len(keys) == len(config_keys(cfg))
    for section in ("run", "model", "data", "rollout", "scoring", "pairs", "pop", "loss", "learner", "sync",
                    "placement", "logging", "ray", "pipeline"):  # fmt: skip
        assert any(k.startswith(section + ".") for k in keys), section
    assert 'logging.wandb.mode = "disabled"  [str; one of online, offline, disabled; default "disabled"]' in keys
    assert "run.save_checkpoints = true  [bool; default true]" in keys


def test_an_unknown_prefix_is_refused_naming_it_and_near_keys():
    with pytest.raises(ConfigError, match=r"no config key starts with 'lss'.*Did you mean: .*loss"):
        describe(load_config(), "lss")
    with pytest.raises(ConfigError, match=r"no config key starts with 'zzzz'\. Sections: run, model"):
        describe(load_config(), "zzzz")
