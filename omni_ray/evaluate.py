"""`omni-ray eval`: a checkpoint's task accuracy and the PoP paper's preference metrics (docs/methods.md sec. 3).

Plain functions, no Ray: the CLI is a thin wrapper, tests and notebooks call them directly.

What is evaluated:

- **the held-out evaluation the driver runs every round** (`held_out_eval`): greedy responses to the run's fixed
  held-out prompts (the arith task's or its prompt dataset's), generated in-process by a `RolloutWorker` (HF backend
  by default: on a tiny model it starts in a second, vLLM takes much longer), scored by the run's own scorers, and
  reported by `eval_metrics` (accuracy where the scorers say what is correct, the mean reward) as in the round table;
- **preference metrics** on a set of pairs (any source `load_preference_pairs` reads: a run's
  `rounds/round_NNNN/pairs.jsonl`, UltraFeedback-style jsonl / parquet / dataset dirs): the implicit margin
  M = [L(y_w) - L_ref(y_w)] - [L(y_l) - L_ref(y_l)] per pair, pair accuracy = fraction with M > 0 (M == 0 counts as
  wrong), and the Pearson / Spearman correlation of M with the score gap S_w - S_l.

The reference model of M:

- `reference=None` (the default) picks the run's initial model (`model.path` of the run's `config.yaml`) when the
  target belongs to a run; for a bare checkpoint dir there is no reference and M reduces to the policy's log-prob
  difference L(y_w) - L(y_l) (the reference terms are taken as 0, not as the checkpoint itself, which would make M
  identically 0). The same happens when the reference resolves to the policy's own dir (a run without checkpoints).
- `reference="none"` forces the policy-only margin; any other string is a model dir.

Log-probs are summed over response tokens by default (the PoP paper's convention); `logprobs="mean"` uses the
length-normalised l(y) = L(y)/|y| (the convention of the Omni-DPO losses). Undefined numbers (a correlation of a
constant, fewer than 2 pairs) are reported as null in the JSON.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omni_ray.pairs import Pair
from omni_ray.tracking import json_safe

__all__ = [
    "EvalTarget",
    "evaluate",
    "implicit_margins",
    "margin_metrics",
    "newest_checkpoint",
    "preference_eval",
    "resolve_target",
    "task_accuracy",
]

_ROUND_DIR = re.compile(r"^round_(\d+)$")
NO_REFERENCE = "none"


@dataclass
class EvalTarget:
    """What `omni-ray eval` resolved its argument to, plus the run's eval settings (defaults without a run)."""

    policy_path: str
    run_dir: str | None = None
    checkpoint_round: int | None = None
    initial_model_path: str | None = None
    seed: int = 0
    max_operand: int = 99
    eval_prompts: int = 500
    max_new_tokens: int = 8


def _is_model_dir(p: Path) -> bool:
    """An HF model dir, or a LoRA adapter in peft's format (HF and peft load it onto its base model)."""
    return (p / "config.json").is_file() or (p / "adapter_config.json").is_file()


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-numbered `checkpoints/round_NNNN/` that is a complete HF dir (has config.json), or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ROUND_DIR.match(p.name)) and _is_model_dir(p)]
    return max(found)[1] if found else None


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return cfg if isinstance(cfg, dict) else {}


def _get(cfg: dict[str, Any], dotted: str, default: Any) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _find_model_path(raw: str, run_dir: Path) -> str | None:
    """A run's `model.path` (often relative to the dir `omni-ray train` ran in): as given, else from the run's
    grandparent (runs/<name>/ -> the project root)."""
    p = Path(raw)
    for cand in [p] if p.is_absolute() else [p, run_dir.parent.parent / p, run_dir.parent / p]:
        if _is_model_dir(cand):
            return str(cand.resolve())
    return None


