"""Mixed-adapter LoRA layers: one base projection for the whole batch plus each row's own low-rank delta.

Stacked adapter weights per targeted module (S-LoRA, Sheng et al. 2023 §4; Punica, Chen et al. 2023 §3):
    A_stack: (slots, r_max, in)    B_stack: (slots, out, r_max)   (scale folded into B; ranks zero-padded to r_max)
Semantics (the reference, `lora_delta_reference`), x: (batch, seq, in):
    y[i] = x[i] @ W.T + b                                   for every row i (one matmul for the batch)
    y[i] += (x[i] @ A_stack[s_i].T) @ B_stack[s_i].T         for rows with an adapter slot s_i; base rows skip it
Zero-padded rank columns add exact zeros, so padding to r_max does not change the result.
The fast path (`lora_delta_bmm`) gathers each adapter row's A and B and runs two batched matmuls (torch.bmm),
which is the pure-PyTorch form of Punica's BGMV kernel; `lora_delta_segments` is the SGMV form (one matmul pair
per adapter segment). Weights are never merged into W, and the model runs one forward per step for all adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.serve.segments import BASE_SLOT, RowSlots, segments


def lora_delta_reference(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, slot_per_row: list[int]) -> torch.Tensor:
    """Plain per-row loop: delta (batch, seq, out); the semantics every fast path must reproduce."""
    delta = x.new_zeros(*x.shape[:-1], b_stack.shape[1])
    for row, slot in enumerate(slot_per_row):
        if slot != BASE_SLOT:
            delta[row] = (x[row] @ a_stack[slot].T) @ b_stack[slot].T
    return delta


def gather(a_stack: torch.Tensor, b_stack: torch.Tensor, route: RowSlots) -> tuple[torch.Tensor, torch.Tensor]:
    """Each adapter row's weights, transposed for bmm and made contiguous: A_g (k, in, r), B_g (k, r, out).

    Contiguous matters: on CPU, torch.bmm over transposed views ran ~3x slower than over contiguous copies
    (decode shapes k=32, in=576, r=8, measured in bench/serve_bench.py's setting). The copy is made once per batch
    composition (the layer caches it), not once per step, but compositions change whenever a request joins or
    leaves: with the stacks stored slot-major it is a single copy of the rows' weights.
    """
    a_g = a_stack.transpose(1, 2).index_select(0, route.slots).contiguous()  # one copy when the stack is stored
    b_g = b_stack.transpose(1, 2).index_select(0, route.slots).contiguous()  # slot-major (AdapterCache does)
    return a_g, b_g


def lora_delta_gathered(x: torch.Tensor, a_g: torch.Tensor, b_g: torch.Tensor, route: RowSlots) -> torch.Tensor:
    """delta for rows route.rows: bmm(bmm(x[rows], A_g), B_g), x_k (k, s, in) -> (k, s, r) -> (k, s, out)."""
    x_rows = x if route.all_rows else x.index_select(0, route.rows)
    return torch.bmm(torch.bmm(x_rows, a_g), b_g)


def lora_delta_bmm(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, route: RowSlots) -> torch.Tensor:
    """Gathered batched matmul for the adapter rows only (Punica BGMV in plain PyTorch): (k, seq, out)."""
    return lora_delta_gathered(x, *gather(a_stack, b_stack, route), route)


def lora_delta_segments(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, slot_per_row: list[int]) -> torch.Tensor:
    """Segment form: rows grouped by adapter, one (x_seg @ A.T) @ B.T per group; returns the full (batch, seq, out)."""
    delta = x.new_zeros(*x.shape[:-1], b_stack.shape[1])
    for slot, rows in segments(slot_per_row):
        index = torch.tensor(rows, device=x.device)
        delta.index_copy_(0, index, (x.index_select(0, index) @ a_stack[slot].T) @ b_stack[slot].T)
    return delta


class BatchContext:
    """The routing of the current forward pass, shared by every BatchedLoraLinear of one model (set per step)."""

    def __init__(self) -> None:
        self.route: RowSlots | None = None


class BatchedLoraLinear(nn.Module):
    """Wraps a base nn.Linear; adds per-row LoRA deltas from stacked weights according to `context.route`."""

    def __init__(self, base: nn.Linear, context: BatchContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.in_features, self.out_features = base.in_features, base.out_features
        # Plain attributes, not parameters/buffers: the cache owns and swaps them between steps.
        self.a_stack: torch.Tensor | None = None
        self.b_stack: torch.Tensor | None = None
        # Gathered weights of the last route: decode steps with unchanged rows reuse them (one gather per batch
        # composition, not per step). Safe because a slot in use is never rewritten and a regrown stack is a new tensor.
        self._gathered: tuple[RowSlots, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = self.context.route
        if route is None or route.empty or self.a_stack is None:
            return y
        x3 = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        cached = self._gathered
        if cached is None or cached[0] is not route or cached[1] is not self.a_stack or cached[2] is not self.b_stack:
            cached = self._gathered = (route, self.a_stack, self.b_stack, *gather(self.a_stack, self.b_stack, route))
        # y is this call's own fresh output, so the delta is added in place (no copy of y): baddbmm_ fuses the add
        # into the second matmul when every row has an adapter; otherwise index_add_ puts the rows' deltas back.
        y3 = y.view(y.shape[0], -1, y.shape[-1])  # a view (never a copy), so the in-place add lands in y
        if route.all_rows:
            y3.baddbmm_(torch.bmm(x3, cached[3]), cached[4])
        else:
            y3.index_add_(0, route.rows, lora_delta_gathered(x3, cached[3], cached[4], route))
        return y


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """module name -> (in, out) for every nn.Linear (or already wrapped one) of the model."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, BatchedLoraLinear):
            shapes[name] = (module.in_features, module.out_features)
        elif isinstance(module, nn.Linear) and not name.endswith(".base"):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def wrap_module(model: nn.Module, name: str, context: BatchContext) -> BatchedLoraLinear:
    """Replace model.<name> (an nn.Linear) by a BatchedLoraLinear around it, once; return the wrapper."""
    module = model.get_submodule(name)
    if isinstance(module, BatchedLoraLinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is {type(module).__name__}, not nn.Linear")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = BatchedLoraLinear(module, context)
    setattr(parent, child, wrapper)
    return wrapper
