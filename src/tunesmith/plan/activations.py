"""Activation memory of one training step: what autograd saves, per decoder layer and per token.

The coefficients below were measured with `torch.autograd.graph.saved_tensors_hooks` (unique storages, parameters
excluded) on transformers 5.24 Llama-family decoders with SDPA attention, varying each width on its own
(h = hidden, i = intermediate, q = heads*head_dim, k = kv_heads*head_dim, a = heads, r = LoRA rank); the test
tests/plan/test_plan_memory.py re-measures them on a tiny model (within 8%). Elements per token per layer:

    trained base weights (full):  6h + 2q + 4i + 2k + a + 2
        (norm input and x*rsqrt and output for both norms, rotated q, SDPA output, gate/silu/up/product, k and v,
         the SDPA log-sum-exp)
    frozen base ("core"):         2h + 2q + 3i + 2k + a + 2
      LoRA's fused update (methods/lora_forward.py):
      + h   if a LoRA target reads the attention norm output (q/k/v), once
      + h   ... the MLP norm output (gate/up);  + i  ... the MLP product (down)
      + q   ... the attention output (o_proj), under per-example attention only (else a view of SDPA's output)
      + p*in  per LoRA target with dropout at rate p (its dropped positions, int32)
      + r   per LoRA target (the A output that B saves)
      QLoRA (peft's own forward): the groups' inputs only for targets without dropout, + 2*in per target with
      dropout (the dropped input and its mask, both at activation width), + r per target, and + 2h + i always
      (bitsandbytes' 4-bit matmul keeps its input), without double counting
    prompt tuning: the frozen core over seq + virtual tokens
    prefix tuning: the frozen core + 2h (the residual stream now requires grad through the prefix keys/values)
    adapters:      the frozen core + per adapter (its input, the relu output; + the pre-activation for gelu/silu):
                   2 * (h + m) with relu
    gradient checkpointing: h per layer (the layer input) + one layer recomputed in the backward pass

Under 16-bit autocast on fp32 weights (`tunesmith train` on a CPU with native bf16: precision auto resolves to bf16
and train/loop.py forward_loss runs under torch.autocast) the same measurement through the trainer's own
forward_loss (tests/plan/test_plan_memory.py::test_autocast_formula_matches_saved_tensors, within 8%) gives BYTES
per token per layer (`Method.layer_autocast_bytes`; kv = q when a 4-D mask makes transformers repeat the key/value
heads before SDPA: packing and prefixes):
    frozen core:    4 (2h + a + 2) + 2 (3i + 2q + 2kv)   norms (input, rsqrt), log-sum-exp fp32; MLP/attention bf16
    full:           4 (4h + a + 2) + 2 (5h + 4i + 2q + 2kv)   every matmul keeps its own bf16 cast of its input
    LoRA:           core + each input its targets read, once, in its dtype (4h q/k/v, 4h gate/up, 2i down,
                    2q o_proj under per-example attention) + per target with dropout its dropped positions (4p*in) + 2r
    QLoRA:          core + per target 6 in (dropout: fp32 mask + bf16 cast; without dropout 2 in: A's own cast,
                    not shared between targets as in fp32) + 2r
                    + 2 x 3i (bitsandbytes returns fp32, so gate/silu/up stay fp32; nothing else kept)
    adapters:       core + 2 x (2h + 2m (+ 2m for gelu/silu))
    prefix/prompt:  the core (no +2h)
  + every matmul's fp32 weight cast to bf16 and kept for the backward pass: 2 bytes x (decoder Linear weights +
    the output layer) (QLoRA: the head only; checkpointing: the head + the recomputed layer's)
  + the packed 4-D mask: the fp32 original once + a bf16 cast per layer (autocast casts it in every SDPA call);
    prefix tuning keeps a (batch, 1, seq, prefix + seq) mask per layer
  + the residual stream (checkpointed layer inputs, the final norm) in fp32.

Logits. The trainer (train/loop.py forward_loss) computes logits only at labelled positions N (those whose next
token is a target; N = labelled_fraction * batch * seq, all positions when the data is not known): the head
runs on the selected hidden states, (1, N, vocab). What lives at the start of the backward pass is then the saved
log-softmax output (fp32), its gradient and the logits' gradient, 3 x 4 bytes per element (the head's own output
is dropped when forward_loss returns); under 16-bit compute the gradient cast back to 16 bits adds 2 bytes.
Where the head is a plain linear layer whose output the model returns unchanged (train/head_loss.py; the planner
guesses it from the config: models/head.py `config_returns_head_output`), the trainer runs head and loss in chunks
instead, and none of those buffers exists: what it holds at the end of the forward pass is the hidden states'
gradient (N x d, fp32) and one chunk's buffers (models/head.py `fused_head_bytes`).
Methods that re-align the logits (prompt tuning prepends virtual positions: `Method.selective_logits` is False)
take the full path: (batch, seq, vocab) in fp32 held 3 times at once (in the backward pass the saved log-softmax
output, its gradient and the logits' gradient; in the forward pass the logits, their shifted copy when a batch of
several rows makes the slice non-contiguous, and the log-softmax output), + 2 bytes of the 16-bit logits under
16-bit compute. Measured by peak RSS (tests/plan/test_plan_memory.py::test_full_logits_path_holds_three_fp32_copies:
2.8-3.0 copies in fp32; the 4 copies assumed before 2026-12-02 counted the fp32 logits beside their own no-op
`.float()` cast).
Attention: SDPA (or flash attention) keeps no seq x seq score matrix, only the log-sum-exp per head and token.
Packing (every method that supports it) feeds SDPA an additive 4-D block-diagonal mask, (batch, 1, seq, seq) in
the compute dtype, which autograd keeps once for all layers (measured with saved_tensors_hooks: ~1-1.25 x that).
On CPUs `tunesmith train` runs packed rows through per-example attention instead (models/attention.py; methods
without virtual tokens): no mask is kept, and under autocast neither its casts nor repeated key/value heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunesmith.methods.registry import get_method
from tunesmith.models.facts import ModelFacts
from tunesmith.models.head import fused_head_bytes

if TYPE_CHECKING:
    from tunesmith.config import MethodConfig


@dataclass(frozen=True)
class ActivationEstimate:
    per_layer_elements_per_token: float
    saved_bytes: int  # all layers, what autograd keeps until the backward pass
    logits_bytes: int  # the head's and the loss's buffers alive at the end of the forward pass
    recompute_bytes: int  # one layer recomputed under gradient checkpointing (0 without)
    seq_effective: int
    weight_cast_bytes: int = 0  # 16-bit casts of fp32 weights that autocast makes and autograd keeps
    forward_layer_bytes: int = 0  # what the layers allocate and keep in one forward pass without checkpointing

    @property
    def peak_bytes(self) -> int:
        return self.saved_bytes + self.logits_bytes + self.recompute_bytes + self.weight_cast_bytes


def layer_elements_per_token(f: ModelFacts, method: MethodConfig) -> float:
    """Activation elements autograd saves per token in one decoder layer: the method's own term (see the module
    docstring for the measured coefficients; each method states its term in its module)."""
    return get_method(method.name).layer_activation_elements(f, method)


def activation_estimate(
    f: ModelFacts,
    method: MethodConfig,
    batch_size: int,
    seq_len: int,
    act_bytes: int,
    gradient_checkpointing: bool,
    labelled_fraction: float = 1.0,
    autocast: bool = False,
    segment_attention: bool = False,
    fused_head: bool = False,
) -> ActivationEstimate:
    """Bytes of activations for one micro-batch. act_bytes = 4 (fp32) or 2 (bf16/fp16 compute).

    Under 16-bit compute RMSNorm upcasts to fp32, so each of the two norms saves an extra fp32 copy (4h bytes).
    autocast=True: fp32 weights under 16-bit autocast (tunesmith train on a CPU with native bf16): the layers'
    bytes come from `Method.layer_autocast_bytes`, the residual stream (checkpointed layer inputs, final norm) stays
    fp32, every layer keeps its own 16-bit cast of the attention mask, and the weight casts are counted.
    segment_attention=True: packed rows go through per-example attention (models/attention.py, `tunesmith train`
    on CPUs): no 4-D mask is kept or cast, and the key/value heads are not repeated.
    fused_head=True: the head and the loss run in chunks (train/head_loss.py), for methods with selective logits.
    """
    owner = get_method(method.name)
    seq = seq_len + owner.virtual_tokens(method)
    tokens = batch_size * seq
    per_layer = layer_elements_per_token(f, method)
    if segment_attention:
        per_layer += owner.per_example_attention_elements(f, method)
    if autocast:
        layer_bytes = tokens * owner.layer_autocast_bytes(f, method, mask_4d=not segment_attention)
        stream_bytes = 4  # the residual stream (and the final norm) stays fp32
    else:
        norm_upcast = 2 * f.hidden_size * 4 if act_bytes < 4 else 0  # bytes per token per layer
        layer_bytes = tokens * (per_layer * act_bytes + norm_upcast)
        stream_bytes = act_bytes
    if gradient_checkpointing:
        saved = f.num_layers * tokens * f.hidden_size * stream_bytes
        recompute = int(layer_bytes)
    else:
        saved = int(f.num_layers * layer_bytes)
        recompute = 0
    # Outside the layer stack: the final norm (input, x*rsqrt, output) when its weight trains, else its output. The
    # chunked head loss keeps no input (its gradients are made in the forward pass): no output, measured
    # (tests/plan/test_plan_memory.py::test_autocast_formula_matches_saved_tensors).
    fused = fused_head and owner.selective_logits  # the chunked loss is taken on the selective-logits path only
    final_norm = (2 if fused else 3) if owner.trains_base_weights else 1
    saved += tokens * final_norm * f.hidden_size * stream_bytes
    mask, per_layer_mask = (0, False) if segment_attention else owner.attention_mask_elements(method, batch_size, seq)
    if autocast:  # per layer 16-bit casts (one under checkpointing: the recomputed layer's); packing's fp32 original
        copies = 1 if gradient_checkpointing else f.num_layers
        saved += mask * 2 * copies + (0 if per_layer_mask else mask * 4)
    elif mask:
        saved += mask * act_bytes * (f.num_layers if per_layer_mask and not gradient_checkpointing else 1)
    if owner.selective_logits:
        labelled = math.ceil(labelled_fraction * batch_size * seq_len)
        if fused:
            logits = fused_head_bytes(labelled, f.hidden_size, f.vocab_size, act_bytes)
        else:
            logits = labelled * f.vocab_size * (3 * 4 + (act_bytes if act_bytes < 4 else 0))
    else:
        logits = tokens * f.vocab_size * (3 * 4 + (act_bytes if act_bytes < 4 else 0))
    casts = 2 * owner.autocast_weight_casts(f, method, gradient_checkpointing) if autocast else 0
    return ActivationEstimate(per_layer, int(saved), int(logits), recompute, seq, casts, int(f.num_layers * layer_bytes))