def resolve_target(target: str | Path) -> EvalTarget:
    """A checkpoint dir (HF layout) or a run dir -> the policy to evaluate and the run's eval settings.

    Run dir: its newest `checkpoints/round_NNNN`, else the model at its config's `model.path`. A checkpoint inside
    `RUN/checkpoints/` also picks up RUN's settings (seed, eval prompts, initial model as default reference).
    """
    path = Path(target).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (expected a checkpoint dir or a run dir)")
    run_dir: Path | None = None
    ckpt_round: int | None = None
    if _is_model_dir(path):
        policy = path
        if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
            run_dir = path.parent.parent
        if m := _ROUND_DIR.match(path.name):
            ckpt_round = int(m.group(1))
    elif (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        run_dir = path
        policy = newest_checkpoint(path)  # type: ignore[assignment]
        if policy is not None:
            ckpt_round = int(_ROUND_DIR.match(policy.name).group(1))  # type: ignore[union-attr]
    else:
        raise FileNotFoundError(
            f"{path}: neither a checkpoint dir (no config.json) nor a run dir (no config.yaml / checkpoints/)"
        )
    cfg = _run_config(run_dir) if run_dir is not None else {}
    initial = None
    if run_dir is not None and _get(cfg, "model.path", None):
        initial = _find_model_path(str(_get(cfg, "model.path", "")), run_dir)
    if policy is None:
        if initial is None:
            raise FileNotFoundError(
                f"{path}: run dir without checkpoints/round_NNNN and its config.yaml model.path "
                f"({_get(cfg, 'model.path', 'unset')!r}) is not a model dir"
            )
        policy = Path(initial)
    return EvalTarget(
        policy_path=str(Path(policy).resolve()),
        run_dir=str(run_dir.resolve()) if run_dir is not None else None,
        checkpoint_round=ckpt_round,
        initial_model_path=initial,
        seed=int(_get(cfg, "run.seed", 0)),
        max_operand=int(_get(cfg, "data.max_operand", 99)),
        eval_prompts=int(_get(cfg, "data.eval_prompts", 500)),
        max_new_tokens=int(_get(cfg, "rollout.max_new_tokens", 8)),
    )


def _max_model_len(model_path: str) -> int:
    path = Path(model_path)
    if not (path / "config.json").is_file():  # an adapter: its base model's context
        path = Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    cfg = json.loads((path / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 2048)


# ---------------------------------------------------------------------------------------------------------------------
# task accuracy

NO_CORRECTNESS = "the scorers say nothing about correctness (a verifier, returned correct flags, or correct_at)"


def eval_metrics(result: Any) -> dict[str, Any]:
    """What a held-out evaluation reports from the scorers' result on greedy responses (the driver's per-round eval
    and `omni-ray eval` alike): `accuracy` when the scorers say which answers are correct (else None, with the
    reason), the mean raw reward over finite scores, and the prompt count."""
    raw = np.asarray(result.raw_scores if result.raw_scores is not None else result.scores, dtype=np.float64)
    finite = raw[np.isfinite(raw)]
    out: dict[str, Any] = {
        "accuracy": float(np.mean(result.correct)) if result.correct is not None else None,
        "reward_mean": float(finite.mean()) if finite.size else None,
        "prompts": int(raw.size),
    }
    if result.correct is None:
        out["accuracy_reason"] = NO_CORRECTNESS
    return out


def held_out_eval(
    model_path: str,
    cfg: Any,
    *,
    prompts: int | None = None,
    backend: str = "hf",
    max_model_len: int | None = None,
    details: bool = False,
) -> dict[str, Any]:
    """The driver's per-round evaluation, in-process: greedy responses of `model_path` to the run's held-out prompts
    (the first `prompts`, default all), scored by the run's own scorers (`cfg.scoring`, with each row's reference and
    columns), reported by `eval_metrics`. `details` adds `outputs`: per prompt its text, the greedy response, the
    score and, where the scorers say, whether it is correct."""
    from transformers import AutoTokenizer

    from omni_ray.data.rounds import RoundPrompts
    from omni_ray.rollout.worker import RolloutWorker
    from omni_ray.scoring import ScoringService

    t0 = time.perf_counter()
    if prompts is not None and prompts < 1:
        raise ValueError(f"prompts must be >= 1, got {prompts}")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    round_prompts = RoundPrompts(cfg, tokenizer)
    eval_set = round_prompts.eval()[:prompts]
    worker = RolloutWorker(model_path, backend=backend, seed=cfg.run.seed,
                           max_model_len=max_model_len or _max_model_len(model_path),
                           trust_remote_code=cfg.model.trust_remote_code)  # fmt: skip
    try:
        comps = worker.generate([list(p.token_ids) for p in eval_set], n=1, temperature=0.0,
                                max_new_tokens=cfg.rollout.max_new_tokens, seed=0)  # fmt: skip
    finally:
        worker.close()
    texts = [c[0].text for c in comps]
    scorer = ScoringService.from_config(cfg.scoring, trust_remote_code=cfg.model.trust_remote_code)
    res = scorer.score([p.text for p in eval_set], texts, **round_prompts.scoring_inputs(eval_set))
    out: dict[str, Any] = {
        **eval_metrics(res),
        "backend": worker.backend_name,
        "seed": cfg.run.seed,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "time_s": round(time.perf_counter() - t0, 3),
    }
    if details:
        flags = [None] * len(texts) if res.correct is None else [bool(x) for x in res.correct]
        out["outputs"] = [{"prompt": p.text, "response": t, "score": float(s), "correct": ok}
                          for p, t, s, ok in zip(eval_set, texts, res.raw_scores, flags)]  # fmt: skip
    return out


def task_accuracy(
    model_path: str,
    *,
    prompts: int | None = None,
    seed: int = 0,
    max_operand: int = 99,
    eval_size: int = 500,
    max_new_tokens: int = 8,
    backend: str = "hf",
    max_model_len: int | None = None,
    details: bool = False,
) -> dict[str, Any]:
    """`held_out_eval` on the built-in arith task's held-out prompts of the seed (greedy exact match)."""
    from omni_ray.config import load_config

    cfg = load_config(None, [f"run.seed={seed}", f"data.max_operand={max_operand}", f"data.eval_prompts={eval_size}",
                             f"rollout.max_new_tokens={max_new_tokens}"])  # fmt: skip
    return held_out_eval(model_path, cfg, prompts=prompts, backend=backend, max_model_len=max_model_len,
                         details=details)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# preference metrics


def _load_causal_lm(path: str, trust_remote_code: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model


def _logps(model: Any, pairs: Sequence[Pair], pad_id: int, batch_size: int, mean: bool) -> tuple[Any, Any]:
    """(chosen, rejected) log-probs per pair, summed or length-normalised, as float64 numpy arrays."""
    import torch

    from omni_ray.models.logprobs import sequence_logprobs

    out_c, out_r = [], []
    with torch.inference_mode():
        for i in range(0, len(pairs), batch_size):
            batch = pairs[i : i + batch_size]
            prompts = [p.prompt_token_ids for p in batch] * 2
            responses = [p.chosen_token_ids for p in batch] + [p.rejected_token_ids for p in batch]
            summed, lengths = sequence_logprobs(model, prompts, responses, pad_id)
            vals = (summed / lengths if mean else summed).double().numpy()
            out_c.append(vals[: len(batch)])
            out_r.append(vals[len(batch) :])
    return np.concatenate(out_c), np.concatenate(out_r)


def implicit_margins(
    pairs: Sequence[Pair],
    policy_path: str,
    reference_path: str | None = None,
    *,
    pad_id: int,
    logprobs: str = "sum",
    batch_size: int = 32,
    trust_remote_code: bool = False,
) -> np.ndarray:
    """M per pair: [L(y_w) - L_ref(y_w)] - [L(y_l) - L_ref(y_l)]; without a reference, L(y_w) - L(y_l)."""
    if logprobs not in ("sum", "mean"):
        raise ValueError(f"logprobs must be 'sum' or 'mean', got {logprobs!r}")
    if not pairs:
        return np.zeros(0)
    mean = logprobs == "mean"
    pc, pr = _logps(_load_causal_lm(policy_path, trust_remote_code), pairs, pad_id, batch_size, mean)
    if reference_path is None:
        return pc - pr
    rc, rr = _logps(_load_causal_lm(reference_path, trust_remote_code), pairs, pad_id, batch_size, mean)
    return (pc - rc) - (pr - rr)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def margin_metrics(margins: Sequence[float], gaps: Sequence[float]) -> dict[str, Any]:
    """Pair accuracy (M > 0), Pearson and Spearman of M with the score gap; None where undefined."""
    from scipy import stats

    m = np.asarray(margins, dtype=np.float64)
    g = np.asarray(gaps, dtype=np.float64)
    if m.shape != g.shape:
        raise ValueError(f"{m.size} margins but {g.size} gaps")
    out: dict[str, Any] = {
        "pairs": int(m.size),
        "pair_accuracy": float(np.mean(m > 0)) if m.size else None,
        "ties": int(np.sum(m == 0)),
        "margin_mean": float(m.mean()) if m.size else None,
        "margin_std": float(m.std()) if m.size else None,
        "gap_mean": float(g.mean()) if g.size else None,
        "pearson": None,
        "spearman": None,
    }
    if m.size >= 2 and np.ptp(m) > 0 and np.ptp(g) > 0:
        out["pearson"] = _finite_or_none(stats.pearsonr(m, g).statistic)
        out["spearman"] = _finite_or_none(stats.spearmanr(m, g).statistic)
    return out


def _tokenizer_dir(policy_path: str, fallback: str | None) -> str:
    for d in (policy_path, fallback):
        if d and any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return d
    raise FileNotFoundError(f"{policy_path}: no tokenizer (tokenizer.json / tokenizer_config.json)")


def preference_eval(
    source: str,
    policy_path: str,
    *,
    reference_path: str | None = None,
    tokenizer_path: str | None = None,
    split: str = "train",
    subset: str = "",
    max_prompt_tokens: int | None = None,
    max_response_tokens: int | None = None,
    logprobs: str = "sum",
    batch_size: int = 32,
    limit: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load pairs from `source`, tokenize (budgets default to half the model's context each; overlong pairs are
    truncated), compute implicit margins and `margin_metrics`. Load / tokenize counts ride along."""
    from transformers import AutoTokenizer

    from omni_ray.data.preferences import load_preference_pairs, to_train_pairs

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer_path or _tokenizer_dir(policy_path, None),
                                        trust_remote_code=trust_remote_code)  # fmt: skip
    ctx = _max_model_len(policy_path)
    max_prompt_tokens = max_prompt_tokens or ctx // 2
    max_response_tokens = max_response_tokens or ctx - max_prompt_tokens
    records, load_stats = load_preference_pairs(source, split=split, subset=subset, limit=limit)
    pairs, tok_stats = to_train_pairs(
        records, tok, max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens
    )
    if not pairs:
        raise ValueError(f"{source}: no pairs left after tokenization ({tok_stats})")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    margins = implicit_margins(pairs, policy_path, reference_path, pad_id=int(pad_id), logprobs=logprobs,
                               batch_size=batch_size, trust_remote_code=trust_remote_code)  # fmt: skip
    out = margin_metrics(margins, [p.gap for p in pairs])
    out.update(
        source=str(source),
        reference=reference_path,
        logprobs=logprobs,
        load_stats=load_stats,
        tokenize_stats=tok_stats,
        time_s=round(time.perf_counter() - t0, 3),
    )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the whole `omni-ray eval`


def _eval_config(t: EvalTarget) -> Any:
    """The run's own config (its prompts and scorers: the eval the driver ran), or the built-in task's for a bare
    checkpoint; the target's seed either way."""
    from omni_ray.config import from_yaml_text, load_config

    saved = Path(t.run_dir) / "config.yaml" if t.run_dir else None
    cfg = from_yaml_text(saved.read_text()) if saved is not None and saved.is_file() else load_config()
    cfg.run.seed = t.seed
    return cfg


def _same_dir(a: str, b: str) -> bool:
    try:
        return Path(a).resolve().samefile(Path(b).resolve())
    except OSError:
        return False


def _reference_for(target: EvalTarget, reference: str | None) -> str | None:
    if reference is not None and reference.lower() == NO_REFERENCE:
        return None
    ref = reference if reference is not None else target.initial_model_path
    if ref is None:
        return None
    if not _is_model_dir(Path(ref)):
        raise FileNotFoundError(f"reference {ref}: not a model dir (no config.json)")
    return None if _same_dir(ref, target.policy_path) else str(Path(ref).resolve())


def evaluate(
    target: str | Path,
    *,
    prompts: int | None = None,
    preferences: str | None = None,
    reference: str | None = None,
    backend: str = "hf",
    logprobs: str = "sum",
    split: str = "train",
    subset: str = "",
    seed: int | None = None,
    max_prompt_tokens: int | None = None,
    max_response_tokens: int | None = None,
    batch_size: int = 32,
    task: bool = True,
    details: bool = False,
) -> dict[str, Any]:
    """`omni-ray eval`: resolve the target, then task accuracy (unless `task=False`) and, with `preferences`,
    the preference metrics. Returns a JSON-serialisable dict (NaN -> None)."""
    t = resolve_target(target)
    if seed is not None:
        t.seed = seed
    result: dict[str, Any] = {"target": str(target), **asdict(t)}
    cfg = _eval_config(t)
    if task:
        result["task"] = held_out_eval(t.policy_path, cfg, prompts=prompts, backend=backend, details=details)
    if preferences is not None:
        ref = _reference_for(t, reference)
        result["preferences"] = preference_eval(
            preferences,
            t.policy_path,
            reference_path=ref,
            tokenizer_path=_tokenizer_dir(t.policy_path, t.initial_model_path),
            split=split,
            subset=subset,
            max_prompt_tokens=max_prompt_tokens,
            max_response_tokens=max_response_tokens,
            logprobs=logprobs,
            batch_size=batch_size,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    return json_safe(result)
