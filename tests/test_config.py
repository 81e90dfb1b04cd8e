import pytest

from omni_ray.config import ConfigError, load_config


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        return p

    return write


def test_defaults_load_and_validate():
    cfg = load_config()
    assert cfg.loss.name == "omni_pop"
    assert cfg.loss.beta > 0


def test_yaml_then_dotlist_override_order(yaml_file):
    cfg = load_config(yaml_file("loss:\n  beta: 3.5\n  eta: 0.1\n"), ["loss.beta=5"])
    assert cfg.loss.beta == 5.0 and cfg.loss.eta == 0.1


def test_typo_key_on_command_line_is_refused_with_suggestion():
    with pytest.raises(ConfigError, match=r"loss\.betta.*loss\.beta"):
        load_config(None, ["loss.betta=2"])


def test_typo_key_in_yaml_names_file_and_key(yaml_file):
    p = yaml_file("rollout:\n  samples_per_promt: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "rollout.samples_per_promt" in str(e.value)
    assert "rollout.samples_per_prompt" in str(e.value)


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="unknown config key 'lerner'"):
        load_config(None, ["lerner.lr=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"loss\.beta"):
        load_config(None, ["loss.beta=abc"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.beta=0", "loss.beta"),
        ("loss.beta=-1", "loss.beta"),
        ("pop.label_noise=1.5", "pop.label_noise"),
        ("pop.ema_tau=-0.1", "pop.ema_tau"),
        ("rollout.top_p=1.2", "rollout.top_p"),
        ("rollout.num_workers=-1", "rollout.num_workers"),
        ("data.prompts_per_round=0", "data.prompts_per_round"),
        ("learner.zero_stage=4", "learner.zero_stage"),
        ("loss.name=dpoo", "loss.name"),
        ("pop.k=0", "pop.k"),
    ],
)
def test_bad_values_refused_at_load_with_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="m_min"):
        load_config(None, ["pop.m_min=5", "pop.m_max=1"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["learner.batch_size=33", "learner.num_workers=2"])
    with pytest.raises(ConfigError, match="head_dim"):
        load_config(None, ["model.tiny.hidden_size=128", "model.tiny.num_heads=8", "model.tiny.num_kv_heads=4"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["loss.beta"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such.yaml")


def test_scorer_list_items_are_validated(yaml_file):
    p = yaml_file("scoring:\n  scorers:\n    - type: reward_model\n")
    with pytest.raises(ConfigError, match=r"scorers\[0\]\.path"):
        load_config(p)
    p = yaml_file("scoring:\n  scorers:\n    - type: arith_verifier\n      weight: -1\n")
    with pytest.raises(ConfigError, match=r"scoring\.scorers\[0\]\.weight"):
        load_config(p)


def test_config_round_trips_through_yaml():
    from omni_ray.config import from_yaml_text, to_yaml

    cfg = load_config(None, ["loss.beta=3.5", "pop.k=2"])
    assert from_yaml_text(to_yaml(cfg)) == cfg
