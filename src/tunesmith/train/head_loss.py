"""The output head and the cross-entropy in one chunked pass: no logits-sized buffers (Liger-Kernel's fused
linear cross-entropy, Hsu et al. 2024, "Liger Kernel", section 3.2; here in plain PyTorch).

Semantics (hidden: (N, d) the final hidden states at labelled positions, W: (V, d) the head, b: (V,) or None,
t: (N,) the next tokens):
    loss = sum_i CE(hidden[i] @ W.T + b, t[i]) == F.cross_entropy(F.linear(hidden, W, b).float(), t, reduction="sum")
The rows are taken `rows` at a time. For each chunk c the logits z_c = h_c @ W.T are computed into a reused
(rows, V) buffer, p_c = log_softmax(z_c) in fp32 gives the loss, and, since the loss is a sum, its gradients are
computed right there, in the forward pass:
    G_c = softmax(z_c) - onehot(t_c)      dL/dh_c = G_c @ W      dL/dW += G_c.T @ h_c      dL/db += sum_rows G_c
The backward pass only scales the stored gradients by the incoming gradient (the loop's 1/N). What is never held:
the (N, V) logits, their fp32 copy, the saved log-softmax output and the logits' gradient, 3-4 buffers of N x V x 4
bytes (1.1 GB for 1,913 labelled positions of a 49,152-word vocabulary), which the allocator maps and faults in
afresh on every step. Under 16-bit compute (autocast, or 16-bit weights) the two matmuls run in that dtype and the
softmax in fp32, as the module path does (autocast's linear, then `.float()`).

Why by hand: Liger-Kernel's version is a Triton (GPU) kernel and its chunked-loss variant goes through
torch.compile; neither PyTorch nor transformers has one. Tested against the module path (loss and gradients of the
hidden states, the head weight and its bias) in tests/train/test_head_loss.py.

Where the model's forward changes the head's output before returning it (Gemma's logit soft-capping, Cohere's
scale, Granite's division, ...) the loss must see the changed logits, so `fused_head_applies` probes the model
once: it runs two tokens through it with the head replaced by a stub and checks that the logits returned are the
stub itself. Only then does forward_loss (train/loop.py) take this path.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from tunesmith.models.head import chunk_rows
from tunesmith.train import sharding


def _chunked(hidden, weight, bias, targets, rows: int, compute_dtype, need: tuple[bool, bool, bool]):
    """The loss sum and, where `need` says (hidden, weight, bias), its gradients; see the module docstring."""
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    rows = min(rows, max(n_rows, 1))  # buffers sized in models/head.py (fused_head_bytes counts them)
    logits = torch.empty(rows, vocab, dtype=compute_dtype, device=device)
    as_float = logits if compute_dtype == torch.float32 else torch.empty(rows, vocab, dtype=torch.float32, device=device)
    log_probs = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    grad_hidden = torch.empty(n_rows, width, dtype=hidden.dtype, device=device) if need[0] else None
    grad_weight = torch.zeros(vocab, width, dtype=torch.float32, device=device) if need[1] else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need[2] else None
    loss = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        n = stop - start
        h = hidden[start:stop].to(compute_dtype)
        t = targets[start:stop]
        z = torch.mm(h, w.t(), out=logits[:n])  # (n, V)
        if b is not None:
            z.add_(b)
        zf = z if as_float is logits else as_float[:n].copy_(z)
        p = torch.ops.aten._log_softmax.out(zf, 1, False, out=log_probs[:n])  # log-probabilities, fp32
        loss -= p.gather(1, t[:, None]).sum()
        if not any(need):
            continue
        p.exp_()  # softmax
        p[torch.arange(n, device=device), t] -= 1.0  # G = softmax - onehot: dL/dz
        g = p if compute_dtype == torch.float32 else logits[:n].copy_(p)
        if grad_hidden is not None:
            if grad_hidden.dtype == compute_dtype:
                torch.mm(g, w, out=grad_hidden[start:stop])
            else:
                grad_hidden[start:stop] = torch.mm(g, w)
        if grad_weight is not None:
            if compute_dtype == torch.float32:
                grad_weight.addmm_(g.t(), h)
            else:
                grad_weight += torch.mm(g.t(), h)
        if grad_bias is not None:
            grad_bias += g.sum(0, dtype=torch.float32)
    return loss, grad_hidden, grad_weight, grad_bias


class _LinearCrossEntropySum(torch.autograd.Function):
    """Autograd wrapper: the forward computes the loss and its gradients, the backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, compute_dtype):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, *grads = _chunked(hidden, weight, bias, targets, rows, compute_dtype, need)
        # Kept as attributes, not save_for_backward: they are neither inputs nor outputs, and the backward scales
        # them in place (they are ours alone), so a second backward through the same graph is refused.
        ctx.grads = grads
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("head_cross_entropy_sum: backward ran twice through the same graph")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        scale = grad_loss.to(torch.float32)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(scale).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None


def head_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                           rows: int | None = None) -> torch.Tensor:
    """sum_i CE(head(hidden[i]), targets[i]) in fp32, chunked (module docstring). hidden: (N, d); targets: (N,).

    Computes in the autocast dtype when autocast is on for the device (as `head(hidden)` would), else in the
    head's dtype. Gradients flow to hidden, head.weight and head.bias as through `head(hidden)`."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = head.weight.dtype
    rows = rows or chunk_rows(head.weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        if not torch.is_grad_enabled():
            return _chunked(hidden, head.weight, head.bias, targets, rows, compute_dtype, (False, False, False))[0]
        return _LinearCrossEntropySum.apply(hidden, head.weight, head.bias, targets, rows, compute_dtype)


_APPLIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_head_applies(model, head: torch.nn.Module | None) -> bool:
    """Whether forward_loss may compute the loss from the head's input: `head` is a plain nn.Linear on real memory
    (not a LoRA-wrapped, quantized, offloaded or FSDP-sharded head) and the model returns the head's output as its
    logits, unchanged (probed once per head with two tokens, then remembered)."""
    if type(head) is not torch.nn.Linear or head.weight.device.type == "meta" or hasattr(head, "_hf_hook"):
        return False
    if head not in _APPLIES:
        _APPLIES[head] = not sharding.fsdp_units(model) and _returns_head_output(model, head)
    return _APPLIES[head]


def _returns_head_output(model, head: torch.nn.Linear) -> bool:
    """Run two tokens with the head replaced by a stub; True if the model's logits are that very stub."""
    stub = {}

    def stub_forward(hidden):
        stub["out"] = hidden.new_zeros(*hidden.shape[:-1], 1)
        return stub["out"]

    modes = {module: module.training for module in model.modules()}
    model.eval()  # no dropout: the probe draws no random numbers
    try:
        with swapped_forward(head, stub_forward), torch.no_grad():
            device = head.weight.device
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    except Exception:  # a model that cannot run this probe keeps the module path (correct, only slower)
        return False
    finally:
        for module, training in modes.items():
            module.training = training
    logits = getattr(out, "logits", None)
    return logits is not None and logits is stub.get("out")


@contextlib.contextmanager
def swapped_forward(module: torch.nn.Module, forward):
    """`module.forward` is `forward` inside the block, restored afterwards (an instance attribute that was there
    before, e.g. a wrapper's, comes back)."""
    before = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before
