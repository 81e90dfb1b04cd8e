"""Run learner cases on real DeepSpeed ranks over gloo, without Ray:
`python tests/learner_ranks.py CASES.json MODEL_DIR OUT`.

Each case builds a fresh LearnerWorker (policy, reference, EMA, engines) from the initial model, trains rounds of a
fixed batch of pairs and saves rank 0's result (`OUT/<name>`: the weights after training (LoRA merged in), the
rounds' step metrics and per-pair stats, the reference log-probs, and with LoRA the adapter's tensors). The cases
of one world size run one after another in the same rank processes, which join one process group once (the
start-up dominates a tiny model's step). A case is `{"name", "world", "overrides", "rounds", "pairs", "save",
"resume"}` (`save`: also write the policy with `save_pretrained`; `resume`: save the learner state before the last
round, then load it into a fresh worker of the initial model and train the last round again, as `result["resumed"]`);
every transformers loader call of a case is recorded with its trust_remote_code.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from typing import Any

import numpy as np


def round_data(model_dir: str, n: int = 8, round_index: int = 0) -> Any:
    """n pairs of varied prompt / response lengths and graded scores; PoP items with computed partners (ema / fixed
    targets), and every fourth pair uncompared (weak -1, margin floor 0)."""
    from transformers import AutoTokenizer

    from omni_ray.data import encode_prompt
    from omni_ray.learner.worker import RoundData
    from omni_ray.pairs import Pair
    from omni_ray.pop import PopItems

    tok = AutoTokenizer.from_pretrained(model_dir)

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]

    pairs = [
        Pair(f"p{a}", f"{a}+{7 * a}=", encode_prompt(tok, f"{a}+{7 * a}="), "", "", ids(str(8 * a) + "1" * (a % 3)),
             ids(str(8 * a + 5)), 10.0, 10.0 - 0.7 * a)
        for a in range(n)
    ]  # fmt: skip
    weak = np.array([(i + 3) % n if i % 4 else -1 for i in range(n)], dtype=np.int64)
    items = PopItems(np.arange(n, dtype=np.int64), weak, np.where(weak < 0, 0.0, np.nan))
    return RoundData(pairs, items, round_index)


def _record_loaders(calls: list) -> None:
    """Every transformers `from_pretrained` of a model, tokenizer or config records its trust_remote_code."""
    import transformers

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code")))
            return _original(*args, **kwargs)

        cls.from_pretrained = spy


def _resume(cfg: Any, model_dir: str, rank: int, world: int, address: Any, path: str, data: Any) -> dict:
    """A fresh worker (the initial model) loads the saved learner state and trains the last round again."""
    from omni_ray.learner.worker import LearnerWorker

    worker = LearnerWorker(cfg, model_dir, rank, world)
    worker.init_process_group(*address)
    fresh = worker.export_state_dict()
    step = worker.load_state(path)
    loaded = worker.export_state_dict()
    again = worker.train_round(data)
    exported = worker.export_weight_buckets(1 << 30, bytes)
    return {"loaded_step": step, "fresh": fresh, "loaded": loaded, "round": again, "state": worker.export_state_dict(),
            "exported_bytes": None if exported is None else sum(map(len, exported[0]))}  # fmt: skip


def _rank(rank: int, world: int, cases: list[dict], model_dir: str, out: str, addresses: Any) -> None:
    import torch

    from omni_ray.config import load_config
    from omni_ray.learner.worker import LearnerWorker

    loaders: list = []
    _record_loaders(loaders)
    address = None
    for case in cases:
        loaders.clear()
        cfg = load_config(None, [f"learner.num_workers={world}", *case["overrides"]])
        worker = LearnerWorker(cfg, model_dir, rank, world)
        if address is None and rank == 0:
            address = worker.rendezvous()
            for _ in range(world - 1):
                addresses.put(address)
        elif address is None:
            address = addresses.get(timeout=300)
        worker.init_process_group(*address)
        mark = len(loaders)
        rounds = [round_data(model_dir, case.get("pairs", 8), round_index=r) for r in range(case.get("rounds", 1))]
        del loaders[mark:]  # the test's own tokenizer loads: only the learner's are checked
        reference = worker.reference_logprobs(rounds[0].pairs)
        saved_state = os.path.join(out, case["name"] + "-state") if case.get("resume") else None
        results, resumed, checksums = [], None, None
        for r, data in enumerate(rounds):
            if saved_state and r == len(rounds) - 1:  # the learner state saved before the last round
                worker.save_state(saved_state)
            results.append(worker.train_round(data))
        state = worker.export_state_dict()
        adapter = dict(worker.full_tensors(adapter_only=True)) if worker.lora else None
        if saved_state:
            checksums = [None] * world  # every rank's own weights: replicated ranks must agree
            torch.distributed.all_gather_object(checksums, worker.parameter_checksum())
            resumed = _resume(cfg, model_dir, rank, world, address, saved_state, rounds[-1])
        if case.get("save"):
            worker.save_pretrained(os.path.join(out, case["name"] + "-checkpoint"))
        if rank == 0:
            result = {"state": state, "rounds": results, "reference": reference.cpu(), "adapter": adapter,
                      "loaders": list(loaders), "checksums": checksums, "resumed": resumed}  # fmt: skip
            torch.save(result, os.path.join(out, case["name"]))


def main(cases_file: str, model_dir: str, out: str) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Imported once here and inherited by every forked rank, which would otherwise spend most of its time importing.
    # transformers' Auto classes are lazy modules, loaded on first use; DeepSpeed's ZeRO optimizer check imports its
    # Muon optimizer (module-level torch.compile) at the first `deepspeed.initialize`.
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import omni_ray.learner.worker  # noqa: F401

    ctx = mp.get_context("fork")
    cases = json.loads(open(cases_file).read())
    failed = []
    for world in sorted({c["world"] for c in cases}):
        mine = [c for c in cases if c["world"] == world]
        addresses = ctx.Queue()
        ranks = [ctx.Process(target=_rank, args=(r, world, mine, model_dir, out, addresses)) for r in range(world)]
        for p in ranks:
            p.start()
        for p in ranks:
            p.join(timeout=1500)
        if any(p.exitcode != 0 for p in ranks):
            failed += [c["name"] for c in mine if not os.path.exists(os.path.join(out, c["name"]))]
    print(json.dumps({"failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
