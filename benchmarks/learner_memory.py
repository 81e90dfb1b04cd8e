"""Learner memory: the measured peak of one learner rank's step, against omni_ray.plan and as the batch grows.

    .venv/bin/python benchmarks/learner_memory.py --calibrate   # plan vs measurement, 3 sizes x 128-512 tokens
    .venv/bin/python benchmarks/learner_memory.py               # peak vs batch, micro-batch, checkpointing; pairs/s
    .venv/bin/python benchmarks/learner_memory.py --quick       # the same, smaller (~5 min)
    .venv/bin/python benchmarks/learner_memory.py --lora        # LoRA rank 16 vs full fine-tuning, 50M model

Models: Llama architecture, 32k vocabulary, random weights, built offline with transformers' LlamaConfig and saved
with the tiny task's tokenizer under models/bench/learner-memory/ (cached). Pairs: random token ids, prompts of
`prompt` or `prompt - 1` tokens and responses of `response` or `response - 1` (so there is padding, and with it the
attention mask that real batches have), every pair padded to `prompt + response`.

How a point is measured. Each point runs in a fresh process (`--point JSON`): an in-process `LearnerWorker` (world
size 1, DS_ACCELERATOR=cpu, float32, ZeRO-0 unless the point says otherwise, `loss.name=dpo`: policy + reference)
trains a warm-up round, a timed round, then a round under torch.profiler with `profile_memory=True`. The profiler
records each allocation and free of torch's CPU allocator with its size and time, so the running sum is the bytes
held in tensors: not Python objects, not memory glibc keeps after a free (RSS counts both, and after the warm-up the
allocator's retained blocks would hide the step's own growth). Instance-level wrappers put profiler markers around
the DeepSpeed engine's public `forward`, `backward`, `allreduce_gradients` and `step`, and a post-accumulate-grad
hook marks each parameter's gradient, which places every allocation in one of the plan's phases:
- logits backward: from the training forward to the first gradient of a decoder layer's parameter (the response
  logits and their gradients are alive, next to every activation the forward saved);
- layer backward: from there to the end of the backward;
both not counting the parameter gradients allocated so far (the plan counts them among the resting terms);
- gradient reduction and optimizer step: inside `allreduce_gradients` and `step`.
Resting memory (weights, reference, optimizer state) is what the round starts with; "peak" below is above it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

NAME = "learner_memory"
MODELS = common.ROOT / "models" / "bench" / "learner-memory"
VOCAB = 32000
MIB = 1 << 20

# Calibration sizes: head_dim 64, half as many kv heads as heads, intermediate/hidden 4, 3 and 2.75 (so the MLP
# and hidden terms are not measured at one ratio only); 4 layers each.
SIZES = {256: 1024, 512: 1536, 1024: 2816}
LAYERS = 4


def model_dir(hidden: int, intermediate: int, layers: int, arch: str = "llama", root: Path = MODELS) -> Path:
    """A random-weight model of this shape (Llama, or Gemma-2: four norms per layer, tied embeddings, the final
    logit cap), built once and cached under `root`."""
    out = root / f"{arch}-h{hidden}-i{intermediate}-l{layers}-v{VOCAB}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    from omni_ray.models.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    heads = hidden // 64
    common_args = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "gemma2":
        config = Gemma2Config(**common_args, head_dim=64, query_pre_attn_scalar=64)
    else:
        config = LlamaConfig(**common_args, tie_word_embeddings=False)
    tmp = out.with_name(out.name + ".tmp")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def round_data(pairs: int, prompt: int, response: int, seed: int = 0) -> Any:
    import numpy as np

    from omni_ray.learner.worker import RoundData
    from omni_ray.pairs import Pair
    from omni_ray.pop import PopItems

    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(3, VOCAB, n).tolist()

    rows = [Pair(f"p{i}", "", ids(prompt - i % 2), "", "", ids(response), ids(response - 1), 10.0, 5.0)
            for i in range(pairs)]  # fmt: skip
    return RoundData(rows, PopItems.every_pair(pairs))


# ---------------------------------------------------------------------------------------------------------------------
# one point, in its own process


def _marked(name: str, fn: Any) -> Any:
    import torch

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def _grad_marker(layer: bool) -> Any:
    """A post-accumulate-grad hook that marks the parameter's gradient bytes, and whether it is a decoder layer's."""
    import torch

    def mark(param: Any) -> None:
        nbytes = param.grad.numel() * param.grad.element_size()
        with torch.profiler.record_function(f"bench:grad:{nbytes}:{int(layer)}"):
            pass

    return mark


def measure_point(point: dict[str, Any], models: Path = MODELS) -> dict[str, Any]:
    """Train one point's rounds in this process; the phases' peaks above resting memory (bytes) and the timing.
    Models are built under `models`."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from omni_ray.config import load_config
    from omni_ray.learner.worker import LearnerWorker

    p = point
    path = model_dir(p["hidden"], p["intermediate"], p["layers"], p.get("arch", "llama"), models)
    cfg = load_config(None, [
        "learner.num_workers=1", f"learner.batch_size={p['batch_size']}", f"learner.micro_batch_size={p['micro']}",
        "learner.epochs=1", "loss.name=dpo", f"learner.zero_stage={p.get('zero_stage', 0)}",
        f"learner.gradient_checkpointing={str(p['checkpointing']).lower()}", f"model.dtype={p.get('dtype', 'float32')}",
        f"learner.lora.rank={p.get('lora', 0)}",
    ])  # fmt: skip
    data = round_data(p["pairs"], p["prompt"], p["response"])
    worker = LearnerWorker(cfg, str(path))
    worker.init_process_group(*worker.rendezvous())
    engine = worker.engine
    for method in ("forward", "backward", "allreduce_gradients", "step"):
        setattr(engine, method, _marked(f"bench:{method}", getattr(engine, method)))
    for name, param in engine.module.named_parameters():
        if param.requires_grad:  # with LoRA only the adapters are trained
            param.register_post_accumulate_grad_hook(_grad_marker(".layers." in f".{name}"))
    worker.train_round(data)  # warm-up: one-time allocations, kernel caches
    t0 = time.perf_counter()
    worker.train_round(data)
    seconds = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        worker.train_round(data)
    events = prof.profiler.kineto_results.events()
    inference = 0.0 if p.get("lora") else _inference_peak(worker, data)
    sync = _weight_export(worker, adapter_only=bool(p.get("lora")))
    torch.distributed.destroy_process_group()

    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    t = np.array([m[0] for m in mem], dtype=np.int64)
    held = np.cumsum([m[1] for m in mem])  # bytes above the round's start (its resting memory)
    marks = sorted((e.start_ns(), e.end_ns(), e.name().removeprefix("bench:")) for e in events
                   if e.name().startswith("bench:"))  # fmt: skip
    spans = {k: [(s, e) for s, e, n in marks if n == k] for k in ("forward", "backward", "allreduce_gradients", "step")}

    def peak(s: int, e: int, minus: np.ndarray | None = None) -> float:
        i, j = np.searchsorted(t, s), np.searchsorted(t, e)
        if i >= j:
            return 0.0
        return float((held[i:j] - (0 if minus is None else minus[i:j])).max())

    # A parameter's gradient is allocated before its hook runs: date it to the last allocation of its size.
    allocated_grads = np.zeros(len(t))
    layer_grads = []  # when each decoder-layer gradient was allocated
    for s, _, name in marks:
        if name.startswith("grad:"):
            _, size, layer = name.split(":")
            k = np.searchsorted(t, s) - 1
            while k >= 0 and mem[k][1] != int(size):
                k -= 1
            allocated_grads[max(k, 0)] += int(size)
            if layer == "1":
                layer_grads.append(t[max(k, 0)])
    grads_so_far = np.cumsum(allocated_grads)
    logits_phase = layer_phase = 0.0
    for b_start, b_end in spans["backward"]:
        start = max(s for s, _ in spans["forward"] if s < b_start)  # the training forward of this backward
        reductions = [(s, e) for s, e in spans["allreduce_gradients"] if b_start <= s <= b_end]
        autograd_end = min([s for s, _ in reductions], default=b_end)
        first_layer = min((x for x in layer_grads if start <= x <= autograd_end), default=autograd_end)
        i = np.searchsorted(t, start)
        base, grads = (held[i - 1], grads_so_far - grads_so_far[i - 1]) if i > 0 else (0, grads_so_far)
        logits_phase = max(logits_phase, peak(start, first_layer, grads) - base)
        layer_phase = max(layer_phase, peak(first_layer, autograd_end, grads) - base)
    reduction = max((peak(s, e) for s, e in spans["allreduce_gradients"]), default=0.0)
    step = max((peak(s, e) for s, e in spans["step"]), default=0.0)
    resting = _resting_bytes()
    return {**p, "params": sum(x.numel() for x in engine.module.parameters()), "logits_backward": logits_phase,
            "layer_backward": layer_phase, "reduction": reduction, "step": step, "round_peak": float(held.max()),
            "resting": resting, "inference": inference, "round_s": seconds,
            "pairs_per_s": p["pairs"] / seconds, **sync}  # fmt: skip


