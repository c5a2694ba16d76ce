"""Bottleneck adapters (Houlsby et al., 2019 serial; He et al., 2022 parallel) as a tunesmith Method.

Saved folder: adapter_model.safetensors (tensors keyed without the adapter name) + adapter_config.json
({"tunesmith_adapter_type": "bottleneck", sizes, placement, ...}) + tunesmith_method.json. The tuner is in tuner.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tunesmith.atomic import atomic_dir
from tunesmith.methods.base import (
    Method,
    MethodError,
    MethodOptions,
    OptionsSection,
    TrainableCount,
    frozen_core_autocast_bytes,
    frozen_core_elements,
    write_method_file,
)
from tunesmith.models.facts import ModelFacts

if TYPE_CHECKING:
    from torch import nn

    from tunesmith.config import MethodConfig

ADAPTER_NAME = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

__all__ = ["METHOD", "AdapterOptions", "adapter_trainable_params"]


class AdapterOptions(MethodOptions):
    reduction_factor: int = Field(16, gt=0, description="Bottleneck width m = hidden / reduction_factor.")
    placement: Literal["serial", "parallel"] = Field(
        "serial", description="serial: after attention and FFN (Houlsby); parallel: beside them (He et al.)."
    )
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Bottleneck activation.")
    scaling: float = Field(1.0, description="Scale of the adapter output (parallel adapters often use 4.0).")


def adapter_trainable_params(facts: ModelFacts, reduction_factor: int) -> int:
    """Bottleneck adapters (Houlsby et al. 2019): two per layer, each Linear(d, m) + bias -> act -> Linear(m, d) + bias,
    m = d // reduction_factor:  L * 2 * (d*m + m + m*d + d)."""
    d = facts.hidden_size
    m = d // reduction_factor
    return facts.num_layers * 2 * (d * m + m + m * d + d)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from tunesmith.methods.full import decoder_layers as find

    return find(model)


def adapter_settings(model: nn.Module, config: MethodConfig) -> dict[str, Any]:
    options = config.adapters
    hidden = model.config.hidden_size
    bottleneck = hidden // options.reduction_factor
    if bottleneck < 1:
        raise MethodError(
            f"method.adapters.reduction_factor={options.reduction_factor} leaves no bottleneck for hidden size {hidden}"
        )
    return {
        "tunesmith_adapter_type": "bottleneck",
        "hidden_size": hidden,
        "reduction_factor": options.reduction_factor,
        "bottleneck_size": bottleneck,
        "placement": options.placement,
        "nonlinearity": options.nonlinearity,
        "scaling": options.scaling,
        "num_layers": len(decoder_layers(model)),
        "sublayers": ["self_attn", "mlp"],
    }


class BottleneckAdapterMethod(Method):
    name = "adapters"
    cpu_fp32_heap_share = 0.43  # fitted (methods/base.py)
    description = "bottleneck layers after attention and MLP (1-5% trainable; extra inference cost)"
    options = (OptionsSection("adapters", AdapterOptions, "Bottleneck adapter options."),)
    plan_preference = 3
    can_merge = False
    merge_refusal = (
        "bottleneck adapters put a nonlinear block (down-projection, activation, up-projection) into every layer; "
        "a nonlinearity cannot be folded into the base's linear weights, so export the base + adapter pair instead"
    )

    # --- planning
    def trainable_count(self, facts: ModelFacts, config: MethodConfig) -> TrainableCount:
        rf = config.adapters.reduction_factor
        n = adapter_trainable_params(facts, rf)
        m = facts.hidden_size // rf
        return TrainableCount(self.name, n,
                              f"{facts.num_layers} layers x 2 x (2*d*m + m + d), d={facts.hidden_size}, m={m}")

    def layer_activation_elements(self, facts: ModelFacts, config: MethodConfig) -> float:
        """The frozen core + per adapter (two per layer) its input (for the down-projection's weight gradient) and
        the bottleneck activation (relu saves its output, which the up-projection also saves); gelu/silu/tanh keep
        their input as well: 2 * (h + m (+ m))."""
        m = facts.hidden_size // config.adapters.reduction_factor
        per_adapter = facts.hidden_size + m + (m if config.adapters.nonlinearity != "relu" else 0)
        return frozen_core_elements(facts) + 2 * per_adapter

    def layer_autocast_bytes(self, facts: ModelFacts, config: MethodConfig, mask_4d: bool = True) -> float:
        """Under 16-bit autocast: the frozen core + per adapter (two per layer) the 16-bit cast of its input that the
        down-projection keeps and the 16-bit bottleneck activation (+ the pre-activation for gelu/silu/tanh):
        2 * (2h + 2m (+ 2m)); measured."""
        m = facts.hidden_size // config.adapters.reduction_factor
        per_adapter = 2 * facts.hidden_size + 2 * m + (2 * m if config.adapters.nonlinearity != "relu" else 0)
        return frozen_core_autocast_bytes(facts, kv_repeated=self.supports_packing and mask_4d) + 2 * per_adapter

    # --- training
    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        from tunesmith.methods.adapters.tuner import add_adapter

        for parameter in model.parameters():
            parameter.requires_grad_(False)
        add_adapter(model, ADAPTER_NAME, adapter_settings(model, config))
        return model

    def save(self, model: nn.Module, directory: Path, config: MethodConfig, base_model: str) -> None:
        from safetensors.torch import save_file

        from tunesmith.methods.adapters.tuner import adapter_state_dict

        settings = {**model.bottleneck_settings[ADAPTER_NAME], "base_model_name_or_path": base_model}
        with atomic_dir(directory) as tmp:
            save_file(adapter_state_dict(model, ADAPTER_NAME), str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
            write_method_file(tmp, self.name, base_model, config)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        from safetensors.torch import load_file

        from tunesmith.methods.adapters.tuner import add_adapter, load_adapter_state

        directory = Path(directory)
        if not (directory / WEIGHTS_FILE).exists():
            raise MethodError(f"{directory}: no {WEIGHTS_FILE} (pickled adapters are refused)")
        settings = json.loads((directory / CONFIG_FILE).read_text())
        if settings.get("tunesmith_adapter_type") != "bottleneck":
            raise MethodError(f"{directory / CONFIG_FILE}: not a bottleneck adapter (tunesmith_adapter_type)")
        if settings["hidden_size"] != base.config.hidden_size:
            raise MethodError(
                f"{directory}: adapter built for hidden size {settings['hidden_size']}, base has {base.config.hidden_size}"
            )
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        add_adapter(base, ADAPTER_NAME, {k: settings[k] for k in
                                         ("hidden_size", "bottleneck_size", "nonlinearity", "placement", "scaling")})
        load_adapter_state(base, ADAPTER_NAME, load_file(str(directory / WEIGHTS_FILE)))
        base.eval()
        return base


METHOD = BottleneckAdapterMethod()
