"""An HF sequence-classification reward model as a scorer (type ``reward_model``), one logit per response.

torch and transformers are imported when a reward model is built, so importing the scoring package stays light.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from omni_ray.scoring.base import Scorer, ScoreResult, check_inputs, check_range, register_scorer

__all__ = ["RewardModelScorer"]

log = logging.getLogger(__name__)

# Files whose presence means a directory holds a tokenizer (fast JSON, sentencepiece, BPE/WordPiece vocabularies).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
_DEFAULT_BATCH_SIZE = 32


class RewardModelScorer(Scorer):
    """An HF sequence-classification reward model (``num_labels=1``) scoring the text ``prompt + response``.

    Everything that would make the scores silently meaningless is refused at construction with a ValueError naming
    the directory: no tokenizer in it, a checkpoint that is not a 1-label sequence classifier (loading a causal LM
    through AutoModelForSequenceClassification would give a randomly initialised head), a tokenizer whose ids do not
    fit the model's embedding table, no pad token and no EOS to stand in for it.

    Padding: sequences are right-padded (whatever the saved tokenizer says) and ``config.pad_token_id`` is set to the
    tokenizer's pad id, so a Llama-style model that pools the last non-pad token reads the last real token. Right
    padding also keeps real tokens at positions 0.. as when a sequence is scored alone, which matters for models with
    absolute position embeddings (left padding without ``position_ids`` shifts them; RoPE models are shift-invariant).
    Batches are formed from length-sorted inputs to waste less compute on padding.

    ``scale`` is the declared range of the model's logit (a statement by the user; reward models are unbounded, use
    ``scoring.rescale=per_round`` when the range is unknown). ``max_length`` (optional) truncates from the left so
    the final token, which the model pools, is kept. A sequence with no tokens at all scores NaN.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        device: str = "cpu",
        trust_remote_code: bool = False,
        scale: tuple[float, float] = (0.0, 10.0),
        dtype: str = "float32",
        max_length: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        self.name = f"reward_model:{self.path.name}"
        self.scale = check_range(f"reward model {self.path} scale", scale)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be > 0 or None, got {max_length}")
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.device = torch.device(device)
        where = f"reward model dir {str(self.path)!r}"

        if not self.path.is_dir():
            raise ValueError(f"{where} does not exist or is not a directory")
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{where} has no config.json (expected an HF save_pretrained layout)")
        if not any((self.path / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(
                f"{where} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the reward model's tokenizer "
                "next to it with tokenizer.save_pretrained(dir)"
            )

        config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code, local_files_only=True)
        archs = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(
                f"{where} is not a sequence-classification model (architectures={archs}); a reward model scorer "
                "needs an *ForSequenceClassification checkpoint with num_labels=1"
            )
        if int(getattr(config, "num_labels", 0)) != 1:
            raise ValueError(f"{where} has num_labels={config.num_labels}; a reward model must output a single logit")

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                self.path, trust_remote_code=trust_remote_code, local_files_only=True
            )
        except Exception as e:  # tokenizer loaders raise OSError, ValueError, TypeError, ... depending on the backend
            raise ValueError(f"{where}: could not load its tokenizer: {type(e).__name__}: {e}") from e
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"{where}: the tokenizer has neither a pad token nor an EOS token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
            log.info("%s: tokenizer has no pad token; padding with EOS (id %d)", where, tokenizer.pad_token_id)
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"

        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_vocab = int(getattr(text_config, "vocab_size", 0) or 0)
        tok_vocab = len(tokenizer)
        if model_vocab <= 0:
            raise ValueError(f"{where}: config has no vocab_size; cannot check that the tokenizer matches the model")
        if tok_vocab > model_vocab:
            raise ValueError(
                f"{where}: tokenizer/model mismatch: the tokenizer has {tok_vocab} tokens but the model's embedding "
                f"table has vocab_size={model_vocab}; token ids >= {model_vocab} would index out of range"
            )
        if model_vocab - tok_vocab > 4096:
            log.warning(
                "%s: model vocab_size=%d is much larger than the tokenizer's %d tokens; is it the right tokenizer?",
                where,
                model_vocab,
                tok_vocab,
            )

        torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}")
        model, info = AutoModelForSequenceClassification.from_pretrained(
            self.path,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            dtype=torch_dtype,
            output_loading_info=True,
        )
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(
                f"{where}: weights missing from the checkpoint would be randomly initialised ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); it is not a trained reward model of this architecture"
            )
        # Pooling reads config.pad_token_id to find each row's last real token: it must be the id we pad with.
        model.config.pad_token_id = tokenizer.pad_token_id
        if text_config is not config and hasattr(model.config, "get_text_config"):
            model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        model.to(self.device)
        model.eval()
        self.tokenizer = tokenizer
        self.model = model

    def _encode(self, texts: list[str]) -> list[list[int]]:
        kwargs: dict[str, Any] = {"add_special_tokens": True}
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return [list(ids) for ids in self.tokenizer(texts, **kwargs)["input_ids"]]

    def score(self, prompts: list[str], responses: list[str]) -> ScoreResult:
        """One logit per ``prompt + response``, in the input order (computed in length-sorted batches)."""
        import torch

        check_inputs(prompts, responses)
        n = len(responses)
        scores = np.full(n, np.nan, dtype=np.float64)
        if n == 0:
            return ScoreResult(scores=scores, scale=self.scale)
        ids = self._encode([p + r for p, r in zip(prompts, responses, strict=True)])
        order = [i for i in sorted(range(n), key=lambda i: len(ids[i])) if ids[i]]  # empty sequences stay NaN
        pad = int(self.tokenizer.pad_token_id)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                    attention[row, : len(ids[i])] = 1
                out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device))
                logits = out.logits.float().reshape(len(batch), -1)[:, 0].cpu().numpy()
                scores[batch] = logits
        return ScoreResult(scores=scores, scale=self.scale)


@register_scorer("reward_model")
def _reward_model(
    spec: Any, *, scale: tuple[float, float], device: str, trust_remote_code: bool, where: str
) -> RewardModelScorer:
    if not spec.path:
        raise ValueError(f"{where}.path: a reward_model scorer needs a model dir")
    return RewardModelScorer(
        spec.path,
        batch_size=spec.batch_size or _DEFAULT_BATCH_SIZE,
        device=device,
        trust_remote_code=trust_remote_code,
        scale=scale,
    )
