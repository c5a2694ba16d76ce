"""Prompt tuning through peft (Lester et al., 2021): a trained soft prompt P: (n_virtual, hidden) at the input.

The model sees inputs_embeds = cat(P, embed(input_ids)); trainable parameters = n_virtual * hidden. P starts
random or as the token embeddings of a text (repeated/cut to n_virtual tokens), which the paper found trains
faster. peft prepends the n virtual positions to the logits too; `align_logits` drops them for the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tunesmith.methods.base import MethodError, MethodOptions, OptionsSection, TrainableCount
from tunesmith.methods.prompt_learning import MERGE_REFUSAL, PromptLearningMethod, text_init_tokenizer
from tunesmith.models.facts import ModelFacts

if TYPE_CHECKING:
    import torch
    from peft import PromptTuningConfig
    from torch import nn

    from tunesmith.config import MethodConfig


class PromptOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, gt=0, description="Soft-prompt length.")
    init: Literal["random", "text"] = Field("random", description="Initialise randomly or from a text's embeddings.")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the soft prompt.")
    tokenizer: str | None = Field(
        None, description="Tokenizer (path or id) for init_text; None = the base model's own path."
    )


def prompt_trainable_params(facts: ModelFacts, num_virtual_tokens: int) -> int:
    """Prompt tuning (Lester et al. 2021): one soft embedding of width hidden per virtual token: n * h."""
    return num_virtual_tokens * facts.hidden_size


class PromptMethod(PromptLearningMethod):
    name = "prompt"
    cpu_fp32_heap_share = 0.16  # fitted (methods/base.py)
    description = "a trained soft prompt at the input (the fewest parameters; many cheap task variants)"
    options = (OptionsSection("prompt", PromptOptions, "Prompt-tuning options."),)
    plan_preference = 5
    merge_refusal = MERGE_REFUSAL.format(name="prompt")

    # --- planning
    def trainable_count(self, facts: ModelFacts, config: MethodConfig) -> TrainableCount:
        n = prompt_trainable_params(facts, config.prompt.num_virtual_tokens)
        return TrainableCount(self.name, n, f"{config.prompt.num_virtual_tokens} tokens x hidden {facts.hidden_size}")

    def virtual_tokens(self, config: MethodConfig) -> int:
        """The frozen core runs over seq + n virtual positions."""
        return config.prompt.num_virtual_tokens

    # --- training
    def peft_config(self, model: nn.Module, config: MethodConfig) -> PromptTuningConfig:
        from peft import PromptTuningConfig, PromptTuningInit

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
