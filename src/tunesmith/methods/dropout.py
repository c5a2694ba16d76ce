"""LoRA's input dropout, with its mask drawn as the positions of the dropped elements (CPU generator).

Why by hand: torch's dropout (`_dropout_impl`: `bernoulli_` on a float tensor, `div_`, then the product) draws one
Mersenne Twister number per element in a serial kernel. On the reference model (LoRA r16 on all linear layers,
4 x 1,024 packed tokens, 2 threads) its `bernoulli_` alone took 10-13% of a training step (docs/benchmarks.md), and
peft draws a fresh mask for each of the 7 adapted projections of every layer. LoRA's rate is small (0.05 by
default), so this draws only the dropped elements: the gaps between successive dropped elements of the flattened
tensor are independent geometric variables, G = floor(log(V) / log(1 - p)) with V uniform on (0, 1] (float32 draws
of torch's CPU generator: one 32-bit draw each, against two for float64), and the positions are their running sum. That is about p * n draws for n elements
instead of n (torch) or n / 4 (the 15-bit lanes this module drew before), and the positions replace the mask: the
fused LoRA update (methods/lora_forward.py) keeps them (int32, 4p bytes per element: 0.2 at p = 0.05, against 1 for
a bool mask) and zeroes them with `index_fill`, a pass over p * n elements instead of the whole tensor.

Semantics, for an element x and rate p (0 < p < 1):
    out = 0 with probability p, else x / (1 - p), each element independently
up to float32 resolution (V is a multiple of 2^-24, so each gap's cumulative probabilities are off by at most
2^-24 ~ 6e-8, and a gap longer than log(2^-24) / log(1 - p) is never drawn: probability 6e-8), so the expectation is
x / (1 - p) * (1 - p) = x, as with torch's dropout. The generator
is torch's default CPU generator, on every device (the positions move to the tensor's device): a seeded run is
reproducible, and activation checkpointing (which restores the CPU RNG state before recomputing) replays the same
draws. What autograd keeps through `forward` is what torch's CPU dropout keeps (the fp32 scaled mask); the fused
LoRA update keeps the positions alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MARGIN_SDS = 8  # draws beyond the expected count, in standard deviations (another batch is drawn if short)


def drop_positions(n: int, p: float) -> torch.Tensor:
    """Sorted flat indices (int64, CPU) of the elements of an n-element tensor that dropout at rate p drops: each
    index independently with probability p (module docstring)."""
    log_keep = math.log1p(-p)
    expected = n * p
    batch = int(expected + MARGIN_SDS * math.sqrt(expected) + 16)
    parts, start = [], 0
    while True:
        u = torch.rand(batch, dtype=torch.float32)  # [0, 1) in steps of 2^-24
        gaps = u.neg_().add_(1).log_().div_(log_keep).floor_().to(torch.int64)  # V = 1 - u in (0, 1], exact
        positions = gaps.add_(1).cumsum_(0).add_(start - 1)
        parts.append(positions)
        last = int(positions[-1])
        if last >= n:
            break
        start = last + 1
    positions = torch.cat(parts) if len(parts) > 1 else parts[0]
    return positions[: int(torch.searchsorted(positions, n))]


def zero_at(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` with the elements at the flat `positions` set to 0."""
    return t.reshape(-1).index_fill(0, positions.long(), 0).view(t.shape)


def zero_at_(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous) with the elements at the flat `positions` set to 0, in place."""
    t.view(-1).index_fill_(0, positions.long(), 0)
    return t


class BulkDropout(nn.Dropout):
    """nn.Dropout whose mask is drawn as dropped positions (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or not x.is_floating_point():
            return F.dropout(x, self.p, self.training)
        positions, keep_probability = self.drops(x)
        noise = zero_at_(torch.full(x.shape, 1.0 / keep_probability, dtype=x.dtype), positions)
        return x * noise

    def drops(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(the flat positions of the elements of `x` that are dropped, on x's device: int32 where they fit, the
        probability of surviving). The same draws `forward` makes, so either use replays the other from the same
        generator state."""
        positions = drop_positions(x.numel(), self.p)
        if x.numel() <= torch.iinfo(torch.int32).max:
            positions = positions.to(torch.int32)
        if x.device.type != "cpu":
            positions = positions.to(x.device, non_blocking=x.device.type == "cuda")
        return positions, 1.0 - self.p


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
