"""Bottleneck adapters (Houlsby et al., 2019 serial; He et al., 2022 parallel) as a tunesmith Method.

Saved folder: adapter_model.safetensors (tensors keyed without the adapter name) + adapter_config.json
({"tunesmith_adapter_type": "bottleneck", sizes, placement, ...}) + tunesmith_method.json. The tuner is in tuner.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.atomic import atomic_dir
from tunesmith.config import MethodConfig
from tunesmith.methods.adapters.tuner import (
    adapter_state_dict,
    add_adapter,
    bottleneck_trainable_count,
    decoder_layers,
    load_adapter_state,
)
from tunesmith.methods.base import Method, MethodError, write_method_file

ADAPTER_NAME = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

__all__ = ["METHOD", "bottleneck_trainable_count"]


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
    can_merge = False
    merge_refusal = (
        "bottleneck adapters put a nonlinear block (down-projection, activation, up-projection) into every layer; "
        "a nonlinearity cannot be folded into the base's linear weights, so export the base + adapter pair instead"
    )

    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        add_adapter(model, ADAPTER_NAME, adapter_settings(model, config))
        return model

    def save(self, model: nn.Module, directory: Path, config: MethodConfig, base_model: str) -> None:
        settings = {**model.bottleneck_settings[ADAPTER_NAME], "base_model_name_or_path": base_model}
        with atomic_dir(directory) as tmp:
            save_file(adapter_state_dict(model, ADAPTER_NAME), str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
            write_method_file(tmp, self.name, base_model, config)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
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
