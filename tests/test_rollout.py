"""The rollout interface in-process: the shared generation logic (omni_ray/rollout/base.py), the HF and vLLM
backends behind `RolloutWorker`, the weight-update session, and `choose_backend`.

The two tiny models (A, B) are random-weight tiny Llamas with different seeds: they build in well under a second,
and their greedy outputs differ, which is all a weight-update test needs. Ground truth for "the worker runs B" is
an independent greedy loop over B's HF model (full forward, argmax, no padding, no backend code).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from omni_ray.data import encode_prompt
from omni_ray.models.tiny import build_tokenizer, make_tiny
from omni_ray.rollout import Completion, GenerationBackend, RolloutWorker, StaleWeightsError, make_backend
from omni_ray.rollout import worker as rollout_worker
from omni_ray.rollout.base import checkpoint_tensor_names, derive_seed, eos_token_ids_of, trim_completion
from omni_ray.rollout.worker import choose_backend
from omni_ray.weight_sync import serialize_state_dict
from tests.conftest import require_vllm

PROMPTS = ["1+2=", "12+34=", "99*99=", "7-3=", "5 + 60 ="]  # different lengths: exercises left padding
MAX_NEW = 8
REQUIRE_VLLM_ENV = "OMNI_RAY_REQUIRE_VLLM"  # the Makefile sets it to 1 for `make test`


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """One torch thread in this process while the block runs: the tiny model's forward takes ~10 ms on one thread
    and up to 40x longer when two threads contend with other processes for the machine's two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def reference_greedy(model_dir: str | Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy ids by a plain argmax loop over the HF model: independent of both backends and of any weight sync."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    out = []
    with torch.inference_mode(), one_intra_op_thread():
        for p in prompts:
            ids = list(p)
            for _ in range(max_new):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == eos:
                    break
            out.append(ids[len(p) :])
    return out


