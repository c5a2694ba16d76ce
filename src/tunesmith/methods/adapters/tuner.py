"""Bottleneck adapters as a small peft-style tuner: modules keyed by adapter name, attached by forward hooks.

Why by hand: no maintained library offers bottleneck adapters for current decoders; AdapterHub's `adapters`
pins transformers 4.57 and this project runs transformers 5. peft has no bottleneck tuner.

Per decoder layer two adapters, one on the attention sublayer (`self_attn`) and one on the feed-forward sublayer
(`mlp`), each A(x) = up(act(down(x))) with down: Linear(d, m), up: Linear(m, d), m = d // reduction_factor:
    serial   (Houlsby et al., 2019, sec. 2):  y = f(x) + s * A(f(x))     # after the sublayer, before the residual
    parallel (He et al., 2022, sec. 3):       y = f(x) + s * A(x)        # beside the sublayer, on its input
where f is the sublayer and x its (normed) input: (batch, seq, d). `up` starts at zero (weight and bias), so the
first forward equals the base model. Trainable parameters = layers * 2 * (d*m + m + m*d + d).

The adapters live in `<sublayer>.bottleneck_adapters[<name>]`, so parameter names are stable (the trainer
checkpoints by name) and several named adapters can sit side by side; the active ones are applied in order.
Works for any decoder whose layers hold `self_attn` and `mlp` (Llama, Qwen2, Mistral, ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SUBLAYERS = ("self_attn", "mlp")
ADAPTERS_ATTR = "bottleneck_adapters"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """A(x) = up(act(down(x))): (..., d) → (..., d); placement, scale, name in `settings`."""

    def __init__(self, hidden: int, bottleneck: int, nonlinearity: str, placement: str, scaling: float,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, bias=True, dtype=dtype, device=device)
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(bottleneck, hidden, bias=True, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.placement = placement
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


def _hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    adapters: nn.ModuleDict = getattr(module, ADAPTERS_ATTR)
    active = getattr(module, "active_bottleneck_adapters", ())
    if not active:
        return output
    x = args[0] if args else kwargs["hidden_states"]
    y = output[0] if isinstance(output, tuple) else output
    for name in active:
        adapter = adapters[name]
        y = y + adapter.scaling * adapter(y if adapter.placement == "serial" else x)
    return (y, *output[1:]) if isinstance(output, tuple) else y


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from tunesmith.methods.full import decoder_layers as find

    return find(model)


def add_adapter(model: nn.Module, name: str, settings: dict[str, Any]) -> int:
    """Attach adapter `name` to every layer's attention and feed-forward sublayer; returns its parameter count.

    settings: hidden_size, bottleneck_size, nonlinearity, placement, scaling (the adapter_config.json fields).
    """
    layers = decoder_layers(model)
    reference = next(model.parameters())
    count = 0
    for index, layer in enumerate(layers):
        for sublayer_name in SUBLAYERS:
            sublayer = getattr(layer, sublayer_name, None)
            if sublayer is None:
                raise ValueError(f"layer {index} ({type(layer).__name__}) has no '{sublayer_name}' sublayer")
            if not hasattr(sublayer, ADAPTERS_ATTR):
                sublayer.add_module(ADAPTERS_ATTR, nn.ModuleDict())
                sublayer.active_bottleneck_adapters = []
                sublayer.register_forward_hook(_hook, with_kwargs=True)
            adapters: nn.ModuleDict = getattr(sublayer, ADAPTERS_ATTR)
            if name in adapters:
                raise ValueError(f"adapter {name!r} already exists")
            adapters[name] = Bottleneck(
                settings["hidden_size"], settings["bottleneck_size"], settings["nonlinearity"],
                settings["placement"], settings["scaling"], reference.dtype, reference.device,
            )
            sublayer.active_bottleneck_adapters.append(name)
            count += sum(p.numel() for p in adapters[name].parameters())
    model.bottleneck_settings = {**getattr(model, "bottleneck_settings", {}), name: dict(settings)}
    return count


def set_active(model: nn.Module, names: list[str]) -> None:
    """Apply only `names` (in order); [] runs the base model."""
    for layer in decoder_layers(model):
        for sublayer_name in SUBLAYERS:
            sublayer = getattr(layer, sublayer_name)
            if hasattr(sublayer, ADAPTERS_ATTR):
                sublayer.active_bottleneck_adapters = [n for n in names if n in getattr(sublayer, ADAPTERS_ATTR)]


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors, keyed without the name (…bottleneck_adapters.down.weight), like peft."""
    marker = f".{ADAPTERS_ATTR}.{name}."
    return {
        key.replace(marker, f".{ADAPTERS_ATTR}."): tensor.detach().cpu().contiguous()
        for key, tensor in model.state_dict().items()
        if marker in key
    }


def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into adapter `name`; every key must match and every adapter tensor be present."""
    marker = f".{ADAPTERS_ATTR}."
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if f".{ADAPTERS_ATTR}.{name}." in k}
    renamed = {key.replace(marker, f".{ADAPTERS_ATTR}.{name}."): tensor for key, tensor in state.items()}
    missing, unexpected = params.keys() - renamed.keys(), renamed.keys() - params.keys()
    if missing or unexpected:
        raise ValueError(f"adapter weights do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for key, tensor in renamed.items():
            params[key].copy_(tensor.to(params[key].device, params[key].dtype))
