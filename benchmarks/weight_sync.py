"""Weight sync learner -> rollout: seconds and MB/s per sync as the model grows (tiny -> ~100M parameters).

    .venv/bin/python benchmarks/weight_sync.py --quick    # tiny, ~10M, ~100M; 3 syncs each, 1 worker (~3 min)
    .venv/bin/python benchmarks/weight_sync.py            # tiny, ~10M, ~25M, ~50M, ~100M; 5 syncs each, 2 workers

Models are built offline (transformers' LlamaConfig via omni_ray.models.tiny.build_model, the tiny task's
tokenizer, random init, head_dim >= 32 for vLLM's CPU attention) into models/bench/ and cached. The tiny one is
models/tiny-arith (built by make-tiny when missing). For each size, real `RolloutWorker` Ray actors (the vLLM
backend when importable, as the driver starts them) receive new weights through the object-store strategy
(`omni_ray.weight_sync.ObjectStoreSync`, the CPU default) in buckets of `--bucket-mb`. Each sync sends different
weights (the policy plus fresh noise) and the workers' policy versions are checked, so nothing is skipped.

Per sync, as in a round: `export` is what learner rank 0 does (the state dict cut into buckets, each serialized and
put into the object store), `push` the rest of `WeightSync.push` until every worker confirmed the load (object-store
fetch, deserialize, vLLM's layer-wise reload per bucket). The learner is a stand-in holding the state dict (the
gathering of ZeRO-3 shards is the learner's cost, not the transport's). MB/s is the weights' size over push time, and
over export + push ("end to end").
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

NAME = "weight_sync"
MODELS = common.ROOT / "models" / "bench"


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int


# head_dim = hidden / heads = 64 (>= 32 for vLLM's CPU attention); full multi-head kv. Parameter counts are of the
# built model (the tiny task's 17-token vocabulary makes embeddings negligible: almost all weights are in the layers).
SIZES = {
    "tiny": None,  # models/tiny-arith, the demo's 2.4M-parameter policy
    "10m": Size("llama-10m", 384, 6, 6, 1024),
    "25m": Size("llama-25m", 512, 8, 8, 1536),
    "50m": Size("llama-50m", 640, 10, 10, 1792),
    "100m": Size("llama-100m", 768, 12, 12, 2560),
}


def build(size: Size | None) -> Path:
    """The model dir of a size: built once (random init) and cached under models/bench/."""
    if size is None:
        from omni_ray.driver import ensure_model

        return Path(ensure_model(common.config(NAME, "tiny")))
    out = MODELS / size.name
    if (out / "config.json").is_file():
        return out
    from omni_ray.models.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=size.hidden, num_layers=size.layers, num_heads=size.heads,
                        num_kv_heads=size.heads, intermediate_size=size.intermediate, max_position_embeddings=64,
                        seed=0)  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


class StateDictLearner:
    """The learner's `export_weight_buckets` over a state dict held here, timed (what rank 0 does, minus gathering)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.export_s = 0.0

    def export_weight_buckets(self, bucket_bytes: int, put: Any) -> tuple[list[Any], int]:
        from omni_ray.weight_sync.base import buckets_of, serialize_state_dict

        t0 = time.perf_counter()
        handles = [put(serialize_state_dict(b)) for b in buckets_of(self.state.items(), bucket_bytes)]
        self.export_s = time.perf_counter() - t0
        return handles, sum(t.numel() * t.element_size() for t in self.state.values())


