"""peft's LoRA linear forward with the adapter's update accumulated into the base output in one matmul.

Semantics (x: (..., in), W: (out, in), b: (out,) or None, A: (r, in), B: (out, r), s = alpha / r):
    y = x @ W.T + b + s * (dropout(x) @ A.T) @ B.T
which is what peft's `lora.Linear.forward` computes as `result + lora_B(lora_A(dropout(x))) * scaling`. There
the update makes three (tokens, out) tensors in the forward pass (B's output, its scaled copy, the sum) and the
scaling is applied again to a (tokens, out) gradient in the backward pass. Here the update is one
`addmm_(a, B.T, alpha=s)` into the base output (the base output is saved by nothing, so it may be overwritten),
and its backward scales only the (tokens, r) and (out, r) gradients. On the reference model (LoRA r16 on every
linear layer, 4 x 1,024 tokens, fp32, 2 threads) those element-wise passes took ~0.7 s of a ~21 s step
(torch.profiler: mul and add over (4, 1,024, 1,536) and (4, 1,024, 576) tensors).

The update runs as one autograd Function (`LoraUpdate`) that keeps the target's input and the dropout's dropped
positions (methods/dropout.py) instead of the dropped input and its fp32 noise: the targets reading one input
(q/k/v, gate/up) keep it once. On the reference model (the same setup, dropout 0.05) the peak RSS of 3 steps fell
from 14.4 to 12.1 GB with a bool mask in place of the positions (the dropped input is recomputed in the backward
pass). The planner's LoRA terms (methods/lora.py) count what it keeps.

Why by hand: peft has no fused path for it. Taken only in the plain case: one active adapter, no variant (DoRA),
neither merged nor disabled, no LoRA bias, a plain nn.Linear base without hooks, no extra arguments, and matching
dtypes (an input of another dtype only under autocast; under autocast B is cast to the autocast dtype by hand, as autocast would for lora_B: an in-place matmul gets
no casts); everything else goes through peft's own forward. Tested against peft's forward (outputs and gradients,
with and without dropout) in tests/methods/test_lora_forward.py.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.methods.dropout import BulkDropout, zero_at, zero_at_


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance forward of a peft `lora.Linear` (see the module docstring); falls back to peft's forward."""
    adapter = _plain_adapter(self, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    base: nn.Linear = self.base_layer
    a_weight = self.lora_A[adapter].weight  # (r, in)
    b_weight = self.lora_B[adapter].weight  # (out, r)
    rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
    result = F.linear(rows, base.weight, base.bias)  # (tokens, out); under autocast in its dtype, as peft's
    dropout = self.lora_dropout[adapter]
    scaling = self.scaling[adapter]
    if isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and not (dropout.training and dropout.p > 0)):
        drops = None
    elif isinstance(dropout, BulkDropout) and dropout.p < 1:
        drops, keep_probability = dropout.drops(rows)
        scaling = scaling / keep_probability
    else:  # another dropout module: its mask is not exposed, so autograd's own ops
        result = _addmm_update(result, dropout(rows), a_weight, b_weight, scaling)
        return result.view(*x.shape[:-1], result.shape[-1])
    result = LoraUpdate.apply(result, rows.contiguous(), a_weight, b_weight, drops, scaling)
    return result.view(*x.shape[:-1], result.shape[-1])


def _addmm_update(result: torch.Tensor, dropped: torch.Tensor, a_weight: torch.Tensor, b_weight: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """result += scaling * (dropped @ A.T) @ B.T through autograd's own ops (a dropout module other than
    BulkDropout: its mask is not exposed)."""
    update = F.linear(dropped, a_weight)  # (tokens, r)
    if update.dtype != b_weight.dtype:  # autocast: the cast autocast would make for lora_B (an in-place op gets none)
        b_weight = b_weight.to(update.dtype)
    return result.addmm_(update, b_weight.t(), alpha=scaling)


class LoraUpdate(torch.autograd.Function):
    """result += s * (drop(x) @ A.T) @ B.T in place, with s the LoRA scaling divided by the keep probability
    (dropout's 1 / (1 - p) folded into the scalar: it multiplies a (tokens, r) product instead of a (tokens, in)
    tensor) and drop(x) the input with the dropout's dropped positions zeroed (`drops`, flat indices into x;
    None: no dropout).

    Why by hand: autograd through `x * noise` and `F.linear` keeps, per target, the dropped input and the fp32
    noise (8 bytes per input element; under autocast the 16-bit cast of the dropped input and the noise, 6). This
    Function keeps the input itself (one tensor for the targets that read it: q/k/v read the same norm output,
    gate/up the other) and the dropped positions (int32, 4p bytes per input element), and recomputes the dropped
    input in the backward pass for A's gradient; the input's gradient is zeroed at the positions in place. A's gradient is computed as (x.T @ g_update).T, the (in, tokens) @ (tokens, r) product
    BLAS runs ~1.6x faster on a CPU than (r, tokens) @ (tokens, in) at r = 16 (torch.profiler on the reference
    model). Under autocast the matmuls run in the base output's dtype, with the casts autocast would make.
    """

    @staticmethod
    def forward(ctx, result, rows, a_weight, b_weight, drops, scaling):
        dtype = result.dtype  # the autocast dtype under autocast (the base matmul's output), else the weights'
        with torch.autocast(rows.device.type, enabled=False):
            dropped = rows if drops is None else zero_at(rows, drops)
            update = dropped.to(dtype) @ a_weight.to(dtype).t()  # (tokens, r)
            result.addmm_(update, b_weight.to(dtype).t(), alpha=scaling)
        ctx.mark_dirty(result)
        ctx.save_for_backward(rows, drops, a_weight, b_weight, update)
        ctx.scaling = scaling
        return result

    @staticmethod
    def backward(ctx, grad):
        rows, drops, a_weight, b_weight, update = ctx.saved_tensors
        _, need_rows, need_a, need_b, _, _ = ctx.needs_input_grad
        dtype = update.dtype
        grad = grad.to(dtype)
        grad_rows = grad_a = grad_b = None
        with torch.autocast(rows.device.type, enabled=False):
            if need_b:
                grad_b = (grad.t() @ update).mul_(ctx.scaling).to(b_weight.dtype)  # (out, r)
            if need_rows or need_a:
                grad_update = (grad @ b_weight.to(dtype)).mul_(ctx.scaling)  # (tokens, r)
            if need_a:
                dropped = rows if drops is None else zero_at(rows, drops)
                grad_a = (dropped.to(dtype).t() @ grad_update).t().to(a_weight.dtype)  # (r, in)
            if need_rows:
                grad_rows = (grad_update @ a_weight.to(dtype)).to(rows.dtype)  # (tokens, in), contiguous
                if drops is not None:
                    zero_at_(grad_rows, drops)
        return grad, grad_rows, grad_a, grad_b, None, None


def _plain_adapter(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active adapter when the plain case holds (module docstring), else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
        return None
    adapter = active[0]
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[adapter], layer.lora_B[adapter]
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return None
    if lora_a.bias is not None or lora_b.bias is not None:
        return None
    if not base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype:
        return None
    # under autocast a layer may read a 16-bit input on fp32 weights (o_proj: SDPA's output; down_proj: the MLP
    # product); the matmuls then run in the autocast dtype, as peft's would
    if x.dtype != base.weight.dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        return None
    return adapter


def use_fused_lora_forward(model: nn.Module) -> int:
    """Give every peft `lora.Linear` (exactly that class: not the quantized ones) the fused forward; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    replaced = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(fused_lora_forward, module)
            replaced += 1
    return replaced
