"""Rollout role: shared generation logic, HF and vLLM backends, and learner -> rollout weight sync over Ray.

The two tiny models (A, B) are random-weight tiny Llamas with different seeds: they build in well under a second,
and their greedy outputs differ, which is all a weight-sync test needs. Ground truth for "the worker now runs B" is
an independent greedy loop over B's HF model (full forward, argmax, no padding, no backend code).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from omni_ray.models.tiny import build_tokenizer, encode_prompt, make_tiny
from omni_ray.rollout import Completion, GenerationBackend, RolloutWorker, make_backend
from omni_ray.rollout.worker import derive_seed, trim_completion
from omni_ray.weight_sync import (
    WeightSyncTimeout,
    deserialize_state_dict,
    push_weights,
    serialize_state_dict,
)

PROMPTS = ["1+2=", "12+34=", "99*99=", "7-3=", "5 + 60 ="]  # different lengths: exercises left padding
MAX_NEW = 8


def _vllm_import_error() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install (e.g. torchvision mismatch) raises more than ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rollout_models")
    return {
        "a": make_tiny(root / "a", seed=0, sft_steps=0),
        "b": make_tiny(root / "b", seed=1, sft_steps=0),
    }


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [encode_prompt(tokenizer, p) for p in PROMPTS]


def reference_greedy(model_dir: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy ids by a plain argmax loop over the HF model: independent of both backends."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = list(p)
            for _ in range(max_new):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == eos:
                    break
            out.append(ids[len(p) :])
    return out


@pytest.fixture(scope="module")
def greedy_ref(models, prompts) -> dict[str, list[list[int]]]:
    return {name: reference_greedy(path, prompts, MAX_NEW) for name, path in models.items()}


@pytest.fixture(scope="module")
def hf_worker(models):
    return RolloutWorker(str(models["a"]), backend="hf")


@pytest.fixture(scope="module")
def vllm_worker(models):
    err = _vllm_import_error()
    if err:
        pytest.skip(f"vllm cannot be imported ({err}); the vLLM backend is untestable here")
    worker = RolloutWorker(str(models["a"]), backend="vllm")
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    owner = not ray.is_initialized()  # another module's cluster is reused, and left running
    if owner:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if owner:
        ray.shutdown()


# --------------------------------------------------------------------------------------------- shared logic


class _ScriptedBackend(GenerationBackend):
    """Returns fixed raw streams: tests the shared code (trimming, greedy fan-out, validation) without a model."""

    name = "scripted"

    def __init__(self, streams: list[list[int]]) -> None:
        self.tokenizer = build_tokenizer()
        self.eos_token_ids = frozenset({self.tokenizer.eos_token_id})
        self.max_model_len = 16
        self.checkpoint_tensor_names = frozenset()
        self.streams = streams
        self.calls: list[dict] = []

    def _generate_ids(self, prompts, **kw):
        self.calls.append(kw)
        return [[list(s) for s in self.streams[: kw["n"]]] for _ in prompts]

    def _load_weights(self, blob: bytes) -> None:
        raise NotImplementedError


def test_trim_completion_keeps_eos_and_drops_padding():
    eos, pad = 2, 0
    assert trim_completion([5, 6, eos, pad, pad], frozenset({eos})) == ([5, 6, eos], True)
    assert trim_completion([5, 6, 7], frozenset({eos})) == ([5, 6, 7], False)
    assert trim_completion([eos, eos], frozenset({eos})) == ([eos], True)  # pad == eos models


def test_shared_generate_logic(tokenizer):
    eos = tokenizer.eos_token_id
    digits = tokenizer.encode("42", add_special_tokens=False)
    backend = _ScriptedBackend([digits + [eos, 0, 0], digits + [5, 5]])
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
    with pytest.raises(ValueError):
        backend.generate([prompt], n=1, temperature=-1.0, top_p=1.0, max_new_tokens=2, seed=0)
    assert backend.generate([], n=2, temperature=1.0, top_p=1.0, max_new_tokens=2, seed=0) == []
    assert len({derive_seed(s, i) for s in range(20) for i in range(50)}) == 1000
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_backend("/nonexistent", backend="tgi")


def test_serialize_roundtrip_with_tied_weights():
    shared = torch.randn(4, 3)
    state = {"embed.weight": shared, "lm_head.weight": shared, "norm.weight": torch.ones(3)[::1]}
    back = deserialize_state_dict(serialize_state_dict(state))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


# --------------------------------------------------------------------------------------------- backends, no Ray


def _check_backend(worker: RolloutWorker, prompts: list[list[int]], greedy_a: list[list[int]]) -> None:
    out = worker.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW, seed=7)
    assert len(out) == len(prompts) and all(len(row) == 3 for row in out)
    for row in out:
        for c in row:
            assert isinstance(c, Completion) and isinstance(c.text, str)
            assert all(isinstance(t, int) for t in c.token_ids) and 1 <= len(c.token_ids) <= MAX_NEW
            assert c.finished == (c.token_ids[-1] in worker._backend.eos_token_ids)
            assert worker.tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text
    again = worker.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW, seed=7)
    assert again == out, "same seed + same weights must repeat the samples"
    other = worker.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW, seed=8)
    assert other != out

    greedy = worker.generate(prompts, n=2, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=0)
    assert [[c.token_ids for c in row] for row in greedy] == [[ids, ids] for ids in greedy_a]
    single = worker.generate(prompts[1:2], n=1, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=3)
    assert single[0][0] == greedy[1][0], "greedy must not depend on batch composition / padding"


def _incomplete_blob(model_dir: Path) -> bytes:
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    return serialize_state_dict({k: v for k, v in state.items() if k != "model.norm.weight"})


def test_hf_backend(hf_worker, prompts, greedy_ref, models):
    assert hf_worker.backend_name == "hf"
    _check_backend(hf_worker, prompts, greedy_ref["a"])
    with pytest.raises(ValueError, match=r"lacks 1 .*model\.norm\.weight"):
        hf_worker.load_weights(_incomplete_blob(models["b"]))
    assert hf_worker.policy_version == 0


@pytest.mark.integration
def test_vllm_backend(vllm_worker, prompts, greedy_ref):
    assert vllm_worker.backend_name == "vllm"
    _check_backend(vllm_worker, prompts, greedy_ref["a"])


@pytest.mark.integration
def test_vllm_in_process_weight_reload(vllm_worker, models, prompts, greedy_ref):
    from transformers import AutoModelForCausalLM

    def greedy_ids() -> list[list[int]]:
        out = vllm_worker.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=0)
        return [row[0].token_ids for row in out]

    for name, version in (("b", 5), ("a", 6)):  # to B and back: the fixture is shared
        state = AutoModelForCausalLM.from_pretrained(models[name]).state_dict()
        assert vllm_worker.load_weights(serialize_state_dict(state), version) == version
        assert greedy_ids() == greedy_ref[name]
    assert vllm_worker.ready()["policy_version"] == 6
    with pytest.raises(ValueError, match="lacks 1"):  # vLLM itself would only log a warning
        vllm_worker.load_weights(_incomplete_blob(models["b"]))
    assert greedy_ids() == greedy_ref["a"]


# --------------------------------------------------------------------------------------------- weight sync over Ray


class _StuckWorker:
    """Answers ready() but never finishes a weight load."""

    def ready(self) -> dict:
        return {"backend": "stuck"}

    def load_weights(self, blob: bytes, version: int | None = None) -> int:
        time.sleep(600)
        return -1


@pytest.fixture(scope="module")
def ray_actors(ray_cluster, models):
    """One RolloutWorker actor per available backend, all on model A; created without waiting for start-up."""
    backends = ["hf"] + ([] if _vllm_import_error() else ["vllm"])
    actor_cls = ray_cluster.remote(num_cpus=0.5)(RolloutWorker)
    actors = {b: actor_cls.remote(str(models["a"]), backend=b) for b in backends}
    yield actors
    for a in actors.values():
        ray_cluster.kill(a)


@pytest.fixture(scope="module", autouse=True)
def _start_ray_actors_early(request):
    """The actors' start-up (~15 s, mostly `import vllm`) overlaps the in-process tests, when Ray tests run."""
    if any("ray_workers" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("ray_actors")


@pytest.fixture(scope="module")
def ray_workers(ray_cluster, ray_actors):
    info = ray_cluster.get([a.ready.remote() for a in ray_actors.values()], timeout=180)
    assert [i["backend"] for i in info] == list(ray_actors)
    return ray_actors


def _actor_greedy(ray, actor, prompts) -> list[list[int]]:
    out = ray.get(actor.generate.remote(prompts, n=2, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=0))
    assert all(row[0] == row[1] for row in out)
    return [row[0].token_ids for row in out]


@pytest.mark.integration
def test_push_weights_switches_policy(ray_cluster, ray_workers, models, prompts, greedy_ref, tmp_path):
    from transformers import AutoModelForCausalLM

    ray = ray_cluster
    assert greedy_ref["a"] != greedy_ref["b"], "models A and B must disagree for this test to mean anything"
    workers = list(ray_workers.values())
    for actor in workers:
        assert _actor_greedy(ray, actor, prompts) == greedy_ref["a"]

    blob_b = serialize_state_dict(AutoModelForCausalLM.from_pretrained(models["b"]).state_dict())
    result = push_weights(workers, blob_b, version=1, timeout_s=60)
    assert result.version == 1 and result.num_bytes == len(blob_b)
    for name, actor in ray_workers.items():
        assert _actor_greedy(ray, actor, prompts) == greedy_ref["b"], f"{name} worker does not run model B"
        assert ray.get(actor.ready.remote(), timeout=30)["policy_version"] == 1

    # disk strategy, back to A; the file is removed once every worker has loaded it
    blob_a = serialize_state_dict(AutoModelForCausalLM.from_pretrained(models["a"]).state_dict())
    push_weights(workers, ray.put(blob_a), version=2, timeout_s=60, strategy="disk", disk_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    for actor in workers:
        assert _actor_greedy(ray, actor, prompts) == greedy_ref["a"]
        assert ray.get(actor.ready.remote(), timeout=30)["policy_version"] == 2


@pytest.mark.integration
def test_push_weights_times_out_on_stuck_worker(ray_cluster, ray_workers, models):
    ray = ray_cluster
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable in Ray workers
    stuck = ray.remote(num_cpus=0)(_StuckWorker).remote()
    ray.get(stuck.ready.remote(), timeout=60)
    healthy = ray_workers["hf"]
    blob = Path(models["a"], "model.safetensors").read_bytes()
    t0 = time.perf_counter()
    with pytest.raises(WeightSyncTimeout, match=r"1/2 rollout workers did not confirm.*#1") as info:
        push_weights([healthy, stuck], blob, version=9, timeout_s=2.0)
    assert time.perf_counter() - t0 < 10
    assert info.value.pending == [1]
    ray.kill(stuck)
