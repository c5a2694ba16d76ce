"""Activation memory of one training step: what autograd saves, per decoder layer and per token.

The coefficients below were measured with `torch.autograd.graph.saved_tensors_hooks` (unique storages, parameters
excluded) on transformers 5.24 Llama-family decoders with SDPA attention, varying each width on its own
(h = hidden, i = intermediate, q = heads*head_dim, k = kv_heads*head_dim, a = heads, r = LoRA rank); the test
tests/plan/test_plan_memory.py re-measures them on a tiny model (within 8%). Elements per token per layer:

    trained base weights (full):  6h + 2q + 4i + 2k + a + 2
        (norm input and x*rsqrt and output for both norms, rotated q, SDPA output, gate/silu/up/product, k and v,
         the SDPA log-sum-exp)
    frozen base ("core"):         2h + 2q + 3i + 2k + a + 2
      + h   if a LoRA target without dropout reads the attention norm output (q/k/v)
      + h   ... the MLP norm output (gate/up);  + i  ... the MLP product (down)
      + 2*in  per LoRA target with dropout (the dropped input and its mask, both saved at activation width)
      + r   per LoRA target (the A output that B saves)
      QLoRA: + 2h + i always (bitsandbytes' 4-bit matmul keeps its input), without double counting the above
    prompt tuning: the frozen core over seq + virtual tokens
    prefix tuning: the frozen core + 2h (the residual stream now requires grad through the prefix keys/values)
    adapters:      the frozen core + per adapter (its input, the relu output; + the pre-activation for gelu/silu):
                   2 * (h + m) with relu
    gradient checkpointing: h per layer (the layer input) + one layer recomputed in the backward pass

Logits: (batch, seq, vocab) in fp32 are held 4 times at the start of the backward pass (measured by RSS on the
reference model, bench/memory_accuracy.py: the logits, the saved
log-softmax output, its gradient, the logits' gradient); with 16-bit weights the 16-bit logits add 2 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.config import MethodConfig
from tunesmith.models.facts import ModelFacts
from tunesmith.plan.counts import lora_targets


@dataclass(frozen=True)
class ActivationEstimate:
    per_layer_elements_per_token: float
    saved_bytes: int  # all layers, what autograd keeps until the backward pass
    logits_bytes: int  # logits-sized buffers alive at the start of the backward pass
    recompute_bytes: int  # one layer recomputed under gradient checkpointing (0 without)
    seq_effective: int

    @property
    def peak_bytes(self) -> int:
        return self.saved_bytes + self.logits_bytes + self.recompute_bytes


def _core(f: ModelFacts) -> float:
    h, i, q, k, a = f.hidden_size, f.intermediate_size, f.num_heads * f.head_dim, f.kv_width, f.num_heads
    return 2 * h + 2 * q + 3 * i + 2 * k + a + 2


def layer_elements_per_token(f: ModelFacts, method: MethodConfig) -> float:
    """Activation elements autograd saves per token in one decoder layer (see the module docstring)."""
    h, i, q, k, a = f.hidden_size, f.intermediate_size, f.num_heads * f.head_dim, f.kv_width, f.num_heads
    name = method.name
    if name == "full":
        return 6 * h + 2 * q + 4 * i + 2 * k + a + 2
    if name in ("lora", "qlora"):
        lo = method.lora
        layer0 = [m for m in lora_targets(f, lo.target_modules) if m.layer == 0]
        extra = 0.0
        for group, width in ((("q_proj", "k_proj", "v_proj"), h), (("gate_proj", "up_proj"), h), (("down_proj",), i)):
            hit = [m for m in layer0 if m.short in group]
            if hit and lo.dropout == 0:
                extra += width
        if lo.dropout > 0:
            extra += sum(2 * m.in_features for m in layer0)
        extra += lo.r * len(layer0)
        if name == "qlora":
            # bitsandbytes' MatMul4Bit keeps its input on ctx for every 4-bit layer, trained or not: both norm
            # outputs and the MLP product stay alive (the attention output is a view of SDPA's, already counted).
            extra += 2 * h + i - sum(
                w for group, w in ((("q_proj", "k_proj", "v_proj"), h), (("gate_proj", "up_proj"), h), (("down_proj",), i))
                if lo.dropout == 0 and any(m.short in group for m in layer0)
            )
        return _core(f) + extra
    if name == "prompt":
        return _core(f)
    if name == "prefix":
        return _core(f) + 2 * h
    if name == "adapters":
        m = h // method.adapters.reduction_factor
        # Per adapter: its input (for the down-projection's weight gradient) and the bottleneck activation (relu
        # saves its output, which the up-projection also saves); gelu/silu/tanh keep their input as well.
        per_adapter = h + m + (m if method.adapters.nonlinearity != "relu" else 0)
        return _core(f) + 2 * per_adapter
    raise ValueError(f"method.name: unknown method {name!r}")


def activation_estimate(
    f: ModelFacts,
    method: MethodConfig,
    batch_size: int,
    seq_len: int,
    act_bytes: int,
    gradient_checkpointing: bool,
) -> ActivationEstimate:
    """Bytes of activations for one micro-batch. act_bytes = 4 (fp32) or 2 (bf16/fp16 compute).

    Under 16-bit compute RMSNorm upcasts to fp32, so each of the two norms saves an extra fp32 copy (4h bytes).
    """
    seq = seq_len + (method.prompt.num_virtual_tokens if method.name == "prompt" else 0)
    tokens = batch_size * seq
    per_layer = layer_elements_per_token(f, method)
    norm_upcast = 2 * f.hidden_size * 4 if act_bytes < 4 else 0  # bytes per token per layer
    layer_bytes = tokens * (per_layer * act_bytes + norm_upcast)
    if gradient_checkpointing:
        saved = f.num_layers * tokens * f.hidden_size * act_bytes
        recompute = int(layer_bytes)
    else:
        saved = int(f.num_layers * layer_bytes)
        recompute = 0
    # Outside the layer stack: the final norm (input, x*rsqrt, output) when its weight trains, else its output.
    saved += tokens * (3 if method.name == "full" else 1) * f.hidden_size * act_bytes
    logits = tokens * f.vocab_size * (4 * 4 if act_bytes == 4 else 3 * 4 + act_bytes)
    return ActivationEstimate(per_layer, int(saved), int(logits), recompute, seq)
