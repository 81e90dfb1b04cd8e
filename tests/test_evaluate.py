"""`omni-ray eval`: target resolution, the PoP paper's preference metrics, task accuracy, and the CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from omni_ray.cli import main
from omni_ray.data import encode_prompt
from omni_ray.data.arith import ArithTask, is_correct
from omni_ray.evaluate import implicit_margins, margin_metrics, resolve_target, task_accuracy
from omni_ray.models.logprobs import sequence_logprobs
from omni_ray.pairs import Pair


@pytest.fixture(scope="module")
def random_tiny_dir(tmp_path_factory) -> str:
    """A random-weight tiny Llama + tokenizer (no warm start: builds in about a second, unlike conftest's fixture).

    Every check below compares against an independent computation on the same weights, so the weights' quality
    does not matter.
    """
    from omni_ray.models.tiny import make_tiny

    out = tmp_path_factory.mktemp("eval_models") / "tiny"
    return str(make_tiny(out, seed=0, eval_prompts=50, hidden_size=64, num_heads=2, num_kv_heads=1,
                         intermediate_size=128, num_layers=2, sft_target_accuracy=None, sft_max_steps=0))  # fmt: skip


def _fake_model(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


def _config_yaml(run: Path, model_path: str, *, seed: int = 3, eval_prompts: int = 40) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(
        f"run:\n  seed: {seed}\nmodel:\n  path: {model_path}\n"
        f"data:\n  max_operand: 99\n  eval_prompts: {eval_prompts}\nrollout:\n  max_new_tokens: 4\n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# target resolution (fake model dirs: only config.json matters)


def test_run_dir_resolves_to_its_newest_complete_checkpoint_and_its_settings(tmp_path):
    initial = _fake_model(tmp_path / "models" / "tiny")
    run = tmp_path / "runs" / "exp"
    _config_yaml(run, "models/tiny", seed=3)  # relative to the project root, i.e. the run's grandparent
    for r in (2, 10):
        _fake_model(run / "checkpoints" / f"round_{r:04d}")
    (run / "checkpoints" / "round_0011").mkdir()  # an interrupted save: no config.json
    t = resolve_target(run)
    assert Path(t.policy_path).name == "round_0010" and t.checkpoint_round == 10
    assert t.initial_model_path == str(initial.resolve()) and t.run_dir == str(run.resolve())
    assert (t.seed, t.eval_prompts, t.max_new_tokens) == (3, 40, 4)
    # a checkpoint inside the run gets the run's settings too
    t2 = resolve_target(run / "checkpoints" / "round_0002")
    assert t2.checkpoint_round == 2 and t2.seed == 3 and t2.initial_model_path == t.initial_model_path


def test_run_without_checkpoints_uses_its_config_model_and_a_bare_checkpoint_has_no_run(tmp_path):
    initial = _fake_model(tmp_path / "m")
    run = tmp_path / "runs" / "fresh"
    _config_yaml(run, str(initial))
    t = resolve_target(run)
    assert t.policy_path == str(initial.resolve()) and t.checkpoint_round is None
    bare = resolve_target(initial)
    assert bare.run_dir is None and bare.initial_model_path is None and bare.seed == 0


def test_unresolvable_targets_are_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_target(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint dir"):
        resolve_target(tmp_path / "junk")
    _config_yaml(tmp_path / "run", "no/such/model")
    with pytest.raises(FileNotFoundError, match="without checkpoints.*'no/such/model'"):
        resolve_target(tmp_path / "run")
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# metrics


def test_margin_metrics_match_hand_values():
    margins = [1.0, -1.0, 2.0, 0.5, 0.0]
    gaps = [2.0, 1.0, 3.0, 1.5, 0.5]
    m = margin_metrics(margins, gaps)
    assert m["pairs"] == 5 and m["ties"] == 1
    assert m["pair_accuracy"] == pytest.approx(3 / 5)  # M == 0 is not a correct ordering
    assert m["pearson"] == pytest.approx(np.corrcoef(margins, gaps)[0, 1])
    assert m["spearman"] == pytest.approx(1.0 - 6 * 2 / (5 * 24))  # ranks M 4,1,5,3,2 vs gap 4,2,5,3,1: sum d^2 = 2


def test_margin_metrics_report_undefined_correlations_as_none():
    assert margin_metrics([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])["pearson"] is None
    one = margin_metrics([1.0], [2.0])
    assert one["pair_accuracy"] == 1.0 and one["spearman"] is None
    with pytest.raises(ValueError, match="2 margins but 1 gaps"):
        margin_metrics([1.0, 2.0], [1.0])


def _pairs(tokenizer, rows: list[tuple[str, str, str, float, float]]) -> list[Pair]:
    eos = [tokenizer.eos_token_id]
    return [
        Pair(
            prompt_id=str(i),
            prompt=p,
            prompt_token_ids=encode_prompt(tokenizer, p),
            chosen=c,
            rejected=r,
            chosen_token_ids=tokenizer.encode(c, add_special_tokens=False) + eos,
            rejected_token_ids=tokenizer.encode(r, add_special_tokens=False) + eos,
            score_chosen=sc,
            score_rejected=sr,
        )
        for i, (p, c, r, sc, sr) in enumerate(rows)
    ]


ROWS = [("12+30=", "42", "41", 10.0, 9.0), ("5+5=", "10", "100", 10.0, 0.0), ("33+4=", "37", "3", 10.0, 0.3)]


def test_implicit_margin_without_reference_is_the_policy_logprob_difference(random_tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(random_tiny_dir)
    pairs = _pairs(tok, ROWS)
    model = AutoModelForCausalLM.from_pretrained(random_tiny_dir).eval()
    with torch.inference_mode():
        lc, nc = sequence_logprobs(model, [p.prompt_token_ids for p in pairs], [p.chosen_token_ids for p in pairs], 0)
        lr, nr = sequence_logprobs(model, [p.prompt_token_ids for p in pairs], [p.rejected_token_ids for p in pairs], 0)
    m = implicit_margins(pairs, random_tiny_dir, None, pad_id=tok.pad_token_id, batch_size=2)
    np.testing.assert_allclose(m, (lc - lr).double().numpy(), rtol=1e-5, atol=1e-5)
    mean = implicit_margins(pairs, random_tiny_dir, None, pad_id=tok.pad_token_id, logprobs="mean")
    np.testing.assert_allclose(mean, (lc / nc - lr / nr).double().numpy(), rtol=1e-5, atol=1e-5)
    # the policy as its own reference: M is identically 0
    assert np.all(implicit_margins(pairs, random_tiny_dir, random_tiny_dir, pad_id=tok.pad_token_id) == 0)


def test_task_accuracy_matches_an_independent_greedy_loop(random_tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = task_accuracy(random_tiny_dir, prompts=6, seed=0, eval_size=50, max_new_tokens=4, details=True)
    assert res["prompts"] == 6 and res["backend"] == "hf"
    tok = AutoTokenizer.from_pretrained(random_tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(random_tiny_dir).eval()
    correct, texts = [], []
    for p in ArithTask(seed=0, eval_size=50).eval_prompts()[:6]:
        ids = encode_prompt(tok, p.text)
        with torch.inference_mode():
            for _ in range(4):  # full forward + argmax, no padding, no backend code
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        text = tok.decode(ids[len(encode_prompt(tok, p.text)) :], skip_special_tokens=True)
        correct.append(is_correct(text, int(p.reference)))
        texts.append(text)
    assert [o["response"] for o in res["outputs"]] == texts
    assert [o["correct"] for o in res["outputs"]] == correct
    assert res["accuracy"] == pytest.approx(np.mean(correct))


# ---------------------------------------------------------------------------------------------------------------------
# CLI end to end


def test_cli_eval_of_a_run_writes_task_and_preference_json(random_tiny_dir, tmp_path, capsys):
    run = tmp_path / "runs" / "exp"
    _config_yaml(run, random_tiny_dir, seed=0, eval_prompts=30)
    shutil.copytree(random_tiny_dir, run / "checkpoints" / "round_0001")  # the policy = a copy of the initial model
    prefs = tmp_path / "held_out.jsonl"
    prefs.write_text(
        "".join(json.dumps(dict(zip(("prompt", "chosen", "rejected", "score_chosen", "score_rejected"), r))) + "\n"
                for r in ROWS)
    )  # fmt: skip
    out = tmp_path / "eval.json"
    code = main(["eval", str(run), "--prompts", "4", "--preferences", str(prefs), "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["checkpoint_round"] == 1 and printed["task"]["prompts"] == 4
    assert 0.0 <= printed["task"]["accuracy"] <= 1.0
    p = printed["preferences"]
    # default reference = the run's initial model, whose weights the checkpoint copies: every margin is exactly 0
    assert p["reference"] == str(Path(random_tiny_dir).resolve())
    assert p["pairs"] == 3 and p["ties"] == 3 and p["pair_accuracy"] == 0.0 and p["pearson"] is None
    assert p["load_stats"]["records"] == 3 and p["tokenize_stats"]["pairs"] == 3

    # --reference none: the policy's own log-prob difference, correlated with the gaps by scipy's definitions
    assert main(["eval", str(run), "--no-task", "--preferences", str(prefs), "--reference", "none"]) == 0
    printed = json.loads(capsys.readouterr().out)
    p = printed["preferences"]
    assert "task" not in printed and p["reference"] is None and p["ties"] == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(random_tiny_dir)
    pairs = _pairs(tok, ROWS)
    m = implicit_margins(pairs, str(run / "checkpoints" / "round_0001"), None, pad_id=tok.pad_token_id)
    gaps = [x.gap for x in pairs]
    assert p["pair_accuracy"] == pytest.approx(np.mean(m > 0))
    assert p["pearson"] == pytest.approx(stats.pearsonr(m, gaps).statistic)
    assert p["spearman"] == pytest.approx(stats.spearmanr(m, gaps).statistic)