def measure(path: Path, *, workers: int, reps: int, bucket_mb: float) -> dict[str, Any]:
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from omni_ray.driver import actor_env
    from omni_ray.rollout.worker import RolloutWorker
    from omni_ray.weight_sync import make_weight_sync

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    actors = [
        ray.remote(RolloutWorker)
        .options(num_cpus=0.5, runtime_env={"env_vars": actor_env()})
        .remote(str(path), backend="auto", seed=i, max_model_len=64)
        for i in range(workers)
    ]
    info = ray.get([a.ready.remote() for a in actors], timeout=600)
    learner = StateDictLearner()
    sync = make_weight_sync("object_store", learner, actors, bucket_mb=bucket_mb, timeout_s=600,
                            restart=lambda j: None, max_retries=0)  # fmt: skip
    syncs = []
    gen = torch.Generator().manual_seed(0)
    try:
        for v in range(1, reps + 1):
            # New content every sync (a real round changes every weight), generated outside the timed region.
            learner.state = {k: t + 1e-3 * torch.randn(t.shape, generator=gen) for k, t in base.items()}
            res, total_s = common.timed(lambda v=v: sync.push(v))
            versions = ray.get([a.ready.remote() for a in actors], timeout=60)
            if any(x["policy_version"] != v for x in versions):
                raise RuntimeError(f"sync {v}: workers report versions {[x['policy_version'] for x in versions]}")
            syncs.append({"sync": v, "mb": res.num_bytes / 1e6, "buckets": res.buckets, "export_s": learner.export_s,
                          "push_s": total_s - learner.export_s, "total_s": total_s})  # fmt: skip
    finally:
        for a in actors:
            ray.kill(a)
    # The first sync pays one-time costs (first object-store transfer to that worker, allocator growth): reported,
    # kept out of the means when there are more.
    steady = syncs[1:] or syncs
    mb = syncs[0]["mb"]
    export, push = (common.mean(s[k] for s in steady) for k in ("export_s", "push_s"))
    return {
        "model": str(path.resolve().relative_to(common.ROOT)),
        "params_m": params / 1e6,
        "weights_mb": mb,
        "buckets": syncs[0]["buckets"],
        "backend": info[0]["backend"],
        "workers": workers,
        "first_sync_s": syncs[0]["total_s"],
        "export_s": export,
        "push_s": push,
        "push_mb_per_s": mb / push,
        "end_to_end_s": export + push,
        "end_to_end_mb_per_s": mb / (export + push),
        "syncs": syncs,
    }


def main() -> None:
    p = common.parser(NAME, __doc__)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), help="default: tiny 10m 100m quick, all full")
    p.add_argument("--workers", type=int, help="rollout workers receiving each sync; default 1 quick, 2 full")
    p.add_argument("--reps", type=int, help="syncs per size; default 3 quick, 5 full")
    p.add_argument("--bucket-mb", type=float, default=512.0, help="sync.bucket_mb (default: the config's default)")
    args = p.parse_args()
    common.setup()
    started = time.perf_counter()
    info = common.machine()
    sizes = args.sizes or (["tiny", "10m", "100m"] if args.quick else list(SIZES))
    workers = args.workers or (1 if args.quick else 2)
    reps = args.reps or (3 if args.quick else 5)

    import ray

    ray.init(include_dashboard=False, log_to_driver=True)  # a local cluster of this process (actors get actor_env())
    results = []
    try:
        for name in sizes:
            path = build(SIZES[name])
            print(f"[bench] {name}: {path}", flush=True)
            results.append({"size": name, **measure(path, workers=workers, reps=reps, bucket_mb=args.bucket_mb)})
    finally:
        common.shutdown_ray()
    headers = ["size", "params (M)", "weights MB", "buckets", "export s", "push s", "push MB/s", "end-to-end s",
               "end-to-end MB/s", "first sync s"]  # fmt: skip
    rows = [[r["size"], r["params_m"], r["weights_mb"], r["buckets"], r["export_s"], r["push_s"], r["push_mb_per_s"],
             r["end_to_end_s"], r["end_to_end_mb_per_s"], r["first_sync_s"]] for r in results]  # fmt: skip
    table = (
        f"### weight sync (object store, {workers} worker(s), {results[0]['backend'] if results else '?'} backend, "
        f"mean of syncs 2..{reps})\n\n" + common.markdown_table(headers, rows, digits=3)
    )
    common.write_result(args.out, NAME, quick=args.quick,
                        settings={"sizes": sizes, "workers": workers, "reps": reps, "strategy": "object_store",
                                  "bucket_mb": args.bucket_mb},
                        results=results, tables=[table], machine_info=info, started=started)  # fmt: skip


if __name__ == "__main__":
    main()
