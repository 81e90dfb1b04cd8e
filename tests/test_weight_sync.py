"""Learner -> rollout weight sync (omni_ray/weight_sync/): the nccl strategy's parts (bucket planning, packing,
HF -> vLLM names, a group whose root never comes), then every strategy end to end over Ray: real learner ranks
(DeepSpeed ZeRO-1 / ZeRO-3) push model A's weights in many small buckets into rollout workers running model B (HF
and vLLM engines), a stuck worker times the push out, a worker killed during a push is restarted and pushed to
again, and the nccl broadcast (over gloo, its CPU transport) re-forms its group after an engine restart.

Ground truth for "the engine runs A" is an independent greedy loop over A's HF model (tests/test_rollout.py).
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from omni_ray.driver.calls import wait_restarted
from omni_ray.weight_sync import (
    STRATEGIES,
    WeightSyncTimeout,
    blob_tensor_names,
    deserialize_state_dict,
    make_weight_sync,
    serialize_state_dict,
)
from omni_ray.weight_sync.blob import BucketFiles, DiskSync, ObjectStoreSync
from omni_ray.weight_sync.broadcast import (
    BUCKET_ALIGN,
    BroadcastGroup,
    BroadcastSync,
    TensorSpec,
    WeightNameError,
    bucket_layout,
    check_name_coverage,
    hf_to_vllm_name,
    normalize_hf_name,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)
from tests.conftest import ONE_RANK, require_vllm
from tests.test_rollout import MAX_NEW, PROMPTS, reference_greedy, state_dict_of

#: Small enough that the tiny model (39 tensors, 9.5 MB) travels in dozens of buckets, large enough that its norm
#: weights (1 KiB) share one; its 256 x 256 projections (256 KiB) are larger than a bucket and travel alone.
BUCKET_MB = 0.05
BUCKET_BYTES = int(BUCKET_MB * (1 << 20))
ACTOR_ENV = {"DS_ACCELERATOR": "cpu"}


def _specs() -> list[TensorSpec]:
    return [
        TensorSpec("a", (10,), "float32"),  # 40 B -> 48 aligned
        TensorSpec("b", (3, 5), "bfloat16"),  # 30 B -> 32
        TensorSpec("c", (100,), "float32"),  # 400 B: bigger than the bucket, goes alone
        TensorSpec("d", (2,), "int64"),  # 16 B
        TensorSpec("e", (), "float16"),  # scalar, 2 B -> 16
    ]


# --------------------------------------------------------------------------------------------- buckets and packing


def test_buckets_keep_model_order_respect_the_size_and_hold_every_tensor_once():
    buckets = plan_buckets(_specs(), bucket_bytes=96)
    assert [[s.name for s in b] for b in buckets] == [["a", "b"], ["c"], ["d", "e"]]
    for b in buckets:
        _, total = bucket_layout(b)
        assert total <= 96 or len(b) == 1
    assert [s for b in buckets for s in b] == _specs()


def test_one_huge_bucket_holds_everything():
    assert len(plan_buckets(_specs(), bucket_bytes=1 << 30)) == 1


def test_a_bucket_size_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        plan_buckets(_specs(), bucket_bytes=0)


def test_bucket_offsets_are_aligned_for_every_dtype():
    offsets, total = bucket_layout(_specs())
    assert offsets == [0, 48, 80, 480, 496] and total == 512  # 48 + 32 + 400 + 16 + 16 (aligned sizes)
    assert all(o % BUCKET_ALIGN == 0 for o in offsets) and total % BUCKET_ALIGN == 0


def test_tensor_spec_bytes_and_wire_form_round_trip():
    spec = TensorSpec("w", (3, 5), "bfloat16")
    assert spec.nbytes == 30
    assert TensorSpec.from_wire(spec.to_wire()) == spec
    assert TensorSpec("s", (), "float64").nbytes == 8


def test_pack_then_unpack_is_bitwise_identical_across_dtypes():
    specs = _specs()
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(s.shape, generator=gen).to(getattr(torch, s.dtype))
        if s.dtype != "int64"
        else torch.randint(-(2**40), 2**40, s.shape, generator=gen)
        for s in specs
    ]
    flat = pack_bucket(tensors, specs, torch.device("cpu"))
    out = unpack_bucket(flat, specs)
    assert [n for n, _ in out] == [s.name for s in specs]
    for (_, got), want in zip(out, tensors):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_pack_casts_to_the_planned_dtype_and_refuses_a_wrong_shape():
    spec = [TensorSpec("w", (2, 2), "bfloat16")]
    flat = pack_bucket([torch.ones(2, 2, dtype=torch.float32)], spec, torch.device("cpu"))
    assert unpack_bucket(flat, spec)[0][1].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shape"):
        pack_bucket([torch.ones(4)], spec, torch.device("cpu"))
    with pytest.raises(ValueError, match="the plan says 16"):
        unpack_bucket(torch.zeros(32, dtype=torch.uint8), spec)


def test_serialize_roundtrip_with_tied_weights():
    shared = torch.randn(4, 3)
    state = {"embed.weight": shared, "lm_head.weight": shared, "norm.weight": torch.ones(3)[::1]}
    blob = serialize_state_dict(state)
    back = deserialize_state_dict(blob)
    assert set(back) == set(state) == blob_tensor_names(blob)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_bucket_files_are_numbered_per_version_and_written_whole(tmp_path):
    put = BucketFiles(str(tmp_path / "weights"), version=3)
    blobs = [serialize_state_dict({"x": torch.arange(4.0)}), serialize_state_dict({"y": torch.ones(2)})]
    paths = [put(b) for b in blobs]
    assert [Path(p).name for p in paths] == ["policy_v00000003_00000.safetensors", "policy_v00000003_00001.safetensors"]
    assert [Path(p).read_bytes() for p in paths] == blobs
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [Path(p).name for p in paths]  # no temp files


# --------------------------------------------------------------------------------------------- names


def test_wrapper_prefixes_are_stripped_from_learner_names():
    assert normalize_hf_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert normalize_hf_name("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert normalize_hf_name("model.embed_tokens.weight") == "model.embed_tokens.weight"


@pytest.mark.parametrize(
    "hf, vllm, shard",
    [
        ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.qkv_proj.weight", "q"),
        ("model.layers.3.self_attn.k_proj.bias", "model.layers.3.self_attn.qkv_proj.bias", "k"),
        ("model.layers.3.self_attn.v_proj.weight", "model.layers.3.self_attn.qkv_proj.weight", "v"),
        ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.gate_up_proj.weight", 0),
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_up_proj.weight", 1),
        ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight", None),
        ("module.model.norm.weight", "model.norm.weight", None),
    ],
)
def test_hf_names_map_to_vllm_fused_parameters(hf, vllm, shard):
    assert hf_to_vllm_name(hf) == (vllm, shard)


LLAMA_HF = [
    "model.embed_tokens.weight",
    *(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]
LLAMA_VLLM = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.qkv_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def test_name_coverage_accepts_a_matching_model_and_names_both_kinds_of_mismatch():
    check_name_coverage(LLAMA_HF, LLAMA_VLLM)
    with pytest.raises(WeightNameError, match=r"1 engine parameters receive nothing .*lm_head"):
        check_name_coverage(LLAMA_HF[:-1], LLAMA_VLLM)
    with pytest.raises(WeightNameError, match=r"1 learner tensors map to no engine parameter .*score"):
        check_name_coverage([*LLAMA_HF, "score.weight"], LLAMA_VLLM)


# --------------------------------------------------------------------------------------------- strategy objects


def test_make_weight_sync_builds_the_named_strategy_with_its_options():
    common = dict(bucket_mb=0.5, timeout_s=7.0, restart=lambda j: None, max_retries=3)
    disk = make_weight_sync("disk", None, ["w0"], directory="/runs/x/weights", **common)
    assert isinstance(disk, DiskSync) and disk.directory == "/runs/x/weights"
    assert disk.bucket_bytes == 524288 and disk.timeout_s == 7.0 and disk.max_retries == 3
    assert isinstance(make_weight_sync("object_store", None, ["w0"], **common), ObjectStoreSync)
    nccl = make_weight_sync("nccl", None, ["w0", "w1"], tensor_parallel_size=2, collective_backend="gloo", **common)
    assert isinstance(nccl, BroadcastSync) and nccl.backend == "gloo" and nccl.world_size == 5  # 1 + 2 engines x 2
    assert sorted(STRATEGIES) == ["disk", "nccl", "object_store"]
    with pytest.raises(ValueError, match=r"unknown weight sync strategy 'rsync'.*'disk'"):
        make_weight_sync("rsync", None, [], **common)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_joining_a_group_whose_root_never_comes_raises_instead_of_hanging():
    with pytest.raises(Exception, match=r"(?i)timeout|timed out|connect"):
        BroadcastGroup("127.0.0.1", _free_port(), 1, 2, backend="gloo", timeout_s=1.0, device="cpu")


def test_an_unknown_collective_backend_is_refused():
    with pytest.raises(ValueError, match="nccl or gloo, got 'mpi'"):
        BroadcastGroup("127.0.0.1", _free_port(), 1, 2, backend="mpi", timeout_s=1.0, device="cpu")


# --------------------------------------------------------------------------------------------- over Ray: fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from omni_ray.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("sync_models")
    untrained = {"sft_target_accuracy": None, "sft_max_steps": 0}
    return {"a": make_tiny(root / "a", seed=0, **untrained), "b": make_tiny(root / "b", seed=1, **untrained)}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    from omni_ray.data import encode_prompt
    from omni_ray.models.tiny import build_tokenizer

    tok = build_tokenizer()
    return [encode_prompt(tok, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy_ref(models, prompts) -> dict[str, list[list[int]]]:
    ref = {name: reference_greedy(path, prompts, MAX_NEW) for name, path in models.items()}
    assert ref["a"] != ref["b"], "models A and B must disagree for these tests to mean anything"
    return ref


@pytest.fixture(scope="module")
def engines(ray_local, models) -> dict[str, Any]:
    """A restartable RolloutWorker actor per backend that imports here, both started on model B (without waiting
    for their start-up: it overlaps the learner ranks')."""
    from omni_ray.rollout import RolloutWorker
    from omni_ray.rollout.worker import vllm_import_error

    backends = ["hf"] + ([] if vllm_import_error() else ["vllm"])
    actor = ray_local.remote(RolloutWorker).options(num_cpus=0.2, max_restarts=2, runtime_env={"env_vars": ACTOR_ENV})
    handles = {b: actor.remote(str(models["b"]), backend=b) for b in backends}
    yield handles
    for h in handles.values():
        ray_local.kill(h, no_restart=True)


def _learner(models: dict[str, Path], zero_stage: int):
    from omni_ray.config import load_config
    from omni_ray.learner.group import LearnerGroup

    cfg = load_config(None, ["learner.num_workers=2", "learner.num_cpus=0.1", f"learner.zero_stage={zero_stage}",
                             "learner.batch_size=8", "loss.name=dpo"])  # fmt: skip
    return LearnerGroup(cfg, str(models["a"]), ACTOR_ENV)


@pytest.fixture(scope="module")
def zero3_learner(ray_local, models, engines):
    """Two DeepSpeed ZeRO-3 ranks holding model A (each rank holds half of every parameter). Asks for `engines` so
    that the engines start first and their start-up overlaps the ranks'."""
    group = _learner(models, 3)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def zero1_learner(ray_local, models, engines):
    """Two DeepSpeed ZeRO-1 ranks holding model A (replicated parameters)."""
    group = _learner(models, 1)
    yield group
    group.shutdown()


def _greedy(ray, actor, prompts) -> list[list[int]]:
    out = ray.get(actor.generate.remote(prompts, n=1, temperature=0.0, max_new_tokens=MAX_NEW, seed=0), timeout=120)
    return [row[0].token_ids for row in out]


def _version(ray, actor) -> int:
    return ray.get(actor.ready.remote(), timeout=300)["policy_version"]


def _put_on_b(ray, engine, models, greedy_ref, prompts, version: int = 100) -> None:
    """The engine runs model B (loaded from B's checkpoint file), so that a push of A is visible."""
    assert ray.get(engine.load_weights.remote(str(models["b"] / "model.safetensors"), version), timeout=300) == version
    assert _greedy(ray, engine, prompts) == greedy_ref["b"]


def _model_bytes(model_dir: Path) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict_of(model_dir).values())


