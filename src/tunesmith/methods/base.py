"""The Method interface: what every fine-tuning method provides to the trainer, planner, CLI and server.

A method turns a loaded base model into a trainable model (`apply`), saves its trained state in its own format
(`save`; PEFT's layout where peft implements the method), restores it onto a fresh base (`load`), and says
whether and how it merges into the base weights. The trainer checkpoints the trainable parameters generically
(by name, as safetensors), so methods need no checkpoint code of their own.

Every saved folder carries `tunesmith_method.json` ({"method", "base_model", "options"}) so that
`registry.load_trained` knows how to load it; PEFT, vLLM and LoRAX ignore the extra file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UsageError

METHOD_FILE = "tunesmith_method.json"


class MethodError(UsageError):
    """A method cannot do what was asked (merge a prefix, checkpoint a prefix-tuned model, ...); says why."""


class Method:
    """Base class with the defaults; one small subclass per method (keep it shallow)."""

    name: str = ""
    can_merge: bool = False
    merge_refusal: str = ""  # why not, when can_merge is False
    supports_gradient_checkpointing: bool = True
    # Packing feeds a 4-D block-diagonal mask and per-example positions; prompt-learning methods prepend virtual
    # tokens that such a mask cannot describe, so the trainer refuses packing when this is False.
    supports_packing: bool = True

    # --- loading the base
    def base_load_kwargs(self, config: MethodConfig) -> dict[str, Any]:
        """Extra keyword arguments for from_pretrained (e.g. a quantization config)."""
        return {}

    # --- training
    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        raise NotImplementedError

    def trainable_parameter_count(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        if not self.supports_gradient_checkpointing:
            raise MethodError(f"{self.name}: gradient checkpointing is not supported with this method")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    def align_logits(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits aligned with input_ids: (batch, seq, vocab). Identity unless the method prepends positions."""
        return logits

    # --- persistence
    def save(self, model: nn.Module, directory: Path, config: MethodConfig, base_model: str) -> None:
        raise NotImplementedError

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        raise NotImplementedError

    # --- inference
    def prepare_for_generation(self, model: nn.Module) -> nn.Module:
        """Hook for methods whose generation needs care (e.g. prompt learning with the KV cache)."""
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise MethodError(self.merge_refusal or f"{self.name} cannot merge into the base weights")


def write_method_file(directory: Path, method: str, base_model: str, config: MethodConfig) -> None:
    options = config.model_dump(mode="json")
    (Path(directory) / METHOD_FILE).write_text(
        json.dumps({"method": method, "base_model": base_model, "options": options}, indent=2) + "\n"
    )


def read_method_file(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / METHOD_FILE
    return json.loads(path.read_text()) if path.exists() else None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (tied parameters appear once, as named_parameters yields them)."""
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back by name; every saved name must exist and every trainable one be saved."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = trainable - state.keys()
    unexpected = state.keys() - params.keys()
    if missing or unexpected:
        raise MethodError(
            f"checkpoint does not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
