"""Prompt tuning through peft (Lester et al., 2021): a trained soft prompt P: (n_virtual, hidden) at the input.

The model sees inputs_embeds = cat(P, embed(input_ids)); trainable parameters = n_virtual * hidden. P starts
random or as the token embeddings of a text (repeated/cut to n_virtual tokens), which the paper found trains
faster. peft prepends the n virtual positions to the logits too; `align_logits` drops them for the trainer.
"""

from __future__ import annotations

import torch
from peft import PromptTuningConfig, PromptTuningInit
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.methods.base import MethodError
from tunesmith.methods.prompt_learning import MERGE_REFUSAL, PromptLearningMethod, text_init_tokenizer


def prompt_trainable_count(hidden: int, config: MethodConfig) -> int:
    """n_virtual * hidden."""
    return config.prompt.num_virtual_tokens * hidden


class PromptMethod(PromptLearningMethod):
    name = "prompt"
    merge_refusal = MERGE_REFUSAL.format(name="prompt")

    def peft_config(self, model: nn.Module, config: MethodConfig) -> PromptTuningConfig:
        options = config.prompt
        if options.init == "random":
            return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens)
        tokenizer = text_init_tokenizer("prompt", options, model)
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=options.init_text,
            tokenizer_name_or_path=tokenizer,
        )

    def align_logits(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, n + seq, vocab) → (batch, seq, vocab): the virtual positions predict nothing we train on."""
        extra = logits.shape[1] - input_ids.shape[1]
        if extra == 0:
            return logits
        if extra < 0:
            raise MethodError(f"prompt: logits have {logits.shape[1]} positions for {input_ids.shape[1]} tokens")
        return logits[:, extra:]


METHOD = PromptMethod()
