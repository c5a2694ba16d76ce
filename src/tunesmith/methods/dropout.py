"""LoRA's input dropout, with its random mask drawn in bulk on CPUs.

Why by hand: on a CPU, torch's dropout (`_dropout_impl`: `bernoulli_` on a float tensor, `div_`, then the product)
draws one Mersenne Twister number per element in a serial kernel. On the reference model (LoRA r16 on all linear
layers, 4 x 1,024 packed tokens, 2 threads) its `bernoulli_` alone took 10-13% of a training step
(docs/benchmarks.md); peft draws a fresh mask for each of the 7 adapted projections of every layer. Here each
64-bit draw of torch's own generator gives four 15-bit uniforms (`random_()` on int64 fills [0, 2^63): 63 random
bits, the top bit of the fourth 16-bit lane is always 0, so each lane's low 15 bits are used), about 4x fewer draws
than one per element (bench/dropout_speed.py measures it).

Semantics, for an element x and rate p:
    p'  = round(p * 2^15) / 2^15          (|p' - p| <= 2^-16; p = 0.05 gives 0.0499878)
    out = 0 with probability p', else x / (1 - p'), each element independently
so the expectation is exactly x, as with torch's dropout. The generator is torch's default CPU generator: a seeded
run is reproducible, and activation checkpointing (which restores the CPU RNG state before recomputing) replays the
same mask. What autograd keeps through `forward` is what torch's CPU dropout keeps (the fp32 scaled mask); the fused
LoRA update (methods/lora_forward.py) takes `keep_mask` instead and keeps the bool mask alone.
Tensors on other devices go through `F.dropout` (CUDA's is one fused kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LANE_BITS = 15
LANE_MASK = (1 << LANE_BITS) - 1


def as_float_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 in `dtype`. Through a uint8 view: torch's CPU cast from bool is not vectorized (measured,
    (4,024 x 576), 2 threads: 0.86 ms from bool, 0.13 ms from the same bytes as uint8), and a multiply by a bool
    tensor casts it that slow way first."""
    return keep.view(torch.uint8).to(dtype)


class BulkDropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from bulk 64-bit draws (see the module docstring)."""

    def __init__(self, p: float = 0.5):
        super().__init__(p=p)
        self.threshold = round(p * (1 << LANE_BITS))  # a lane below it is dropped
        self.p_effective = self.threshold / (1 << LANE_BITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0 or x.device.type != "cpu" or not x.is_floating_point():
            return F.dropout(x, self.p, self.training)
        keep, keep_probability = self.keep_mask(x)
        noise = as_float_mask(keep, x.dtype).mul_(1.0 / keep_probability)
        return x * noise

    def keep_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(the bool mask of the elements of `x` that survive, the probability of surviving). On a CPU the same draws
        as `forward` makes (p' above), so either use replays the other from the same generator state; elsewhere one
        `bernoulli_` of 1 - p on the tensor's device."""
        if x.device.type != "cpu":
            return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - self.p), 1.0 - self.p
        n = x.numel()
        words = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_()
        lanes = words.view(torch.int16).bitwise_and_(LANE_MASK)[:n].view(x.shape)
        return lanes.ge(self.threshold), 1.0 - self.p_effective

    def extra_repr(self) -> str:
        return f"p={self.p} (drawn at {self.p_effective:.7f})"


def use_bulk_dropout(model: nn.Module) -> int:
    """Replace the nn.Dropout of every peft LoRA layer's `lora_dropout` with BulkDropout; returns how many."""
    replaced = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, nn.ModuleDict):
            continue
        for name, dropout in list(table.items()):
            if type(dropout) is nn.Dropout and dropout.p > 0:
                table[name] = BulkDropout(dropout.p)
                replaced += 1
    return replaced
