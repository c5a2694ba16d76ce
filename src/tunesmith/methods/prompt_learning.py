"""What prefix tuning and prompt tuning share: peft persistence and generation that is right with the KV cache.

Why the generation fix exists (transformers 5.24 + peft 0.21.2, reproduced here): transformers 5 renamed the
generation cache argument from `past_key_values` to `cache` and dropped `cache_position`, while peft's
`PeftModelForCausalLM.prepare_inputs_for_generation` still looks for `past_key_values` and `cache_position`.
So with the cache on
  - prefix tuning puts the prefix into `past_key_values`, the model uses the (empty) `cache` it was also given
    and ignores the prefix: generation answers like the base model;
  - prompt tuning never sees a filled `past_key_values`, believes every step is the prefill, and prepends the
    soft prompt again to every single new token: generation degenerates.
Without the cache (`use_cache=False`) prompt tuning is right on unpadded prompts; prefix tuning is wrong there
too after the first new token (the model returns the prefix-filled cache it was handed, and the next step
re-feeds the whole sequence on top of it), measured against a full-recompute greedy loop through peft's forward.

`install_cached_generation` replaces the peft model's `prepare_inputs_for_generation` with one written against
transformers 5's contract (`cache`, `next_sequence_length`, generate-made `position_ids`). Semantics, for n virtual
tokens and a left-padded 2-D mask m: (batch, L):
    attention mask  = cat(ones(batch, n), m)                      # virtual tokens are always visible
    positions       = n + cumsum(m) - 1 for real tokens           # as in training: prefix/prompt take 0..n-1
    prefix tuning:  prefill fills the cache with the prefix key/values (peft's get_prompt) before the prompt;
    prompt tuning:  prefill feeds cat(soft_prompt, embed(ids)) and positions cat(arange(n), n + cumsum(m) - 1);
    later steps feed only the new token, with the cache holding everything before it.
Prompt tuning: peft's own forward drops position ids, so on a LEFT-PADDED prompt peft counts padding as
positions; here positions count real tokens only, so a batched prompt generates what it generates alone.
The tests hold cached and uncached greedy generation equal token for token, equal to a full-recompute loop,
batched equal to single, and different from the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.atomic import atomic_dir
from tunesmith.methods.base import Method, MethodError, write_method_file

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch import nn

    from tunesmith.config import MethodConfig

PROMPT_LEARNING_LR = (1e-2, 3e-1)
MERGE_REFUSAL = (
    "{name} keeps its state as virtual tokens in the context, not as a change to any weight matrix, so there is "
    "nothing to merge; export the base + adapter pair instead (tunesmith merge does this)"
)


def _positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions 0.. counted over real tokens only (padding gets 0): (batch, L)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def install_cached_generation(model: PeftModel) -> PeftModel:
    """Give `model` a prepare_inputs_for_generation that is right with and without the KV cache (see module doc)."""
    import torch
    from peft import PeftType

    base_prepare = model.base_model_prepare_inputs_for_generation

    def prepare_inputs_for_generation(input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        config = model.active_peft_config
        n = config.num_virtual_tokens
        cache = kwargs.get("cache")
        # Without the cache every step recomputes the whole sequence; but the model still hands back the cache it
        # was given (prefix + tokens), so "empty cache" alone cannot tell a prefill: use_cache=False always is one.
        prefill = not kwargs.get("use_cache", True) or cache is None or cache.get_seq_length() == 0
        full_mask = kwargs.get("attention_mask")
        inputs = base_prepare(input_ids, **kwargs)
        ids = inputs["input_ids"]
        batch, length = ids.shape
        positions = inputs.get("position_ids")
        if positions is None:
            source = full_mask if full_mask is not None else torch.ones_like(input_ids)
            positions = _positions_from_mask(source)[:, -length:]
        positions = positions + n
        mask = inputs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise MethodError(f"{config.peft_type}: generation expects a 2-D attention mask, got {mask.dim()}-D")
            inputs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if config.peft_type == PeftType.PREFIX_TUNING:
            if prefill:  # the prefix key/values go into the cache before the prompt's own
                inputs["cache"] = model.get_prompt(batch_size=batch)
        elif config.peft_type == PeftType.PROMPT_TUNING:
            if prefill:
                embeds = model.word_embeddings(ids)
                prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
                inputs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
                inputs["input_ids"] = None
                virtual = torch.arange(n, device=positions.device).expand(batch, n)
                positions = torch.cat([virtual, positions], dim=1)
        else:
            raise MethodError(f"cached generation fix does not cover {config.peft_type}")
        inputs["position_ids"] = positions
        return inputs

    # An instance attribute: PeftModelForCausalLM.generate installs `self.prepare_inputs_for_generation` on the
    # base model for the duration of the call, so this one is used instead of peft's class method.
    model.prepare_inputs_for_generation = prepare_inputs_for_generation
    return model


def text_init_tokenizer(method: str, options, model: nn.Module) -> str:
    """The tokenizer for `method.<method>.init: text` (its own option, else the base model's path), after checking
    that init_text is given; a MethodError names the option to set."""
    if not options.init_text:
        raise MethodError(f"method.{method}.init is 'text' but method.{method}.init_text is empty; give the text")
    tokenizer = options.tokenizer or getattr(model.config, "_name_or_path", "")
    if not tokenizer:
        raise MethodError(f"method.{method}.init 'text' needs a tokenizer: set method.{method}.tokenizer to its path")
    return tokenizer


class PromptLearningMethod(Method):
    """Shared persistence (peft's layout) and generation for prefix and prompt tuning."""

    can_merge = False
    supports_packing = False
    supports_sharding = False  # peft saves the prompt embeddings from the live (sharded) module
    uses_virtual_tokens = True

    def learning_rate_range(self, full_range: tuple[float, float]) -> tuple[float, float]:
        """1e-2 to 3e-1 whatever the model size: a few virtual-token vectors train at rates far above LoRA's
        (Lester et al., 2021 train prompt tuning at 0.3; peft's prompt- and prefix-tuning examples use 1e-2 to 3e-2)."""
        return PROMPT_LEARNING_LR

    def learning_rate_reason(self) -> str:
        return "prompt learning trains a few virtual-token vectors: rates of 1e-2-3e-1 (Lester et al. 2021 used 0.3)"

    def plan_options(self, *, rank: int, dropout: float, targets: list[str] | str | None,
                     virtual_tokens: int | None) -> dict[str, Any]:
        return {self.name: {"num_virtual_tokens": virtual_tokens}} if virtual_tokens else {}

    def peft_config(self, model: nn.Module, config: MethodConfig):
        raise NotImplementedError

    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        from peft import get_peft_model

        # The generation fix goes in now, not only in load_trained: the trainer evaluates by generating with the
        # model it just trained, which never passes through prepare_for_generation.
        return install_cached_generation(get_peft_model(model, self.peft_config(model, config)))

    def save(self, model: nn.Module, directory: Path, config: MethodConfig, base_model: str) -> None:
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = base_model
        with atomic_dir(directory) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
            write_method_file(tmp, self.name, base_model, config)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftModel

        directory = Path(directory)
        if not (directory / "adapter_model.safetensors").exists():
            raise MethodError(f"{directory}: no adapter_model.safetensors (pickled adapters are refused)")
        model = PeftModel.from_pretrained(base, directory, is_trainable=False)
        model.eval()
        return install_cached_generation(model)

    def prepare_for_generation(self, model: nn.Module) -> nn.Module:
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise MethodError(f"{self.name}: expected a peft model to prepare for generation, got {type(model).__name__}")
        return install_cached_generation(model)

    def merge(self, model: nn.Module) -> nn.Module:
        raise MethodError(MERGE_REFUSAL.format(name=self.name))
