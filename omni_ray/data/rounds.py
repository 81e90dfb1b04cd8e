"""The round's prompts as the policy reads them: the built-in arith task or a prompt dataset, each prompt encoded
once (BOS + text, `data.max_prompt_tokens` enforced) and carrying its token ids from here to the learner."""

from __future__ import annotations

import dataclasses
from typing import Any

from omni_ray.config import OmniRayConfig
from omni_ray.data import Prompt, encode_prompt
from omni_ray.data.arith import ArithTask
from omni_ray.data.prompts import PromptDataset


class RoundPrompts:
    """Round r's training prompts and the fixed held-out set. Offline preference runs keep the arith eval set, so a
    tiny offline run still reports task accuracy."""

    def __init__(self, cfg: OmniRayConfig, tokenizer: Any):
        self.cfg, self.tokenizer = cfg, tokenizer
        d = cfg.data
        if d.source == "prompts":
            template = (
                (lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
                if getattr(tokenizer, "chat_template", None)
                else None
            )
            self.source: ArithTask | PromptDataset = PromptDataset.from_config(d, seed=cfg.run.seed,
                                                                               chat_template=template)  # fmt: skip
        else:
            self.source = ArithTask(max_operand=d.max_operand, seed=cfg.run.seed, eval_size=d.eval_prompts)

    def train(self, round_index: int) -> tuple[list[Prompt], dict[str, int]]:
        return self.encode(self.source.train_prompts(round_index, self.cfg.data.prompts_per_round))

    def eval(self) -> list[Prompt]:
        return self.encode(self.source.eval_prompts())[0]

    def encode(self, prompts: list[Prompt]) -> tuple[list[Prompt], dict[str, int]]:
        """Prompts with their token ids; longer than data.max_prompt_tokens are cut to their last tokens (where a
        chat template puts the generation cue) or skipped, per data.on_overlong, and counted."""
        d = self.cfg.data
        kept, stats = [], {"truncated": 0, "skipped": 0}
        for p in prompts:
            tokens = encode_prompt(self.tokenizer, p.text)
            if len(tokens) > d.max_prompt_tokens:
                if d.on_overlong == "skip":
                    stats["skipped"] += 1
                    continue
                stats["truncated"] += 1
                tokens = tokens[-d.max_prompt_tokens :]
            kept.append(dataclasses.replace(p, token_ids=tuple(tokens)))
        return kept, stats

    def scoring_inputs(self, prompts: list[Prompt]) -> dict[str, Any]:
        """What the scorers see of each item's row: its reference answer and the `data.extra_columns`."""
        columns = {c: [p.columns.get(c) for p in prompts] for c in self.cfg.data.extra_columns}
        return {"references": [p.reference for p in prompts], "columns": columns or None}