def state_dict_of(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The HF state dict of a model dir (what a learner would send)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _in_process_engines_on_one_thread():
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rollout_models")
    return {
        "a": make_tiny(root / "a", seed=0, sft_target_accuracy=None, sft_max_steps=0),
        "b": make_tiny(root / "b", seed=1, sft_target_accuracy=None, sft_max_steps=0),
    }


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [encode_prompt(tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy_ref(models, prompts) -> dict[str, list[list[int]]]:
    ref = {name: reference_greedy(path, prompts, MAX_NEW) for name, path in models.items()}
    assert ref["a"] != ref["b"], "models A and B must disagree for the weight-update tests to mean anything"
    return ref


@pytest.fixture(scope="module")
def hf_worker(models):
    worker = RolloutWorker(str(models["a"]), backend="hf")
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def vllm_worker(models):
    require_vllm()
    worker = RolloutWorker(str(models["a"]), backend="vllm")
    yield worker
    worker.close()


def greedy_ids(worker: RolloutWorker, prompts: list[list[int]]) -> list[list[int]]:
    out = worker.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=0)
    return [row[0].token_ids for row in out]


# --------------------------------------------------------------------------------------------- shared logic


class _ScriptedBackend(GenerationBackend):
    """Returns fixed raw streams and records loaded buckets: tests the shared code (trimming, greedy fan-out,
    validation, the update session) without a model."""

    name = "scripted"

    def __init__(self, model_dir: Path, streams: list[list[int]], checkpoint: frozenset[str] | None = None) -> None:
        super().__init__(str(model_dir), max_model_len=16, trust_remote_code=False)
        if checkpoint is not None:
            self.checkpoint_tensor_names = self.update_tensor_names = checkpoint
        self.streams = streams
        self.calls: list[dict] = []
        self.loaded: list[set[str]] = []
        self.finished_updates = 0

    def _generate_ids(self, prompts, **kw):
        self.calls.append(kw)
        return [[list(s) for s in self.streams[: kw["n"]]] for _ in prompts]

    def _load_bucket(self, tensors: Mapping[str, Any]) -> None:
        self.loaded.append(set(tensors))

    def _finish_update(self) -> None:
        self.finished_updates += 1


def test_trim_completion_keeps_eos_and_drops_padding():
    eos, pad = 2, 0
    assert trim_completion([5, 6, eos, pad, pad], frozenset({eos})) == ([5, 6, eos], True)
    assert trim_completion([5, 6, 7], frozenset({eos})) == ([5, 6, 7], False)
    assert trim_completion([eos, eos], frozenset({eos})) == ([eos], True)  # pad == eos models
    assert trim_completion([5, 9, 6], frozenset({2, 9})) == ([5, 9], True)  # any of several EOS ids


def test_generate_trims_fans_greedy_out_and_validates_arguments(models, tokenizer):
    eos = tokenizer.eos_token_id
    digits = tokenizer.encode("42", add_special_tokens=False)
    backend = _ScriptedBackend(models["a"], [digits + [eos, 0, 0], digits + [5, 5]])
    prompt = encode_prompt(tokenizer, "1+1=")
    sampled = backend.generate([prompt, prompt], n=2, temperature=1.0, top_p=1.0, max_new_tokens=5, seed=0)
    assert [len(row) for row in sampled] == [2, 2]
    assert sampled[0][0] == Completion(text="42", token_ids=digits + [eos], finished=True)
    assert sampled[0][1].finished is False and sampled[0][1].token_ids == digits + [5, 5]
    greedy = backend.generate([prompt], n=3, temperature=0.0, top_p=0.5, max_new_tokens=5, seed=0)
    assert backend.calls[-1]["n"] == 1 and backend.calls[-1]["top_p"] == 1.0  # one greedy sequence, fanned out
    assert greedy == [[greedy[0][0]] * 3]
    with pytest.raises(ValueError, match="max_model_len"):
        backend.generate([prompt], n=1, temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        backend.generate([prompt], n=1, temperature=-1.0, top_p=1.0, max_new_tokens=2, seed=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        backend.generate([prompt, []], n=1, temperature=0.0, top_p=1.0, max_new_tokens=2, seed=0)
    assert backend.generate([], n=2, temperature=1.0, top_p=1.0, max_new_tokens=2, seed=0) == []


def test_derived_seeds_are_distinct_and_fit_56_bits():
    seeds = {derive_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**56 for s in seeds)
    assert derive_seed(3, 4) == derive_seed(3, 4)


def test_unknown_backend_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match=r"unknown rollout backend 'tgi'.*'hf'.*'vllm'"):
        make_backend("/nonexistent", backend="tgi")


def test_update_session_finishes_only_once_every_checkpoint_tensor_arrived(models):
    backend = _ScriptedBackend(models["a"], [], checkpoint=frozenset({"w1", "w2", "w3"}))
    with pytest.raises(RuntimeError, match="begin_weight_update"):
        backend.load_weight_bucket({"w1": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="begin_weight_update"):
        backend.finish_weight_update()
    backend.begin_weight_update()
    assert backend.load_weight_bucket({"w1": torch.zeros(1), "w2": torch.zeros(1)}) == 2
    with pytest.raises(ValueError, match=r"lacks 1 of the checkpoint's 3 tensors.*'w3'"):
        backend.finish_weight_update()
    assert backend.finished_updates == 0
    backend.begin_weight_update()  # a new session starts from nothing received
    backend.load_weight_bucket({"w1": torch.zeros(1), "w2": torch.zeros(1)})
    backend.note_received(["w3"])  # e.g. a broadcast the engine received itself
    backend.finish_weight_update()
    assert backend.finished_updates == 1
    assert backend.loaded == [{"w1", "w2"}, {"w1", "w2"}]


def test_checkpoint_tensor_names_are_the_state_dict_names_and_empty_without_safetensors(models, tmp_path):
    assert checkpoint_tensor_names(models["a"]) == set(state_dict_of(models["a"]))
    assert checkpoint_tensor_names(tmp_path) == frozenset()


# --------------------------------------------------------------------------------------------- choose_backend


def test_auto_backend_says_it_chose_vllm_because_it_imports(monkeypatch, capsys):
    monkeypatch.setattr(rollout_worker, "vllm_import_error", lambda: None)
    assert choose_backend("auto") == "vllm"
    assert "rollout.backend=auto: using vllm: vllm imports" in capsys.readouterr().out


def test_auto_backend_falls_back_to_hf_and_prints_why(monkeypatch, capsys):
    monkeypatch.setattr(rollout_worker, "vllm_import_error", lambda: "ImportError: no module named vllm._C")
    assert choose_backend("auto") == "hf"
    out = capsys.readouterr().out
    assert "using hf: vllm cannot be imported (ImportError: no module named vllm._C)" in out


def test_explicit_backend_is_taken_silently(capsys):
    assert choose_backend("hf") == "hf"
    assert choose_backend("vllm") == "vllm"
    assert capsys.readouterr().out == ""


def test_require_vllm_fails_under_make_test_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(rollout_worker, "vllm_import_error", lambda: "OSError: libtorch_cpu.so")
    monkeypatch.setenv(REQUIRE_VLLM_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="OSError: libtorch_cpu.so"):
        require_vllm()
    monkeypatch.setenv(REQUIRE_VLLM_ENV, "0")
    with pytest.raises(pytest.skip.Exception, match="OSError: libtorch_cpu.so"):
        require_vllm()


# --------------------------------------------------------------------------------------------- backends


def _check_backend(worker: RolloutWorker, prompts: list[list[int]], greedy_a: list[list[int]]) -> None:
    eos = eos_token_ids_of(worker.model_path, worker.tokenizer)
    out = worker.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW, seed=7)
    assert len(out) == len(prompts) and all(len(row) == 3 for row in out)
    for row in out:
        for c in row:
            assert isinstance(c, Completion) and isinstance(c.text, str)
            assert all(isinstance(t, int) for t in c.token_ids) and 1 <= len(c.token_ids) <= MAX_NEW
            assert c.finished == (c.token_ids[-1] in eos)
            assert all(t not in eos for t in c.token_ids[:-1]), "a completion ends at its first EOS"
            assert worker.tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text
    again = worker.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW, seed=7)
    assert again == out, "same seed + same weights must repeat the samples"
    other = worker.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW, seed=8)
    assert other != out

    greedy = worker.generate(prompts, n=2, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=0)
    assert [[c.token_ids for c in row] for row in greedy] == [[ids, ids] for ids in greedy_a]
    single = worker.generate(prompts[1:2], n=1, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=3)
    assert single[0][0] == greedy[1][0], "greedy must not depend on batch composition / padding"


def test_hf_backend_samples_reproducibly_and_decodes_greedy_like_the_reference(hf_worker, prompts, greedy_ref):
    assert hf_worker.backend_name == "hf"
    _check_backend(hf_worker, prompts, greedy_ref["a"])


def test_hf_update_lacking_a_tensor_refuses_to_finish_and_keeps_the_worker_unusable(
    hf_worker, models, prompts, greedy_ref
):
    state = state_dict_of(models["b"])
    hf_worker.begin_weight_update()
    hf_worker.load_weight_bucket(serialize_state_dict({k: v for k, v in state.items() if k != "model.norm.weight"}))
    with pytest.raises(ValueError, match=r"lacks 1 .*'model\.norm\.weight'"):
        hf_worker.finish_weight_update(3)
    assert hf_worker.policy_version != 3 and hf_worker.ready()["policy_version"] != 3
    with pytest.raises(StaleWeightsError):  # the driver's calls carry the version they expect
        hf_worker.generate(prompts, n=1, temperature=0.0, max_new_tokens=MAX_NEW, seed=0, expect_version=0)
    # a complete update afterwards is accepted, in two buckets
    names = sorted(state)
    hf_worker.begin_weight_update()
    hf_worker.load_weight_bucket(serialize_state_dict({k: state[k] for k in names[:5]}))
    hf_worker.load_weight_bucket(serialize_state_dict({k: state[k] for k in names[5:]}))
    assert hf_worker.finish_weight_update(4) == 4 == hf_worker.policy_version
    assert greedy_ids(hf_worker, prompts) == greedy_ref["b"]
    assert hf_worker.load_weights(str(Path(models["a"], "model.safetensors")), 5) == 5  # back to A, from a file
    assert greedy_ids(hf_worker, prompts) == greedy_ref["a"]


def test_hf_bucket_with_a_name_the_model_lacks_is_refused(hf_worker, models):
    hf_worker.begin_weight_update()
    with pytest.raises(ValueError, match=r"weights the model does not have: \['score\.weight'\]"):
        hf_worker.load_weight_bucket(serialize_state_dict({"score.weight": torch.zeros(2, 2)}))
    hf_worker.load_weights(str(Path(models["a"], "model.safetensors")), 6)
    assert hf_worker.policy_version == 6


@pytest.mark.integration
def test_vllm_backend_samples_reproducibly_and_decodes_greedy_like_the_reference(vllm_worker, prompts, greedy_ref):
    assert vllm_worker.backend_name == "vllm"
    _check_backend(vllm_worker, prompts, greedy_ref["a"])


@pytest.mark.integration
def test_vllm_in_process_weight_reload_switches_the_policy_both_ways(vllm_worker, models, prompts, greedy_ref):
    for name, version in (("b", 5), ("a", 6)):  # to B and back: the fixture is shared
        blob = serialize_state_dict(state_dict_of(models[name]))
        assert vllm_worker.load_weights(blob, version) == version
        assert greedy_ids(vllm_worker, prompts) == greedy_ref[name]
    assert vllm_worker.ready()["policy_version"] == 6


@pytest.mark.integration
def test_vllm_update_lacking_a_tensor_refuses_to_finish(vllm_worker, models, prompts, greedy_ref):
    state = state_dict_of(models["b"])
    vllm_worker.begin_weight_update()
    vllm_worker.load_weight_bucket(serialize_state_dict({k: v for k, v in state.items() if k != "model.norm.weight"}))
    with pytest.raises(ValueError, match=r"lacks 1 .*'model\.norm\.weight'"):  # vLLM itself would only log it
        vllm_worker.finish_weight_update(7)
    assert vllm_worker.policy_version != 7
    # a complete update afterwards is accepted and takes effect
    assert vllm_worker.load_weights(serialize_state_dict(state_dict_of(models["a"])), 8) == 8
    assert greedy_ids(vllm_worker, prompts) == greedy_ref["a"]


def test_only_the_rotary_cache_reload_warning_is_dropped_from_vllms_log():
    import logging

    import omni_ray.rollout.vllm_backend  # noqa: F401  installs the filter

    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")

    def shown(layer: str) -> bool:
        return bool(log.filter(log.makeRecord(log.name, logging.WARNING, __file__, 1, "%s: Failed to load weights",
                                              (layer,), None)))  # fmt: skip

    assert not shown("RotaryEmbedding")
    assert shown("QKVParallelLinear") and shown("VocabParallelEmbedding")
