"""Fewer passes over memory for two element-wise pieces of Llama-family decoder layers, for CPU training.

On a CPU the element-wise work of a training step is bound by memory traffic, not arithmetic: torch runs every
operator of a formula as its own pass over the tensor, and autograd adds one or more passes per operator in the
backward pass. Two formulas of every decoder layer are written here as autograd Functions whose forward and backward
passes each touch the tensor a minimal number of times (torch.compile would fuse them, but it needs a C++ compiler
at run time, which a fresh machine may lack, and compiling the decoder layers was slower than eager on these CPUs:
docs/benchmarks.md). Both keep for the backward pass exactly what transformers' own code keeps, so the planner's
activation terms do not change (tests/models/test_fused_ops.py counts the saved tensors of both).

RMSNorm with a frozen weight, y = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) (LlamaRMSNorm, fp32 input):
    forward   rstd from one reduction (vector_norm: no x^2 tensor), y = (x * rstd) * w in place: 2 passes (eager: 3,
              and an x^2 temporary)
    backward  gw = g * w; dx = rstd * gw - x * rstd^3 * (gw . x) / d: 3 passes and one row reduction (vecdot) (eager: 6)
    kept      x and rstd (eager keeps the same two: pow's and mul's input x, rsqrt's output; the frozen weight's mul
              keeps nothing of the activations)
A trained norm weight (full fine-tuning) keeps transformers' forward (its gradient needs x * rstd, which eager keeps).

Rotary position embedding, x' = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1):
    forward   x * cos, then the two halves' sin terms added in place (addcmul_): 2 passes (eager: ~5 plus a cat)
    backward  the transpose: g * cos, then dx1 += g2 * sin2, dx2 -= g1 * sin1 in place: 2 passes (eager: ~5)
    kept      cos and sin (what eager's two multiplications keep)
Used where q, k, cos and sin share one dtype (fp32 training); under 16-bit autocast transformers' function runs,
and so does transformers' norm (`rms_norm_forward`): both are fp32-training changes.

`fused_norm_and_rotary(model)` installs both for the duration of a block (the trainer's, on CPUs), where the
model's code is Llama's formula (compared by bytecode: Llama, Mistral, Qwen2/3, Granite, ...; not Gemma), and restores the
model and transformers' modules after. Tested against transformers' own functions (outputs and gradients) in
tests/models/test_fused_ops.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class FrozenRMSNorm(torch.autograd.Function):
    """w * x * rstd over the last dimension, w not trained (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd)
        ctx.weight = weight  # a frozen parameter, not an activation
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd = ctx.saved_tensors
        gw = grad * ctx.weight
        # d/dx of x * rstd(x): rstd * gw - x * rstd^3 * (gw . x) / d
        coef = torch.linalg.vecdot(gw, x).unsqueeze_(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
        return gw.mul_(rstd).addcmul_(x, coef), None, None


class Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, cos and sin already broadcastable to x (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        dx = grad * cos
        dx[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        dx[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return dx, None, None


def rms_norm_forward(original):
    """A forward for a Llama-formula RMSNorm module: the Function where its weight is frozen, the input and weight
    are fp32 and no autocast is on, else the module's own forward. (Under bf16 autocast the norm's input is fp32 too
    and the Function would apply, but its effect on the whole-process peak, which it lowers through fewer
    temporaries, was measured only in fp32 training: the planner's fitted heap terms for autocast stay valid.)"""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if (self.weight.requires_grad or hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32
                or torch.is_autocast_enabled(hidden_states.device.type)):
            return original(self, hidden_states)
        return FrozenRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)

    return forward


def rotary_function(original):
    """apply_rotary_pos_emb's signature: the Function where q, k, cos and sin share a dtype, else the original."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not q.dtype == k.dtype == cos.dtype == sin.dtype:
            return original(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)

    return apply_rotary_pos_emb


def _code(function) -> tuple:
    return function.__code__.co_code, function.__code__.co_names, function.__code__.co_consts[1:]


def same_formula(function, reference) -> bool:
    """Whether `function` compiles to `reference`'s bytecode (names and constants too; docstrings aside): transformers
    copies Llama's norm and rotary code into many model files, and only such copies are replaced."""
    return _code(function) == _code(reference)


def _targets(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list]:
    """`model`'s RMSNorm modules whose forward is Llama's, and the transformers modules of its layers whose
    apply_rotary_pos_emb and rotate_half are Llama's."""
    from transformers.models.llama import modeling_llama as llama

    norms, files = [], {}
    for module in model.modules():
        cls = type(module)
        if cls.__name__.endswith("RMSNorm") and same_formula(cls.forward, llama.LlamaRMSNorm.forward):
            norms.append(module)
        source = sys.modules.get(cls.__module__)
        if source is not None and cls.__module__.startswith("transformers.models."):
            files[cls.__module__] = source
    rotary = [m for m in files.values()
              if callable(getattr(m, "apply_rotary_pos_emb", None)) and callable(getattr(m, "rotate_half", None))
              and same_formula(m.apply_rotary_pos_emb, llama.apply_rotary_pos_emb)
              and same_formula(m.rotate_half, llama.rotate_half)]
    return norms, rotary


@contextmanager
def fused_norm_and_rotary(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, `model`'s Llama-formula RMSNorm modules and the rotary embedding of its Llama-formula model
    files run the Functions above (module docstring); everything is restored after."""
    norms, files = _targets(model)
    patched = [m for m in norms if "forward" not in vars(m)]
    for module in patched:
        module.forward = rms_norm_forward(type(module).forward).__get__(module)
    originals = [(m, m.apply_rotary_pos_emb) for m in files]
    for m, original in originals:
        m.apply_rotary_pos_emb = rotary_function(original)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
        for m, original in originals:
            m.apply_rotary_pos_emb = original