def _weight_export(worker: Any, adapter_only: bool) -> dict[str, float]:
    """What one weight sync moves: the blob strategies' export (512 MB buckets, serialized), its bytes and seconds."""
    t0 = time.perf_counter()
    blobs, num_bytes = worker.export_weight_buckets(512 << 20, bytes, adapter_only)
    return {"sync_bytes": float(num_bytes), "sync_blob_bytes": float(sum(map(len, blobs))),
            "sync_export_s": time.perf_counter() - t0}  # fmt: skip


def _inference_peak(worker: Any, data: Any) -> float:
    """Peak bytes above the start of a no-grad forward of the decoder alone (what a reward model runs before its
    score head) over the round's sequences: a scoring batch."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from omni_ray.models.logprobs import pack

    pairs = data.pairs
    batch = pack(
        [x.prompt_token_ids for x in pairs] * 2,
        [x.chosen_token_ids for x in pairs] + [x.rejected_token_ids for x in pairs],
        worker.pad_id,
    )
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        worker.engine.module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    sizes = [e.nbytes() for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
             if e.name() == "[memory]"]  # fmt: skip
    return float(np.cumsum(sizes).max()) if sizes else 0.0


def _resting_bytes() -> int:
    """Bytes of every tensor this process holds between rounds (weights, reference, optimizer state and its float32
    copies), each storage once."""
    import gc
    import warnings

    import torch

    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects among them warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type == "cpu"]
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def run_point(point: dict[str, Any], models: Path = MODELS) -> dict[str, Any]:
    """`measure_point` in a fresh process (a clean allocator, one process group per point); models under `models`."""
    common.setup()
    proc = subprocess.run([sys.executable, __file__, "--point", json.dumps(point), str(models)], capture_output=True,
                          text=True, cwd=common.ROOT, timeout=3600)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("POINT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"point {point} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("POINT "))


# ---------------------------------------------------------------------------------------------------------------------
# plan side


def planned(point: dict[str, Any]) -> dict[str, float]:
    """omni_ray.plan's forward/backward phases (beyond resting) for a point's shape, and its resting terms."""
    from omni_ray.config import load_config
    from omni_ray.plan import DTYPE_BYTES, ModelShape, StepShape, activation_phases, inference_bytes, learner_resting

    p = point
    heads = p["hidden"] // 64
    gemma = p.get("arch") == "gemma2"
    shape = ModelShape(p["layers"], p["hidden"], p["intermediate"], heads, heads // 2, 64, VOCAB, gemma, 1024,
                       norms_per_layer=4 if gemma else 2, norm_float32_scale=gemma,
                       final_logit_softcap=gemma)  # fmt: skip
    d = DTYPE_BYTES[p.get("dtype", "float32")]
    step = StepShape(2 * p["micro"], p["prompt"] + p["response"], p["response"])
    logits, layer = activation_phases(shape, step, d, p["checkpointing"])
    # A tied embedding's gradient waits in autograd's buffer until the embedding's own backward, so it is in flight
    # during the layer backward here; the plan counts it among the gradients (resting terms, ZeRO-3's gather).
    tied = VOCAB * p["hidden"] * d if gemma else 0
    cfg = load_config(None, ["learner.num_workers=1", f"learner.zero_stage={p.get('zero_stage', 0)}",
                             "loss.name=dpo", f"model.dtype={p.get('dtype', 'float32')}"])  # fmt: skip
    resting = sum(b for name, b in learner_resting(cfg, shape) if name in ("params", "optimizer", "reference"))
    inference = inference_bytes(shape, d, step.tokens, step.sequences, step.width)
    return {"logits_backward": logits.total, "layer_backward": layer.total + tied, "resting": resting,
            "inference": inference, "params": shape.params}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# the two runs


def point(hidden: int, *, pairs: int, prompt: int, response: int, checkpointing: bool, batch_size: int | None = None,
          micro: int | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {"hidden": hidden, "intermediate": SIZES[hidden], "layers": LAYERS, "pairs": pairs, "prompt": prompt,
            "response": response, "checkpointing": checkpointing, "batch_size": batch_size or pairs,
            "micro": micro or pairs, **extra}  # fmt: skip


def calibrate(quick: bool) -> tuple[list[dict], list[str]]:
    """Plan vs measurement on one rank's forward/backward: 3 sizes x 128 / 256 / 512-token pairs (prompt = response)
    x checkpointing, plus short responses (the layer backward's peak) for each size."""
    widths = (128, 512) if quick else (128, 256, 512)
    points = [point(h, pairs=2, prompt=w // 2, response=w // 2, checkpointing=c)
              for h in SIZES for w in widths for c in (False, True)]  # fmt: skip
    points += [point(h, pairs=2, prompt=448, response=64, checkpointing=c) for h in SIZES for c in (False, True)]
    points.append(point(512, pairs=2, prompt=128, response=128, checkpointing=True, dtype="bfloat16"))
    # Gemma-2's layer: four norms, a float32 norm scale, tied embeddings, the final logit cap.
    points += [point(512, pairs=2, prompt=128, response=128, checkpointing=c, arch="gemma2") for c in (False, True)]
    points.append(point(512, pairs=2, prompt=128, response=128, checkpointing=True, arch="gemma2", dtype="bfloat16"))
    rows = []
    for pt in points:
        m, p = run_point(pt), planned(pt)
        measured = max(m["logits_backward"], m["layer_backward"])
        plan = max(p["logits_backward"], p["layer_backward"])
        rows.append({**m, "planned_logits_backward": p["logits_backward"], "measured": measured, "planned": plan,
                     "planned_layer_backward": p["layer_backward"], "ratio": plan / measured,
                     "planned_resting": p["resting"], "planned_params": p["params"],
                     "planned_inference": p["inference"]})  # fmt: skip
        print(
            f"[bench] {pt.get('arch', 'llama')} h{pt['hidden']} {2 * pt['pairs']}x{pt['prompt'] + pt['response']} "
            f"ckpt={pt['checkpointing']} "
            f"{pt.get('dtype', 'float32')}: measured {measured / MIB:.1f} MiB, planned {plan / MIB:.1f}",
            flush=True,
        )
    table = common.markdown_table(
        ["model", "dtype", "tokens", "checkpointing", "measured MiB", "planned MiB", "ratio", "peak phase"],
        [(f"{r.get('arch', 'llama')} h{r['hidden']} i{r['intermediate']} L{r['layers']}", r.get("dtype", "float32"),
          f"{2 * r['pairs']} x {r['prompt'] + r['response']} (resp {r['response']})", r["checkpointing"],
          r["measured"] / MIB, r["planned"] / MIB, r["ratio"],
          "logits" if r["logits_backward"] >= r["layer_backward"] else "layer") for r in rows],
    )  # fmt: skip
    resting = common.markdown_table(
        ["model", "params (plan / model)", "resting measured MiB", "resting planned MiB"],
        [(f"h{r['hidden']}", f"{r['planned_params']} / {r['params']}", r["resting"] / MIB, r["planned_resting"] / MIB)
         for r in rows if r["prompt"] == r["response"] == 64 and not r["checkpointing"] and "arch" not in r],
    )  # fmt: skip
    inference = common.markdown_table(
        ["model", "dtype", "tokens", "measured MiB", "planned MiB", "ratio"],
        [(f"{r.get('arch', 'llama')} h{r['hidden']}", r.get("dtype", "float32"),
          f"{2 * r['pairs']} x {r['prompt'] + r['response']}", r["inference"] / MIB, r["planned_inference"] / MIB,
          r["planned_inference"] / r["inference"]) for r in rows if not r["checkpointing"]],
    )  # fmt: skip
    return rows, [
        "### calibration: forward/backward peak above resting, plan vs measured\n\n" + table,
        "### no-grad forward (a reward model's scoring batch), plan vs measured\n\n" + inference,
        "### resting memory (float32, ZeRO-0: policy + reference + AdamW moments)\n\n" + resting,
    ]


def scaling(quick: bool) -> tuple[list[dict], list[str]]:
    """Peak vs learner.batch_size at micro-batch 4, vs the micro-batch, with and without checkpointing, and
    pairs/s; hidden 512, 256-token pairs (128 prompt + 128 response)."""
    base = {"pairs": 64, "prompt": 128, "response": 128}
    batches = (4, 16) if quick else (4, 16, 64)
    micros = (4, 8) if quick else (4, 8, 16)
    plan = [("batch", b, point(512, **{**base, "pairs": max(b, 16)}, batch_size=b, micro=4, checkpointing=False))
            for b in batches]  # fmt: skip
    plan += [("micro", m, point(512, **{**base, "pairs": 16}, batch_size=16, micro=m, checkpointing=False))
             for m in micros]  # fmt: skip
    plan += [("checkpointing", c, point(512, **{**base, "pairs": 16}, batch_size=16, micro=4, checkpointing=c))
             for c in (False, True)]  # fmt: skip
    if quick:
        plan = [(k, v, {**p, "pairs": min(p["pairs"], 16)}) for k, v, p in plan]
    rows = []
    for kind, value, pt in plan:
        m = run_point(pt)
        fwd_bwd = max(m["logits_backward"], m["layer_backward"])
        rows.append({**m, "kind": kind, "value": value, "fwd_bwd": fwd_bwd})
        print(
            f"[bench] {kind}={value}: forward/backward {fwd_bwd / MIB:.1f} MiB, round peak "
            f"{m['round_peak'] / MIB:.1f} MiB, {m['pairs_per_s']:.2f} pairs/s",
            flush=True,
        )
    tables = []
    for kind, title in (("batch", "peak vs learner.batch_size (micro-batch 4)"),
                        ("micro", "peak vs learner.micro_batch_size (batch 16)"),
                        ("checkpointing", "checkpointing (batch 16, micro-batch 4)")):  # fmt: skip
        sel = [r for r in rows if r["kind"] == kind]
        ref = sel[0]["fwd_bwd"]
        tables.append(f"### {title}\n\n" + common.markdown_table(
            [kind, "pairs / round", "forward/backward MiB", "vs first", "round peak MiB", "reduction MiB",
             "step MiB", "round s", "pairs/s"],
            [(r["value"], r["pairs"], r["fwd_bwd"] / MIB, r["fwd_bwd"] / ref, r["round_peak"] / MIB,
              r["reduction"] / MIB, r["step"] / MIB, r["round_s"], r["pairs_per_s"]) for r in sel],
        ))  # fmt: skip
    return rows, tables


def lora(quick: bool) -> tuple[list[dict], list[str]]:
    """LoRA rank 16 (every projection of the decoder layers) against full fine-tuning on benchmarks/peer_trl.py's
    ~50M-parameter shape (hidden 512, 12 layers, MLP 2048; here with the 32k vocabulary): one rank, float32, DPO,
    32 pairs of 64 + 64 tokens per round in micro-batches of 8."""
    base = {"hidden": 512, "intermediate": 2048, "layers": 12, "pairs": 16 if quick else 32, "prompt": 64,
            "response": 64, "checkpointing": False, "batch_size": 16 if quick else 32, "micro": 8}  # fmt: skip
    rows = []
    for rank in (0, 16):
        m = run_point({**base, "lora": rank})
        fwd_bwd = max(m["logits_backward"], m["layer_backward"])
        rows.append({**m, "fwd_bwd": fwd_bwd})
        print(f"[bench] lora rank {rank}: resting {m['resting'] / MIB:.1f} MiB, forward/backward {fwd_bwd / MIB:.1f}"
              f" MiB, {m['pairs_per_s']:.2f} pairs/s, sync {m['sync_bytes'] / MIB:.2f} MiB in "
              f"{m['sync_export_s']:.3f} s", flush=True)  # fmt: skip
    table = common.markdown_table(
        ["learner", "resting MiB", "forward/backward MiB", "round peak MiB", "step MiB", "pairs/s",
         "sync MiB", "sync export s"],
        [("full fine-tuning" if r["lora"] == 0 else f"LoRA rank {r['lora']}", r["resting"] / MIB, r["fwd_bwd"] / MIB,
          r["round_peak"] / MIB, r["step"] / MIB, r["pairs_per_s"], r["sync_bytes"] / MIB, r["sync_export_s"])
         for r in rows],
    )  # fmt: skip
    return rows, ["### LoRA rank 16 vs full fine-tuning (50M shape, 32k vocab)\n\n" + table]


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--point":
        common.setup()
        models = Path(sys.argv[3]) if len(sys.argv) > 3 else MODELS
        print("POINT " + json.dumps(measure_point(json.loads(sys.argv[2]), models)), flush=True)
        return 0
    p = common.parser(NAME, __doc__)
    p.add_argument("--calibrate", action="store_true", help="plan vs measurement (docs/gpu.md's calibration table)")
    p.add_argument("--lora", action="store_true", help="LoRA rank 16 against full fine-tuning")
    args = p.parse_args()
    common.setup()
    started = time.perf_counter()
    info = common.machine()
    mode = "calibration" if args.calibrate else "lora" if args.lora else ""
    rows, tables = {"calibration": calibrate, "lora": lora, "": scaling}[mode](args.quick)
    out = args.out
    if mode and out.name == f"{NAME}.json":  # the default path: keep the runs' results apart
        out = out.with_name(f"{NAME}_{mode}.json")
    common.write_result(out, NAME, quick=args.quick, settings={"mode": mode or "scaling", "vocab": VOCAB,
                        "sizes": SIZES, "layers": LAYERS}, results=rows, tables=tables, machine_info=info,
                        started=started)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
