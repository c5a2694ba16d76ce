"""QLoRA (Dettmers et al., 2023): LoRA on a base quantized to 4-bit NormalFloat, through bitsandbytes + peft.

Storage per quantized weight matrix with n weights, block size 64 (constants' second level in blocks of 256):
    4 bits per weight (two per byte)
    + absmax constants: 32 bits per 64 weights = 0.5 bit/param, or with double quantization
      8 bits per 64 weights + 32 bits per 64*256 weights = 0.127 bit/param (paper section 3)
Compute: each matmul dequantizes its block to the compute dtype (bf16 where the hardware runs it natively, fp32
otherwise: see models/hardware.py) and adds the LoRA path x A^T B^T * alpha/r in that dtype.
`prepare_model_for_kbit_training` casts the remaining small parameters (norms) to fp32 and makes the input
embeddings' output require grad, so gradients reach the adapters through the frozen quantized stack.

Merging cannot add B A into 4-bit weights without a second rounding, so `merge` dequantizes the base to the compute
dtype first and merges LoRA into that plain model; the merged model is NOT the model that was trained (that one
had the quantization error), and tunesmith merge reports the logit difference between the two.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tunesmith.methods.base import MethodError, MethodOptions, OptionsSection, WeightBytes
from tunesmith.methods.lora import (
    LoraMethod,
    _input_groups,
    lora_layer_autocast_bytes,
    lora_layer_elements,
    lora_targets,
    peft_lora_model,
)
from tunesmith.models.facts import ModelFacts

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tunesmith.config import MethodConfig

BLOCK_SIZE = 64  # bitsandbytes' 4-bit block size
CONSTANT_BLOCK_SIZE = 256  # second-level blocks of double quantization


class QuantOptions(MethodOptions):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants again (blocks of 256).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of the dequantized matmul; auto = bf16 where native, else fp32."
    )
    backend: Literal["bitsandbytes", "torchao"] = Field("bitsandbytes", description="Quantization library.")


def compute_dtype(config: MethodConfig, device: torch.device | None = None) -> torch.dtype:
    """auto → bf16 where the hardware runs it natively, else fp32 (never bf16 emulation: 10-30x slower here)."""
    import torch

    from tunesmith.models.hardware import bf16_is_native, default_device

    requested = config.quant.compute_dtype
    if requested == "auto":
        return torch.bfloat16 if bf16_is_native(device or default_device()) else torch.float32
    return getattr(torch, requested)


def constant_bits_per_param(double_quant: bool = True, block: int = BLOCK_SIZE, block2: int = CONSTANT_BLOCK_SIZE) -> float:
    """Quantization-constant overhead: 32/block, or with double quantization 8/block + 32/(block*block2)."""
    return 8 / block + 32 / (block * block2) if double_quant else 32 / block


def quantized_base_report(model: nn.Module) -> dict[str, Any]:
    """Measure what the loaded quantized base holds: bytes, quantized params, per-block constants in bits/param.

    total_bytes = packed 4-bit weights + per-block constants (absmax, second-level absmax, offset) + lookup tables
    (16-entry NF4 code, 256-entry second-level code per matrix) + every unquantized tensor (embeddings, norms).
    """
    import bitsandbytes as bnb

    quantized = packed = constants = tables = 0
    quantized_ids: set[int] = set()
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        state = weight.quant_state
        if state is None:
            continue
        quantized_ids.add(id(weight))
        quantized += state.shape.numel()
        packed += weight.numel() * weight.element_size()
        constants += state.absmax.numel() * state.absmax.element_size()
        tables += state.code.numel() * state.code.element_size()
        if state.nested:
            constants += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + fp32 offset
            tables += state.state2.code.numel() * state.state2.code.element_size()
    if not quantized:
        raise MethodError("no 4-bit layers found: the model was not loaded through qlora's base_load_kwargs")
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized_ids)
    other += sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        "quantized_params": quantized,
        "packed_weight_bytes": packed,
        "constant_bytes": constants,
        "lookup_table_bytes": tables,
        "unquantized_bytes": other,
        "total_bytes": packed + constants + tables + other,
        "constant_bits_per_param": 8 * constants / quantized,
        "bits_per_quantized_param": 8 * (packed + constants) / quantized,
    }


def release_checkpoint_mapping(model: nn.Module) -> None:
    """Give the parameters that were not quantized (embeddings, norms, head) their own memory on the CPU.

    transformers loads a safetensors checkpoint through mmap and, on the CPU, leaves unquantized fp32 tensors as views
    into the mapped file. One such view keeps the whole mapping alive, and every page read while quantizing the
    Linear weights stays resident: the process then holds the full-precision checkpoint (538 MB for SmolLM2-135M)
    beside its 4-bit copy for the whole run. Copying the few unquantized tensors drops the mapping (measured on a
    12-layer SmolLM2-shaped model, 512 tokens: peak RSS 1,519 -> 1,358 MiB). Tied weights stay tied (the shared
    Parameter is copied once). No-op for tensors on a GPU."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.device.type == "cpu" and parameter.dtype.is_floating_point:
                parameter.data = parameter.data.clone()


