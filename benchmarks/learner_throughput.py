"""Learner pairs/s before and after the learner-scale change, on the generation-heavy workload's model.

    .venv/bin/python benchmarks/learner_throughput.py [--before REV] [--quick]

The model is benchmarks/peer_trl.py's `gen` shape (a ~50M-parameter Llama: hidden 512, 12 layers, 8 heads, MLP
2048, the tiny task's tokenizer), random weights, built offline under models/bench/. The pairs imitate that
workload's rounds: `a+b=` prompts and responses of 1-64 tokens (uniform), so lengths vary as sampled completions do.
One learner rank (float32, ZeRO-1, loss `omni_dpo`, `learner.batch_size` 32, one epoch, 128 pairs = 4 steps per
round) trains a warm-up round, then the timed rounds; pairs/s is pairs over the timed rounds' wall time.

"before" runs the learner of git revision `--before` (default f710b47, the last commit before micro-batching,
selective log-softmax and length-sorted micro-batches), checked out with `git worktree` under runs/bench/, through
its own API (`TrainPair`, tuple items); "after" runs this checkout's, at its default micro-batch (the whole share)
and at micro-batches of 8. Each side runs in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: `--side JSON`: one measurement in this process, of the omni_ray found in JSON's "code" dir (this checkout, or the
#: `before` worktree), which then comes first on sys.path; this checkout's benchmarks/common.py is not imported.
SIDE = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[1] == "--side" else None
sys.path.insert(0, SIDE["code"] if SIDE else str(Path(__file__).resolve().parents[1]))
if SIDE is None:
    from benchmarks import common

NAME = "learner_throughput"
MODEL = Path(SIDE["model"]) if SIDE else common.ROOT / "models" / "bench" / "learner-throughput-gen"


def build_model() -> Path:
    if (MODEL / "config.json").is_file():
        return MODEL
    from omni_ray.models.tiny import build_model as build_llama
    from omni_ray.models.tiny import build_tokenizer

    tok = build_tokenizer()
    model = build_llama(tok, hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=8, intermediate_size=2048,
                        max_position_embeddings=96, seed=0)  # fmt: skip
    model.save_pretrained(MODEL)
    tok.save_pretrained(MODEL)
    return MODEL


def pair_tokens(n: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int], float, float]]:
    """(prompt ids, chosen ids, rejected ids, score_chosen, score_rejected) of n pairs."""
    import numpy as np
    from transformers import AutoTokenizer

    from omni_ray.data import encode_prompt

    tok = AutoTokenizer.from_pretrained(MODEL)
    rng = np.random.default_rng(seed)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]

    def response() -> list[int]:
        return [int(rng.choice(digits)) for _ in range(int(rng.integers(1, 64)))] + [tok.eos_token_id]

    out = []
    for _ in range(n):
        a, b = rng.integers(0, 100, 2)
        s = float(rng.uniform(0, 10))
        out.append((encode_prompt(tok, f"{a}+{b}="), response(), response(), s, float(rng.uniform(0, s))))
    return out


def _measure(side: str, rounds: int, overrides: list[str]) -> dict[str, Any]:
    """In this process: train a warm-up round and `rounds` timed rounds of 128 pairs; the code is whatever
    `omni_ray` imports here (this checkout, or the `before` worktree first on sys.path)."""
    import numpy as np

    from omni_ray.config import load_config
    from omni_ray.learner import worker as w

    raw = pair_tokens(128)
    cfg = load_config(None, ["learner.num_workers=1", "learner.batch_size=32", "learner.epochs=1",
                             "loss.name=omni_dpo", "learner.zero_stage=1", *overrides])  # fmt: skip
    learner = w.LearnerWorker(cfg, str(MODEL))
    if side == "before":
        learner.init_process_group(*learner.node_address())
        pairs = [w.TrainPair(p, c, r, sc, sr) for p, c, r, sc, sr in raw]
        data = w.RoundData(pairs, [(i, -1, float("nan")) for i in range(len(pairs))])
    else:
        from omni_ray.pairs import Pair
        from omni_ray.pop import PopItems

        learner.init_process_group(*learner.rendezvous())
        pairs = [Pair(f"p{i}", "", p, "", "", c, r, sc, sr) for i, (p, c, r, sc, sr) in enumerate(raw)]
        data = w.RoundData(pairs, PopItems.every_pair(len(pairs)))
    learner.train_round(data)  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        learner.train_round(data)
    seconds = time.perf_counter() - t0
    tokens = float(np.mean([len(p) + len(c) + len(r) for p, c, r, _, _ in raw]))
    return {"side": side, "overrides": overrides, "rounds": rounds, "seconds": seconds,
            "pairs_per_s": rounds * len(raw) / seconds, "mean_tokens_per_pair": tokens}  # fmt: skip


def _worktree(rev: str) -> Path:
    path = common.BENCH_RUNS / NAME / f"rev-{rev}"
    if not (path / "omni_ray").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=common.ROOT, check=True)
    return path


def run_side(side: str, rounds: int, overrides: list[str], code: Path) -> dict[str, Any]:
    args = json.dumps({"side": side, "rounds": rounds, "overrides": overrides, "code": str(code), "model": str(MODEL),
                       "env": common.ENV_DEFAULTS})  # fmt: skip
    proc = subprocess.run([sys.executable, __file__, "--side", args], capture_output=True, text=True,
                          cwd=common.ROOT, timeout=3600)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SIDE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("SIDE "))


def main() -> int:
    if SIDE:
        import os

        for k, v in SIDE["env"].items():
            os.environ.setdefault(k, v)
        import omni_ray

        assert Path(omni_ray.__file__).resolve().is_relative_to(Path(SIDE["code"]).resolve()), omni_ray.__file__
        print("SIDE " + json.dumps(_measure(SIDE["side"], SIDE["rounds"], SIDE["overrides"])), flush=True)
        return 0
    p = common.parser(NAME, __doc__)
    p.add_argument("--before", default="f710b47", help="git revision of the 'before' learner")
    args = p.parse_args()
    common.setup()
    started = time.perf_counter()
    info = common.machine()
    build_model()
    rounds = 1 if args.quick else 3
    before = _worktree(args.before)
    rows = [run_side("before", rounds, [], before),
            run_side("after", rounds, [], common.ROOT),
            run_side("after", rounds, ["learner.micro_batch_size=8"], common.ROOT)]  # fmt: skip
    for r in rows:
        print(
            f"[bench] {r['side']} {' '.join(r['overrides']) or '(defaults)'}: {r['pairs_per_s']:.2f} pairs/s",
            flush=True,
        )
    ref = rows[0]["pairs_per_s"]
    table = common.markdown_table(
        ["learner", "settings", "pairs/s", "vs before", "timed rounds s"],
        [(f"{r['side']}" + (f" ({args.before})" if r["side"] == "before" else ""),
          " ".join(r["overrides"]) or "defaults (micro-batch = the whole share)", r["pairs_per_s"],
          r["pairs_per_s"] / ref, r["seconds"]) for r in rows],
    )  # fmt: skip
    common.write_result(args.out, NAME, quick=args.quick, settings={"before": args.before, "rounds": rounds},
                        results=rows, tables=["### learner pairs/s, gen workload's model\n\n" + table],
                        machine_info=info, started=started)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
