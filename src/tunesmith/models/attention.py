"""Per-example causal attention over packed rows (CPU training), registered with transformers' attention interface.

A packed row holds several examples back to back. The reference computation is SDPA with the additive 4-D
block-diagonal causal mask of `data/pack.py` (`block_diagonal_mask`): query i of example e attends to keys j of the
same example with j <= i. With such a mask torch's CPU SDPA kernel computes every (query, key) block of the row,
seq x seq per head, and masks most of them out afterwards. Here each example is its own causal SDPA call instead:

    out[b, s_e : s_e + n_e] = SDPA(q[b, s_e : s_e + n_e], k[b, ...], v[b, ...], is_causal=True)

for every example e of row b (lengths `segment_lengths[b]`, starting at s_e = n_0 + ... + n_(e-1)); positions after
a row's last example (padding) get zeros, which no real token reads and no loss counts. The work falls from
seq^2 to about sum(n_e^2) / 2 per row and head, and no float seq x seq mask is built, cast or kept (transformers
still builds its boolean padding mask, (batch, 1, seq, seq), once per forward pass when a row is padded; this
function ignores it). Key/value heads are not repeated for grouped-query attention (`enable_gqa`).

Why by hand: transformers' own varlen path (FlashAttention-2 with `cu_seq_lens`) needs a CUDA kernel, and its
SDPA path turns packed position ids back into a dense 4-D mask. FlexAttention's block masks would skip the empty
blocks but run through `torch.compile` (not tried: compiling the decoder layers was slower than eager on these
CPUs, docs/benchmarks.md).

The implementation is registered under `SEGMENT_ATTENTION`. A call without `segment_lengths` (generation, scoring)
is plain SDPA with transformers' own mask, so a model left on this implementation stays correct; the trainer
switches a model to it only for the duration of training (`segment_attention`). Tested against the block-mask
reference (logits and gradients) in tests/models/test_segment_attention.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it runs: the planner imports this module for its rule alone
    import torch

SEGMENT_ATTENTION = "tunesmith_segments"


def segment_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None,
                              segment_lengths: Sequence[Sequence[int]] | None = None,
                              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: query (batch, heads, seq, dim), key/value (batch, kv_heads,
    seq, dim) -> (output (batch, seq, heads, dim), None). With `segment_lengths` (per row, the lengths of its
    examples in order) the mask is ignored and every example attends causally within itself (module docstring)."""
    if segment_lengths is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    import torch
    import torch.nn.functional as F

    batch, heads, seq, dim = query.shape
    if key.shape[2] != seq or len(segment_lengths) != batch:
        raise ValueError(f"segment attention: {len(segment_lengths)} rows of segment lengths for queries "
                         f"{tuple(query.shape)} and keys {tuple(key.shape)} (no cache or prefix allowed)")
    gqa = key.shape[1] != heads
    rows = []
    # split, not slicing: the backward of a split is one concatenation, while every slice's backward fills a
    # zero tensor of the whole input and adds into it (measured: ~0.4 s of a ~21 s step on the reference model)
    for row, (q_row, k_row, v_row, lengths) in enumerate(zip(query.split(1), key.split(1), value.split(1),
                                                            segment_lengths, strict=True)):
        start = sum(lengths)
        if start > seq:
            raise ValueError(f"segment attention: row {row} has segments of {start} tokens for a row of {seq}")
        sizes = [*lengths, seq - start] if start < seq else list(lengths)
        parts = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                enable_gqa=gqa)
                 for q, k, v, _ in zip(q_row.split(sizes, dim=2), k_row.split(sizes, dim=2), v_row.split(sizes, dim=2),
                                       lengths, strict=False)]
        if start < seq:
            parts.append(query.new_zeros(1, heads, seq - start, dim))
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if batch > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `SEGMENT_ATTENTION` a transformers attention implementation (idempotent). Its mask function is SDPA's,
    so calls without segment lengths (generation) get the usual padding/causal mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention_forward)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)


def segment_attention_applies(device_type: str, attn_implementation: str | None, packing: bool,
                              virtual_tokens: bool) -> bool:
    """Whether the trainer runs packed rows through per-example attention instead of the 4-D block mask: packing
    on a CPU with transformers' SDPA kernel, for methods that add no virtual positions (prefix and prompt tuning
    put their prefix in front of every example, which per-example slices of the row cannot describe). GPUs keep
    the mask (measured on CPUs only; FlashAttention-2, `model.attn_implementation`, is the GPU varlen path)."""
    return packing and device_type == "cpu" and (attn_implementation or "sdpa") == "sdpa" and not virtual_tokens


def model_config(model):
    """The transformers config the attention layers read, through DDP/FSDP and peft wrappers (the same object)."""
    inner = getattr(model, "module", model)
    return inner.config


@contextmanager
def segment_attention(model) -> Iterator[None]:
    """Run `model` on `SEGMENT_ATTENTION` inside the block (forward and backward passes, checkpoint recomputation
    included), then restore its implementation."""
    register()
    config = model_config(model)
    before = config._attn_implementation
    config._attn_implementation = SEGMENT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
