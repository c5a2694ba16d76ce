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

from peft import PrefixTuningConfig
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.methods.base import MethodError
from tunesmith.methods.prompt_learning import MERGE_REFUSAL, PromptLearningMethod


def prefix_trainable_count(layers: int, kv_width: int, config: MethodConfig) -> int:
    """What peft's PrefixEncoder trains, kv_width = kv_heads * head_dim (peft's token_dim for GQA models):

    no projection:   n * layers * 2 * kv_width
    with projection: n * kv_width + (kv_width * h + h) + (h * 2 * layers * kv_width + 2 * layers * kv_width)
    """
    options = config.prefix
    out = layers * 2 * kv_width
    if not options.projection:
        return options.num_virtual_tokens * out
    h = options.projection_hidden
    return options.num_virtual_tokens * kv_width + (kv_width * h + h) + (h * out + out)


class PrefixMethod(PromptLearningMethod):
    name = "prefix"
    merge_refusal = MERGE_REFUSAL.format(name="prefix")
    supports_gradient_checkpointing = False

    def peft_config(self, model: nn.Module, config: MethodConfig) -> PrefixTuningConfig:
        options = config.prefix
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.projection,
            encoder_hidden_size=options.projection_hidden,
        )

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        raise MethodError(
            "prefix: gradient checkpointing is not supported with prefix tuning (the prefix lives in the KV cache, "
            "which recomputation does not rebuild); set train.gradient_checkpointing: false or use method.name: lora"
        )


METHOD = PrefixMethod()