class QLoraMethod(LoraMethod):
    name = "qlora"
    cpu_fp32_heap_share = 0.23  # fitted (methods/base.py)
    description = "LoRA on a 4-bit NF4 base (less memory, slower, quantization error)"
    options = (OptionsSection("quant", QuantOptions, "QLoRA quantization options."),)  # + LoRA's own section
    plan_preference = 1
    can_merge = True
    merge_compared_to = "quantized base + adapter"

    # --- planning
    def frozen_weight_bytes(self, facts: ModelFacts, config: MethodConfig, trainable_params: int,
                            weight_bytes: int, weight_dtype: str) -> WeightBytes:
        """Decoder Linear weights in NF4 at (4 + constant bits) / 8 bytes; embeddings, norms, lm_head at 16-bit."""
        quantized = sum(m.weight_params for m in facts.decoder_linears())
        bits = constant_bits_per_param(config.quant.double_quant)
        other = facts.params_total - quantized
        return WeightBytes(int(quantized * (4 + bits) / 8 + other * weight_bytes), bits, quantized,
                           [f"{quantized:,} parameters in 4-bit NF4; embeddings, norms and lm_head stay {weight_dtype}"])

    def layer_activation_elements(self, facts: ModelFacts, config: MethodConfig) -> float:
        """LoRA's terms + 2h + i: bitsandbytes' MatMul4Bit keeps its input on ctx for every 4-bit layer, trained or
        not, so both norm outputs and the MLP product stay alive (the attention output is a view of SDPA's, already
        counted) — without counting twice what LoRA's own targets already keep."""
        lo = config.lora
        layer0 = [m for m in lora_targets(facts, lo.target_modules) if m.layer == 0]
        kept = sum(w for group, w in _input_groups(facts)
                   if lo.dropout == 0 and any(m.short in group for m in layer0))
        return lora_layer_elements(facts, lo, fused=False) + 2 * facts.hidden_size + facts.intermediate_size - kept

    def per_example_attention_elements(self, facts: ModelFacts, config: MethodConfig) -> float:
        """o_proj's 4-bit matmul keeps its input, which per-example attention makes a copy of the attention output
        (q = heads * head_dim), whatever the dropout."""
        return float(facts.num_heads * facts.head_dim)

    def layer_autocast_bytes(self, facts: ModelFacts, config: MethodConfig, mask_4d: bool = True) -> float:
        """Under 16-bit autocast on fp32 non-quantized weights (CPU bf16): LoRA's terms, but bitsandbytes returns each
        4-bit layer's output in its input's dtype (fp32), so the MLP's gate, silu and up tensors are kept in fp32:
        + 2 * 3i over LoRA's 16-bit ones. Measured with saved_tensors_hooks (bitsandbytes 0.50, CPU): nothing else
        (its 4-bit matmul keeps no input here)."""
        return lora_layer_autocast_bytes(facts, config.lora, mask_4d, fused=False) + 2 * 3 * facts.intermediate_size

    def autocast_weight_casts(self, facts: ModelFacts, config: MethodConfig, gradient_checkpointing: bool) -> int:
        """Only the output layer is cast (the 4-bit layers are dequantized inside their own matmul)."""
        return facts.vocab_size * facts.hidden_size

    def extra_activation_bytes(self, facts: ModelFacts, config: MethodConfig, act_bytes: int) -> int:
        """One 4-bit Linear is dequantized at a time for its matmul (forward and backward)."""
        return max(m.weight_params for m in facts.decoder_linears()) * act_bytes

    # --- training
    def base_load_kwargs(self, config: MethodConfig) -> dict[str, Any]:
        options = config.quant
        if options.backend != "bitsandbytes":
            raise MethodError(
                f"method.quant.backend: {options.backend!r} is not wired into tunesmith (only bitsandbytes is); "
                "set method.quant.backend: bitsandbytes"
            )
        from transformers import BitsAndBytesConfig

        from tunesmith.models.hardware import default_device

        device = default_device()
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=options.quant_type,
            bnb_4bit_use_double_quant=options.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(config, device),
        )
        return {"quantization_config": quantization, "device_map": {"": 0} if device.type == "cuda" else "cpu"}

    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        if getattr(model, "hf_quantizer", None) is None:
            raise MethodError("qlora: the base is not quantized; load it with METHOD.base_load_kwargs(config)")
        release_checkpoint_mapping(model)
        # Gradient checkpointing is the trainer's choice (enable_gradient_checkpointing), not switched on here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        from tunesmith.models.load import keep_4bit_kernels

        keep_4bit_kernels(model)  # also for bases loaded outside models.load (see there)
        return peft_lora_model(model, config)

    def merge(self, model: nn.Module) -> nn.Module:
        """Dequantize the base to its compute dtype, then merge LoRA into the plain weights (see module doc)."""
        import torch
        from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        if not isinstance(model, PeftModel):
            raise MethodError("this model has no LoRA layers to merge (already merged?)")
        adapter = model.active_adapter
        peft_config = copy.deepcopy(model.peft_config[adapter])
        state = get_peft_model_state_dict(model, adapter_name=adapter)
        base = model.unload()  # removes the LoRA layers, keeps the 4-bit base
        quantizer = getattr(base, "hf_quantizer", None)
        if quantizer is None:
            raise MethodError("qlora merge: the base has no quantizer to dequantize with")
        # One dtype for the whole merged model: that of the parameters that were never quantized (embeddings,
        # norms, head). Dequantizing to the compute dtype instead left a bf16 body with fp32 embeddings on CPUs
        # with native bf16 (AMX/AVX512-BF16), and the merged model's forward failed on mixed dtypes.
        dtype = base.get_input_embeddings().weight.dtype
        base = base.dequantize(dtype=dtype)
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config  # the merged folder is a plain model
        plain = get_peft_model(base, peft_config)
        set_peft_model_state_dict(plain, state)
        with torch.no_grad():
            return plain.merge_and_unload(safe_merge=True)


METHOD = QLoraMethod()
