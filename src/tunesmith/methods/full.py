"""Full fine-tuning: every parameter trainable, optionally keeping the embeddings or the first k layers frozen.

Trainable count = all parameters (tied input/output embeddings counted once) - frozen ones. The saved state is a
complete transformers model folder (safetensors), so it loads anywhere without tunesmith.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import AutoModelForCausalLM

from tunesmith.atomic import atomic_dir
from tunesmith.config import MethodConfig
from tunesmith.methods.base import Method, MethodError, write_method_file


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a decoder-only model (Llama, Qwen2, Mistral, ...: model.model.layers)."""
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


def full_trainable_count(total_params: int, frozen_params: int) -> int:
    """total - frozen (tied embeddings counted once)."""
    return total_params - frozen_params


class FullMethod(Method):
    name = "full"
    can_merge = False
    merge_refusal = "full fine-tuning: the run already holds a full model (adapter/ is a transformers folder); nothing to merge"

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
        directory = Path(directory)
        if not any(directory.glob("*.safetensors")):
            raise MethodError(f"{directory}: no *.safetensors model weights (pickled weights are refused)")
        dtype = next(base.parameters()).dtype
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
        model.eval()
        return model


METHOD = FullMethod()