def _kill_and_await_restart(ray, actor, timeout_s: float = 300) -> dict:
    """Kill a restartable actor and return the restarted process' `ready()`. Calls sent just after `ray.kill` may
    still reach the old process, so the restart is known only by a new pid."""
    pid = ray.get(actor.ready.remote(), timeout=60)["pid"]
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        wait_restarted(actor, timeout_s)
        try:
            info = ray.get(actor.ready.remote(), timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:
            continue
        if info["pid"] != pid:
            return info
        time.sleep(0.2)
    pytest.fail(f"actor {actor} did not come back from a restart within {timeout_s:.0f} s")


def _no_restart(j: int) -> None:
    pytest.fail(f"rollout worker {j} was restarted, but nothing killed it")


def _check_buckets(buckets: list[tuple[int, set[str]]], model_dir: Path) -> None:
    """Many buckets, each within the bucket size unless it holds a single tensor, every tensor in exactly one."""
    assert len(buckets) >= 20, "the test must exercise many buckets"
    for size, names in buckets:
        assert size <= BUCKET_BYTES or len(names) == 1, f"a {size} B bucket holds {len(names)} tensors"
    assert any(len(names) > 1 for _, names in buckets), "small tensors must share buckets"
    assert any(size > BUCKET_BYTES for size, _ in buckets), "a tensor larger than a bucket must travel alone"
    sent = [n for _, names in buckets for n in names]
    assert sorted(sent) == sorted(state_dict_of(model_dir))


# --------------------------------------------------------------------------------------------- over Ray: blob


@pytest.mark.integration
@pytest.mark.parametrize(
    "strategy, backend, zero_stage",
    [("object_store", "hf", 3), ("object_store", "vllm", 1), ("disk", "hf", 1), ("disk", "vllm", 3)],
)
def test_blob_push_in_many_small_buckets_replaces_the_engine_weights(
    ray_local, request, engines, models, prompts, greedy_ref, tmp_path, strategy, backend, zero_stage
):
    """Learner ranks holding model A push into an engine running model B, in buckets of 0.05 MB; afterwards the
    engine generates exactly what A generates."""
    if backend == "vllm":
        require_vllm()
    ray, engine = ray_local, engines[backend]
    learner = request.getfixturevalue(f"zero{zero_stage}_learner")
    _put_on_b(ray, engine, models, greedy_ref, prompts)
    directory = tmp_path / "weights"
    files: list[tuple[int, set[str]]] = []

    def read_files() -> None:  # runs after the export, before any worker loads
        if strategy == "disk":
            paths = sorted(directory.iterdir())
            assert all(p.name.startswith("policy_v00000011_") for p in paths)
            files.extend((p.stat().st_size, blob_tensor_names(p.read_bytes())) for p in paths)

    sync = make_weight_sync(strategy, learner, [engine], bucket_mb=BUCKET_MB, timeout_s=120, restart=_no_restart,
                            max_retries=0, directory=str(directory))  # fmt: skip
    sync.open()
    result = sync.push(11, before_load=read_files)
    sync.close()
    assert (result.version, result.strategy) == (11, strategy)
    assert result.num_bytes == _model_bytes(models["a"])
    if strategy == "disk":
        buckets = files
        assert list(directory.iterdir()) == [], "the disk strategy must remove its files once every worker read them"
    else:  # the same export again; `put` runs inside learner rank 0, here measuring each bucket instead of storing it
        sizes, _ = learner.export_weight_buckets(BUCKET_BYTES, len)
        names, _ = learner.export_weight_buckets(BUCKET_BYTES, blob_tensor_names)
        buckets = list(zip(sizes, names, strict=True))
    assert result.buckets == len(buckets)
    _check_buckets(buckets, models["a"])
    assert _version(ray, engine) == 11
    assert _greedy(ray, engine, prompts) == greedy_ref["a"]


class _StuckWorker:
    """Answers ready() but never finishes opening a weight update."""

    def ready(self) -> dict:
        return {"backend": "stuck"}

    def begin_weight_update(self) -> None:
        time.sleep(600)

    def load_weight_bucket(self, blob: Any) -> int:
        return 0

    def finish_weight_update(self, version: int) -> int:
        return version


@pytest.mark.integration
def test_push_times_out_naming_the_stuck_worker(ray_local, engines, zero1_learner):
    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable in Ray workers
    stuck = ray.remote(num_cpus=0)(_StuckWorker).remote()
    try:
        ray.get(stuck.ready.remote(), timeout=60)
        sync = make_weight_sync("object_store", zero1_learner, [engines["hf"], stuck], bucket_mb=BUCKET_MB,
                                timeout_s=5.0, restart=_no_restart, max_retries=0)  # fmt: skip
        with pytest.raises(WeightSyncTimeout, match=r"v9 \(object_store\): rollout workers \[1\] did not confirm"):
            sync.push(9)
        assert _version(ray, engines["hf"]) == 9  # the healthy worker took the update
    finally:
        ray.kill(stuck)


class _KillOnBegin:
    """Stands in for a rollout worker's actor handle: the first update session is opened, then the actor is killed
    while the session's calls are in flight (Ray restarts it, from the model dir). Everything else goes to the real
    handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.killed = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.handle, name)
        if name != "begin_weight_update" or self.killed:
            return method
        outer = self

        class _Method:
            def remote(self, *args: Any, **kwargs: Any) -> Any:
                import ray

                ref = method.remote(*args, **kwargs)
                outer.killed = True
                ray.kill(outer.handle, no_restart=False)
                return ref

        return _Method()


@pytest.mark.integration
def test_worker_killed_during_a_push_is_restarted_and_pushed_to_again(
    ray_local, engines, zero1_learner, models, prompts, greedy_ref
):
    ray, engine = ray_local, engines["hf"]
    _put_on_b(ray, engine, models, greedy_ref, prompts)
    pid = ray.get(engine.ready.remote(), timeout=60)["pid"]
    proxy, restarted, faults = _KillOnBegin(engine), [], []

    def restart(j: int) -> None:
        restarted.append(j)
        wait_restarted(engine, 300)

    sync = make_weight_sync("object_store", zero1_learner, [proxy], bucket_mb=BUCKET_MB, timeout_s=300,
                            restart=restart, max_retries=1, on_fault=faults.append)  # fmt: skip
    result = sync.push(12)
    assert proxy.killed and restarted == [0] and faults == ["rollout"]
    assert result.version == 12
    info = ray.get(engine.ready.remote(), timeout=60)
    assert info["pid"] != pid, "the worker must have been restarted"
    assert info["policy_version"] == 12
    assert _greedy(ray, engine, prompts) == greedy_ref["a"]


# --------------------------------------------------------------------------------------------- over Ray: nccl


@pytest.mark.integration
def test_nccl_broadcast_over_gloo_replaces_the_engine_weights_and_reforms_after_a_restart(
    ray_local, engines, zero3_learner, models, prompts, greedy_ref
):
    """ZeRO-3 learner ranks holding model A broadcast in many buckets over gloo into a vLLM engine running B; after
    the engine is killed and restarted (on B again), the group is re-formed with the new worker and A comes back."""
    require_vllm()
    ray, engine = ray_local, engines["vllm"]
    _put_on_b(ray, engine, models, greedy_ref, prompts)
    # open() checks the HF -> vLLM names; here: the real engine does fuse what the mapping says it fuses
    engine_names = ray.get(engine.param_names.remote(), timeout=60)
    assert any(".qkv_proj." in n for n in engine_names) and any(".gate_up_proj." in n for n in engine_names)
    restarted: list[int] = []
    sync = make_weight_sync("nccl", zero3_learner, [engine], bucket_mb=BUCKET_MB, timeout_s=120,
                            restart=restarted.append, max_retries=1, collective_backend="gloo")  # fmt: skip
    sync.open()
    try:
        result = sync.push(7)
        assert (result.version, result.strategy) == (7, "nccl")
        assert result.buckets >= 20, "the test must exercise many buckets"
        assert result.num_bytes == _model_bytes(models["a"])
        assert _version(ray, engine) == 7
        assert _greedy(ray, engine, prompts) == greedy_ref["a"]
        sync.push(8)  # a second push (weights unchanged) goes through the same open group
        assert _version(ray, engine) == 8 and _greedy(ray, engine, prompts) == greedy_ref["a"]

        info = _kill_and_await_restart(ray, engine)
        assert info["policy_version"] == 0
        assert _greedy(ray, engine, prompts) == greedy_ref["b"], "a restarted engine starts from its model dir"
        sync.worker_restarted(0)
        assert sync.push(9).version == 9
        assert restarted == [], "nothing died during a push"
        assert _version(ray, engine) == 9
        assert _greedy(ray, engine, prompts) == greedy_ref["a"]
    finally:
        sync.close()


@pytest.mark.integration
def test_driver_round_with_the_nccl_strategy_over_gloo_leaves_the_engine_on_the_trained_weights(
    ray_local, tmp_path, tiny_model_dir
):
    """The driver's wiring of the strategy (start_roles opens the group, the round pushes through it): after one
    trained round the engine generates exactly what the round's checkpoint generates."""
    require_vllm()
    from omni_ray.config import load_config
    from omni_ray.data import encode_prompt
    from omni_ray.driver import Driver
    from omni_ray.models.tiny import build_tokenizer

    cfg = load_config("configs/local_tiny.yaml", [
        f"run.output_dir={tmp_path}", "run.name=nccl_gloo", "run.rounds=1", f"model.path={tiny_model_dir}",
        "rollout.backend=vllm", "data.prompts_per_round=48", "data.eval_prompts=32", "rollout.samples_per_prompt=4",
        "learner.batch_size=16", "learner.epochs=1", "learner.lr=1e-3", "sync.strategy=nccl",
        "sync.collective_backend=gloo", "sync.bucket_mb=0.5", "logging.console=false", ONE_RANK,
        # small requests: the module's engines and learner ranks stay up alongside these roles
        "learner.num_cpus=0.1", "rollout.num_cpus=0.1", "scoring.num_cpus=0.05", "pop.num_cpus=0.05",
    ])  # fmt: skip
    driver = Driver(cfg)
    try:
        roles = driver.start_roles()
        assert isinstance(roles.sync, BroadcastSync) and len(roles.sync.buckets) > 1
        row = driver.run_round(0)
        assert not row.get("skipped") and row["pairs_kept"] > 0
        prompts = [encode_prompt(build_tokenizer(), p) for p in ("1+2=", "12+34=", "40+59=", "8+8=")]
        ckpt = tmp_path / "nccl_gloo" / "checkpoints" / "round_0001"
        assert _greedy(ray_local, roles.rollout[0], prompts) == reference_greedy(ckpt, prompts, MAX_NEW)
    finally:
        driver.close()
