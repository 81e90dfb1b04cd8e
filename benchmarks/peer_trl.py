"""omni-ray against TRL's online DPO trainer, side by side on the same machine in the same run.

    .venv/bin/pip install -e '.[bench]'                   # TRL, pinned (pyproject's `bench` extra)
    .venv/bin/python benchmarks/peer_trl.py --quick       # small budgets, both workloads (< 5 min + model build)
    .venv/bin/python benchmarks/peer_trl.py               # the full budgets

Both sides get the same model, task, training prompts (the same prompt list, from omni-ray's own prompt stream),
2 completions per prompt, loss (DPO, sigmoid, summed log-probs, beta 0.1), learning rate (constant, AdamW, no
weight decay, grad clip 1.0), batch size in pairs and one pass over the pairs, and the same scorer: omni-ray's
verifier (arith: `ArithVerifier`; progression: `benchmarks.progression.ProgressionVerifier`) is TRL's reward
function. TRL runs in this process (`trl.experimental.online_dpo.OnlineDPOTrainer`, HF `generate`, CPU:
bf16=False, use_cpu=True, gradient_checkpointing=False); omni-ray runs `omni_ray.driver.train` (Ray actors, vLLM
rollout, 2 DeepSpeed ranks) with R rounds over the same prompts.

Workloads:
- tiny: the demo's 2.4M-parameter arith model (models/tiny-arith), 6-token answers;
- gen: generation-heavy, a ~50M-parameter Llama (benchmarks/progression.py: hidden 512, 12 layers) with 64-token
  responses (continue an arithmetic progression), warm-started by a short SFT, built once into models/bench/.

Reported per side: completions per second (completions / training time: TRL's `train()` wall; omni-ray's rounds
without the per-round held-out eval and checkpoint, which TRL does not do; end-to-end numbers with start-up are
reported as well), pairs trained (omni-ray drops tied and identical pairs, TRL trains on every pair), and held-out
accuracy after the same number of completions, measured for both final models by the same code (in-process HF
greedy decoding, scored by the same verifier) next to the initial model's. The ratio omni-ray / TRL of completions
per second is the headline. A third row per workload is omni-ray at its own settings (configs/local_tiny.yaml:
Omni-DPO + PoP, 8 samples per prompt, 2 epochs; `pipeline.mode=async` when the driver has it) with the same number
of completions.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

NAME = "peer_trl"
TRL_VERSION = "1.16.0"  # pyproject's `bench` extra
VERIFIER = "benchmarks.progression:ProgressionVerifier"


@dataclass
class Workload:
    name: str
    prompts: int  # training prompts in total (each side draws 2 completions per prompt)
    rounds: int  # omni-ray rounds over those prompts
    batch: int  # pairs per optimizer step (TRL: prompts per step)
    lr: float
    beta: float
    max_new_tokens: int
    eval_prompts: int
    sft_steps: int = 0  # gen: warm-start steps of the ~50M model


def workloads(quick: bool) -> dict[str, Workload]:
    # tiny: DPO's learning rate on this model is 5e-6 (summed log-probs; examples/compare_methods.py, docs/methods.md
    # sec. 5). gen: the same rate and beta; the budgets are what 2 cores do in minutes, not tuned for accuracy.
    if quick:
        return {
            "tiny": Workload("tiny", prompts=256, rounds=2, batch=16, lr=5e-6, beta=0.1, max_new_tokens=6,
                             eval_prompts=500),
            # gen: one optimizer step's worth (8 prompts, 16 completions): TRL's HF generation of 64-token
            # completions on the 50M model is most of the quick mode's time, at ~2-4 s per completion on 2 cores.
            "gen": Workload("gen", prompts=8, rounds=1, batch=8, lr=5e-6, beta=0.1, max_new_tokens=64,
                            eval_prompts=10, sft_steps=60),
        }  # fmt: skip
    return {
        "tiny": Workload("tiny", prompts=2048, rounds=4, batch=32, lr=5e-6, beta=0.1, max_new_tokens=6,
                         eval_prompts=500),
        # gen: 128 completions, about 8 minutes of TRL's HF generation on 2 cores.
        "gen": Workload("gen", prompts=64, rounds=2, batch=16, lr=5e-6, beta=0.1, max_new_tokens=64,
                        eval_prompts=50, sft_steps=60),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# the task side of each workload: model, prompts, scorer, omni-ray overrides


class Task:
    """Model dir, the training prompts of each round and the eval prompts (texts), the verifier, config overrides."""

    def __init__(self, w: Workload, seed: int = 0) -> None:
        self.w = w
        per_round = w.prompts // w.rounds
        if w.name == "tiny":
            from omni_ray.data.arith import ArithTask
            from omni_ray.driver import ensure_model
            from omni_ray.scoring import ArithVerifier

            self.model = ensure_model(common.config(NAME, "make-tiny"))
            source = ArithTask(seed=seed, eval_size=w.eval_prompts)
            self.verifier: Any = ArithVerifier()
            self.overrides: list[str] = [f"data.eval_prompts={w.eval_prompts}"]
            self.build_info: dict[str, Any] = {"model": self.model}
        else:
            from benchmarks import progression
            from omni_ray.data.prompts import PromptDataset

            model = common.ROOT / "models" / "bench" / f"progression-50m-sft{w.sft_steps}"
            print(f"[bench] gen model {model} (built once; SFT {w.sft_steps} steps) ...", flush=True)
            self.build_info = {"model": str(model), **progression.build_model(model, sft_steps=w.sft_steps)}
            self.model = str(model)
            data = progression.write_prompt_dir(common.BENCH_RUNS / NAME / "progression", progression.ProgressionTask())
            source = PromptDataset(data, split="train", eval_split="eval", eval_prompts=w.eval_prompts, seed=seed)
            self.verifier = progression.ProgressionVerifier()
            self.overrides = [
                f"model.path={self.model}", "model.build_tiny_if_missing=false", "data.source=prompts",
                f"data.path={data}", "data.split=train", "data.eval_split=eval", "data.prompt_column=prompt",
                f"data.eval_prompts={w.eval_prompts}", "rollout.max_model_len=96",
                f"scoring.scorers=[{{type: python, target: '{VERIFIER}'}}]",
            ]  # fmt: skip
        # The driver's prompt stream: round r gets train_prompts(r, per_round); TRL trains on the same list.
        self.train_texts = [p.text for r in range(w.rounds) for p in source.train_prompts(r, per_round)]
        self.eval_texts = [p.text for p in source.eval_prompts()]

    def score(self, prompts: list[str], responses: list[str]) -> tuple[list[float], list[bool]]:
        res = self.verifier.score(prompts, responses)
        return res.scores.tolist(), res.correct.tolist()


def evaluate(model_dir: str, task: Task) -> dict[str, Any]:
    """Greedy held-out accuracy and mean score, in-process with the HF backend: the same code for every model."""
    from omni_ray.data import encode_prompt
    from omni_ray.rollout.worker import RolloutWorker

    t0 = time.perf_counter()
    worker = RolloutWorker(model_dir, backend="hf", max_model_len=96 if task.w.name == "gen" else 64)
    ids = [encode_prompt(worker.tokenizer, t) for t in task.eval_texts]
    comps = worker.generate(ids, n=1, temperature=0.0, max_new_tokens=task.w.max_new_tokens, seed=0)
    scores, correct = task.score(task.eval_texts, [c[0].text for c in comps])
    return {"accuracy": common.mean(map(float, correct)), "score": common.mean(scores),
            "prompts": len(ids), "eval_s": time.perf_counter() - t0}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# TRL


def run_trl(task: Task, out: Path) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    w = task.w
    if trl.__version__ != TRL_VERSION:
        print(f"[bench] warning: trl {trl.__version__} installed, the benchmark was written against {TRL_VERSION}")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(task.model)
    model = AutoModelForCausalLM.from_pretrained(task.model, dtype=torch.float32)
    # TRL tokenizes prompts without special tokens; omni-ray's prompts start with BOS (encode_prompt), and the models
    # were warm-started that way. The BOS text makes both sides condition on the same token ids.
    bos = tok.bos_token or ""
    dataset = Dataset.from_dict({"prompt": [bos + t for t in task.train_texts]})

    eos, pad = tok.eos_token_id, tok.pad_token_id
    lengths: list[int] = []  # generated tokens per completion (EOS included), as omni-ray counts them

    def verifier_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                        **_: Any) -> list[float]:  # fmt: skip
        for ids in completion_ids:
            lengths.append(ids.index(eos) + 1 if eos in ids else sum(1 for t in ids if t != pad))
        return task.score([p.removeprefix(bos) for p in prompts], completions)[0]

    steps = len(task.train_texts) // w.batch
    args = OnlineDPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=w.batch,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=w.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=w.beta,
        loss_type="sigmoid",
        max_new_tokens=w.max_new_tokens,
        max_length=w.max_new_tokens + 32,
        temperature=1.0,  # omni-ray's rollout.temperature; top_p 1 and top_k 0 (off) as omni-ray samples
        top_p=1.0,
        top_k=0,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps // 4),
        disable_tqdm=True,
        seed=0,
    )
    trainer = OnlineDPOTrainer(model=model, reward_funcs=verifier_reward, args=args, train_dataset=dataset,
                               processing_class=tok)  # fmt: skip
    setup_s = time.perf_counter() - t0
    # Where TRL's time goes: its sampling step (`_generate`: tokenize, HF generate, trim) is timed by wrapping the
    # bound method on this instance (trl 1.16's name for it; the version is pinned); the rest is scoring, the
    # policy and reference forward passes, backward and the optimizer.
    generate_s = [0.0]
    sample = trainer._generate

    def timed_generate(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return sample(*a, **k)
        finally:
            generate_s[0] += time.perf_counter() - t

    trainer._generate = timed_generate
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    final = out / "trl" / "final"
    trainer.save_model(str(final))
    tok.save_pretrained(str(final))
    completions = 2 * trainer.state.global_step * w.batch
    return {
        "side": "TRL online DPO",
        "completions": completions,
        "pairs_trained": trainer.state.global_step * w.batch,
        "optimizer_steps": trainer.state.global_step,
        "train_s": train_s,
        "end_to_end_s": setup_s + train_s,
        "completions_per_s": completions / train_s,
        "end_to_end_completions_per_s": completions / (setup_s + train_s),
        "mean_completion_tokens": common.mean(lengths),
        "generated_tokens_per_s": sum(lengths) / train_s,
        "generate_s": generate_s[0],
        "model_dir": str(final),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# omni-ray


def run_omni(task: Task, label: str, run_name: str, extra: list[str], samples: int) -> dict[str, Any]:
    w = task.w
    prompts = w.prompts * 2 // samples  # the same number of completions as the 2-sample runs
    overrides = [
        *task.overrides,
        f"run.rounds={w.rounds}",
        f"data.prompts_per_round={prompts // w.rounds}",
        f"rollout.samples_per_prompt={samples}",
        f"rollout.max_new_tokens={w.max_new_tokens}",
        "run.keep_checkpoints=1",
        *extra,
    ]
    cfg = common.config(NAME, run_name, overrides)
    run = common.train(cfg)
    rows = run["rounds"]
    work = sum(common.work_time(r) for r in rows)
    completions = sum(int(r.get("samples", 0)) for r in rows)
    tokens = sum(int(r.get("generated_tokens", 0)) for r in rows)
    return {
        "side": label,
        "completions": completions,
        "pairs_trained": sum(int(r.get("pairs_kept", 0)) for r in rows),
        "optimizer_steps": _steps(run["run_dir"]),
        "train_s": work,
        "end_to_end_s": run["wall_s"],
        "startup_s": run["summary"].get("startup_s"),
        "completions_per_s": completions / work,
        "end_to_end_completions_per_s": completions / run["wall_s"],
        "mean_completion_tokens": tokens / completions if completions else None,
        "generated_tokens_per_s": tokens / work,
        "generate_s": sum(r.get("time_generate", 0.0) for r in rows),
        "driver_eval_accuracy": rows[-1].get("eval_accuracy") if rows else None,
        "stage_time_s": run["summary"].get("stage_time_s"),
        "model_dir": str(Path(run["run_dir"]) / "checkpoints" / f"round_{w.rounds:04d}"),
        "overrides": overrides,
    }


def _steps(run_dir: str) -> int:
    from omni_ray.tracking import read_records

    return len(read_records(Path(run_dir) / "metrics.jsonl", "step"))


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    p = common.parser(NAME, __doc__)
    p.add_argument("--workloads", nargs="+", choices=["tiny", "gen"], default=["tiny", "gen"])
    p.add_argument("--no-best", action="store_true", help="skip the omni-ray-at-its-own-settings row")
    args = p.parse_args()
    common.setup()
    started = time.perf_counter()
    info = common.machine()
    if info.get("trl") is None:
        raise SystemExit("TRL is not installed: .venv/bin/pip install -e '.[bench]'")
    specs = workloads(args.quick)
    out_root = common.BENCH_RUNS / NAME
    results: dict[str, Any] = {}
    for name in args.workloads:
        w = specs[name]
        task = Task(w)
        res: dict[str, Any] = {"workload": asdict(w), "build": task.build_info}
        res["initial"] = evaluate(task.model, task)
        print(f"[bench] {name}: initial {res['initial']}", flush=True)
        # omni-ray first: its Ray cluster is shut down before TRL trains, so TRL has the machine to itself too.
        common_dpo = ["loss.name=dpo", f"loss.beta={w.beta}", f"learner.lr={w.lr}", "learner.epochs=1",
                      f"learner.batch_size={w.batch}", "learner.scheduler=constant", "learner.weight_decay=0.0",
                      "learner.grad_clip=1.0", "pipeline.mode=sync"]  # fmt: skip
        omni = run_omni(task, "omni-ray (same settings)", f"{name}_omni", common_dpo, samples=2)
        best = None
        # --quick skips it for gen: one more ~50M-model run would take the quick mode well past 5 minutes.
        if not args.no_best and not (args.quick and name == "gen"):
            best_extra = ["pipeline.mode=async"]
            label = "omni-ray (own settings: 8 samples, Omni-DPO+PoP, async)"
            best = run_omni(task, label, f"{name}_omni_best", best_extra, samples=8)
        common.shutdown_ray()
        trl_res = run_trl(task, out_root / name)
        for side in filter(None, (trl_res, omni, best)):
            side["eval"] = evaluate(side["model_dir"], task)
        res.update(trl=trl_res, omni=omni, best=best)
        res["ratio_completions_per_s"] = omni["completions_per_s"] / trl_res["completions_per_s"]
        res["ratio_end_to_end"] = omni["end_to_end_completions_per_s"] / trl_res["end_to_end_completions_per_s"]
        results[name] = res

    headers = ["workload", "side", "completions", "tokens/completion", "pairs trained", "steps", "train s",
               "completions/s", "tokens/s", "end-to-end s", "e2e completions/s", "held-out acc", "held-out score",
               "completions/s vs TRL"]  # fmt: skip
    rows = []
    for name, res in results.items():
        rows.append([name, "initial model", *["-"] * 9, res["initial"]["accuracy"], res["initial"]["score"], "-"])
        for side in filter(None, (res["trl"], res["omni"], res["best"])):
            ratio = side["completions_per_s"] / res["trl"]["completions_per_s"]
            rows.append([name, side["side"], side["completions"], side.get("mean_completion_tokens"),
                         side["pairs_trained"], side["optimizer_steps"], side["train_s"], side["completions_per_s"],
                         side.get("generated_tokens_per_s"), side["end_to_end_s"],
                         side["end_to_end_completions_per_s"], side["eval"]["accuracy"], side["eval"]["score"],
                         ratio])  # fmt: skip
    table = "### omni-ray vs TRL online DPO (2 completions per prompt)\n\n" + common.markdown_table(headers, rows, 3)
    split = [
        [
            name,
            side["side"],
            side["train_s"],
            side["generate_s"],
            side["train_s"] - side["generate_s"],
            side["generate_s"] / side["train_s"],
        ]
        for name, res in results.items()
        for side in filter(None, (res["trl"], res["omni"], res["best"]))
    ]
    split_table = "### where the training time goes\n\n" + common.markdown_table(
        ["workload", "side", "train s", "sampling s", "everything else s", "sampling share"], split, 3
    )  # fmt: skip
    settings = {"workloads": {k: asdict(v) for k, v in specs.items() if k in args.workloads},
                "trl_version": info.get("trl")}  # fmt: skip
    common.write_result(args.out, NAME, quick=args.quick, settings=settings, results=results,
                        tables=[table, split_table], machine_info=info, started=started)  # fmt: skip


if __name__ == "__main__":
    main()
