"""Full fine-tuning: every parameter trainable, optionally keeping the embeddings or the first k layers frozen.

Trainable count = all parameters (tied input/output embeddings counted once) - frozen ones. The saved state is a
complete transformers model folder (safetensors), so it loads anywhere without tunesmith.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from tunesmith.atomic import atomic_dir
from tunesmith.methods.base import (
    Method,
    MethodError,
    MethodOptions,
    OptionsSection,
    TrainableCount,
    WeightBytes,
    write_method_file,
)
from tunesmith.models.facts import ModelFacts

if TYPE_CHECKING:
    from torch import nn

    from tunesmith.config import MethodConfig


class FullOptions(MethodOptions):
    freeze_embeddings: bool = Field(False, description="Keep the input embeddings (and a tied head) frozen.")
    freeze_first_layers: int = Field(0, ge=0, description="Keep the first k transformer layers frozen.")


def full_trainable_params(facts: ModelFacts, freeze_embeddings: bool = False, freeze_first_layers: int = 0) -> int:
    """Full fine-tuning: every parameter, minus the input embedding (and with it a tied head; an untied lm_head
    stays trainable) when frozen, minus the parameters of the first k decoder layers when frozen."""
    count = facts.params_total
    if freeze_embeddings:
        count -= sum(m.params for m in facts.modules if m.kind == "embedding" and m.layer is None)
    count -= sum(facts.layer_params[: min(freeze_first_layers, facts.num_layers)])
    return count


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a decoder-only model (Llama, Qwen2, Mistral, ...: model.model.layers)."""
    from torch import nn

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise MethodError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return layers


def frozen_parameter_names(model: nn.Module, config: MethodConfig) -> set[str]:
    options = config.full
    frozen: set[str] = set()
    by_id = {id(p): n for n, p in model.named_parameters()}
    if options.freeze_embeddings:
        embedding = model.get_input_embeddings()
        frozen.update(by_id[id(p)] for p in embedding.parameters())  # a tied head is the same tensor
    if options.freeze_first_layers:
        layers = decoder_layers(model)
        if options.freeze_first_layers > len(layers):
            raise MethodError(
                f"method.full.freeze_first_layers={options.freeze_first_layers} but the model has {len(layers)} layers"
            )
        for layer in layers[: options.freeze_first_layers]:
            frozen.update(by_id[id(p)] for p in layer.parameters())
    return frozen


class FullMethod(Method):
    name = "full"
    cpu_fp32_heap_share = 0.36  # fitted (methods/base.py)
    description = "every weight trains (most memory; the most capacity to change behaviour)"
    options = (OptionsSection("full", FullOptions, "Full fine-tuning options."),)
    plan_preference = 2
    trains_base_weights = True
    can_merge = False
    export_pair = False
    merge_refusal = "full fine-tuning: the run already holds a full model (adapter/ is a transformers folder); nothing to merge"

    # --- planning
    def trainable_count(self, facts: ModelFacts, config: MethodConfig) -> TrainableCount:
        f = config.full
        n = full_trainable_params(facts, f.freeze_embeddings, f.freeze_first_layers)
        return TrainableCount(
            self.name, n, "all parameters" + (" minus embeddings" if f.freeze_embeddings else "")
            + (f" minus first {f.freeze_first_layers} layers" if f.freeze_first_layers else "")
        )

    def layer_activation_elements(self, facts: ModelFacts, config: MethodConfig) -> float:
        """Trained base weights: 6h + 2q + 4i + 2k + a + 2 (norm input and x*rsqrt and output for both norms,
        rotated q, SDPA output, gate/silu/up/product, k and v, the SDPA log-sum-exp)."""
        h, i, q, k, a = facts.hidden_size, facts.intermediate_size, facts.num_heads * facts.head_dim, facts.kv_width, facts.num_heads
        return 6 * h + 2 * q + 4 * i + 2 * k + a + 2

    def layer_autocast_bytes(self, facts: ModelFacts, config: MethodConfig, mask_4d: bool = True) -> float:
        """Under 16-bit autocast on fp32 weights: the norms keep their input, x*rsqrt and rsqrt in fp32
        (4 * (4h + 2), + the log-sum-exp 4a); every matmul keeps its own 16-bit cast of its input (q, k, v, gate, up
        read the two norm outputs: 5h; o reads q; down reads i) and the MLP/attention tensors are 16-bit:
        2 * (5h + 4i + 2q + 2kv) (kv = q: key/value heads repeated under packing's 4-D mask, `mask_4d`)."""
        h, i, q, a = facts.hidden_size, facts.intermediate_size, facts.num_heads * facts.head_dim, facts.num_heads
        kv = q if self.supports_packing and mask_4d else facts.kv_width
        return 4 * (4 * h + a + 2) + 2 * (5 * h + 4 * i + 2 * q + 2 * kv)

    def frozen_weight_bytes(self, facts: ModelFacts, config: MethodConfig, trainable_params: int,
                            weight_bytes: int, weight_dtype: str) -> WeightBytes:
        """Only what stays frozen (embeddings, first layers) counts here; the rest is the trainable weights."""
        return WeightBytes((facts.params_total - trainable_params) * weight_bytes)

    def learning_rate_range(self, full_range: tuple[float, float]) -> tuple[float, float]:
        return full_range

    def learning_rate_reason(self) -> str:
        return "full fine-tuning: ~10x lower than PEFT"

    # --- training
    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        frozen = frozen_parameter_names(model, config)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name not in frozen)
        return model

    def save(self, model: nn.Module, directory: Path, config: MethodConfig, base_model: str) -> None:
        with atomic_dir(directory) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            write_method_file(tmp, self.name, base_model, config)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        """The saved folder is the whole model; `base` only lends its dtype (and is dropped)."""
        from transformers import AutoModelForCausalLM

        directory = Path(directory)
        if not any(directory.glob("*.safetensors")):
            raise MethodError(f"{directory}: no *.safetensors model weights (pickled weights are refused)")
        dtype = next(base.parameters()).dtype
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
        model.eval()
        return model


METHOD = FullMethod()
