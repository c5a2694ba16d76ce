"""Prefix tuning through peft (Li & Liang, 2021): trained key/value vectors prepended at every layer.

Per layer l the attention sees K_l = cat(P_k[l], K_l), V_l = cat(P_v[l], V_l) with P: (n_virtual, kv_heads *
head_dim); trainable parameters = n_virtual * layers * 2 * kv_heads * head_dim (peft sizes the prefix to the key/
value width, so grouped-query models store fewer). With `projection` the prefix is produced during training by an
MLP  Embedding(n, d) -> Linear(d, h) -> tanh -> Linear(h, layers * 2 * kv_width)  (the paper's
reparameterisation, more stable); peft saves the MLP's output, so the saved adapter has the plain size.

The prefix lives in the KV cache, which gradient checkpointing's recomputation and packing's block-diagonal mask
do not know about: both are refused, clearly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tunesmith.methods.base import (
    MethodError,
    MethodOptions,
    OptionsSection,
    TrainableCount,
    frozen_core_autocast_bytes,
    frozen_core_elements,
)
from tunesmith.methods.prompt_learning import MERGE_REFUSAL, PromptLearningMethod, text_init_tokenizer
from tunesmith.models.facts import ModelFacts

if TYPE_CHECKING:
    from peft import PrefixTuningConfig
    from torch import nn

    from tunesmith.config import MethodConfig


class PrefixOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens per layer (key and value).")
    projection: bool = Field(False, description="Reparameterise the prefix through an MLP during training.")
    projection_hidden: int = Field(512, gt=0, description="Hidden size of the reparameterisation MLP.")
    init: Literal["random", "text"] = Field(
        "random", description="random (peft's N(0,1)) or text: the base model's own keys/values of init_text."
    )
    init_text: str | None = Field(None, description="Text whose per-layer keys/values initialise the prefix.")
    tokenizer: str | None = Field(
        None, description="Tokenizer (path or id) for init_text; None = the base model's own path."
    )


def prefix_trainable_params(facts: ModelFacts, num_virtual_tokens: int, projection: bool = False,
                            projection_hidden: int = 512) -> int:
    """Prefix tuning (Li & Liang 2021) as peft 0.21 builds it for a decoder-only model.

    One key and one value prefix per layer, each of kv width w = num_key_value_heads * head_dim (peft shrinks the
    prefix to the kv width under grouped-query attention, peft #1901):
        without projection:  n * L * 2 * w                                    (an Embedding(n, L*2*w))
        with projection:     n*w + (w*H + H) + (H * L*2*w + L*2*w)          (Embedding(n, w) -> Linear(w, H) ->
                                                                               tanh -> Linear(H, L*2*w))
    with n virtual tokens, L layers and H = projection_hidden (peft's encoder_hidden_size).
    """
    n, w, L = num_virtual_tokens, facts.kv_width, facts.num_layers
    if not projection:
        return n * L * 2 * w
    H = projection_hidden
    return n * w + (w * H + H) + (H * L * 2 * w + L * 2 * w)


class PrefixMethod(PromptLearningMethod):
    name = "prefix"
    cpu_fp32_heap_share = 0.16  # fitted (methods/base.py)
    description = "trained key/value vectors at every layer (tiny; no gradient checkpointing, no packing)"
    options = (OptionsSection("prefix", PrefixOptions, "Prefix-tuning options."),)
    plan_preference = 4
    merge_refusal = MERGE_REFUSAL.format(name="prefix")
    supports_gradient_checkpointing = False

    # --- planning
    def trainable_count(self, facts: ModelFacts, config: MethodConfig) -> TrainableCount:
        p = config.prefix
        n = prefix_trainable_params(facts, p.num_virtual_tokens, p.projection, p.projection_hidden)
        formula = f"{p.num_virtual_tokens} tokens x {facts.num_layers} layers x 2 x kv width {facts.kv_width}"
        return TrainableCount(self.name, n, formula + (f" + MLP (hidden {p.projection_hidden})" if p.projection else ""))

    def layer_activation_elements(self, facts: ModelFacts, config: MethodConfig) -> float:
        """The frozen core + 2h: the residual stream now requires grad through the prefix keys/values."""
        return frozen_core_elements(facts) + 2 * facts.hidden_size

    def layer_autocast_bytes(self, facts: ModelFacts, config: MethodConfig, mask_4d: bool = True) -> float:
        """Under 16-bit autocast: the frozen core with the key/value heads repeated to the query width (the prefix
        makes the mask 4-D; the prefix's own positions, a few dozen, are left out); measured, no +2h."""
        return frozen_core_autocast_bytes(facts, kv_repeated=True)

    def attention_mask_elements(self, config: MethodConfig, batch_size: int, seq_len: int) -> tuple[int, bool]:
        """transformers builds a 4-D mask over the prefix + the sequence, (batch, 1, seq, prefix + seq), and every
        layer keeps its own copy (measured with saved_tensors_hooks)."""
        return batch_size * seq_len * (seq_len + config.prefix.num_virtual_tokens), True

    # --- training
    def peft_config(self, model: nn.Module, config: MethodConfig) -> PrefixTuningConfig:
        from peft import PrefixTuningConfig

        options = config.prefix
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.projection,
            encoder_hidden_size=options.projection_hidden,
        )

    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        options = config.prefix
        if options.init == "random":
            return super().apply(model, config)
        if options.projection:
            raise MethodError("method.prefix.init 'text' sets the prefix itself; with projection: true the MLP "
                              "produces it. Use one or the other")
        tokenizer = text_init_tokenizer("prefix", options, model)
        peft_model = super().apply(model, config)
        init_prefix_from_text(peft_model, options.init_text, tokenizer)
        return peft_model

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        raise MethodError(
            "prefix: gradient checkpointing is not supported with prefix tuning (the prefix lives in the KV cache, "
            "which recomputation does not rebuild); set train.gradient_checkpointing: false or use method.name: lora"
        )


def init_prefix_from_text(peft_model, text: str, tokenizer_name: str) -> None:
    """Set the prefix to the base model's own keys and values for `text` (its first n tokens, repeated if shorter).

    Li & Liang (2021, section 7.2) found initialising the prefix with real words' activations far better than
    random; peft offers it for prompt tuning only. A random N(0,1) prefix is 20 extra key/value columns unlike any
    the model has seen: on the reference model it raised the first-step loss on the demo task from 1.0 to 6.4.
    With this initialisation the prefixed model on input X equals the base model on text + X (tested), so
    training starts from the base model's behaviour with the text as context.
    """
    import torch
    from transformers import AutoTokenizer, DynamicCache

    peft_config = peft_model.active_peft_config
    n = peft_config.num_virtual_tokens
    base = peft_model.get_base_model()
    ids = AutoTokenizer.from_pretrained(tokenizer_name)(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MethodError(f"method.prefix.init_text {text!r} has no tokens")
    ids = (ids * (n // len(ids) + 1))[:n]
    device = next(base.parameters()).device
    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        base(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True)
    # peft's layout: weight (n, layers * 2 * token_dim), viewed as (n, layers * 2, heads, head_dim); row l * 2 is
    # layer l's keys and l * 2 + 1 its values (PeftModel.get_prompt).
    columns = []
    for layer in cache.layers:
        for states in (layer.keys, layer.values):  # (1, kv_heads, n, head_dim)
            columns.append(states[0].permute(1, 0, 2).reshape(n, -1))
    weight = torch.cat(columns, dim=1)
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    if weight.shape != embedding.weight.shape:
        raise MethodError(f"prefix init from text: keys/values {tuple(weight.shape)} do not match peft's prefix "
                          f"{tuple(embedding.weight.shape)} for {type(base).__name__}")
    with torch.no_grad():
        embedding.weight.copy_(weight.to(embedding.weight.dtype))


METHOD = PrefixMethod()
