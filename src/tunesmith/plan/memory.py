"""Memory estimate of a training step per method: a breakdown in bytes, the peak, and GPUs needed.

Terms (P = all parameters, T = trainable parameters):
    weights      frozen base weights by dtype: P_frozen * bytes (fp32 4, bf16/fp16 2); QLoRA: the decoder's Linear
                 weights in NF4 at 0.5 byte + quantization constants (32-bit absmax per 64 weights = 0.5 bit;
                 double quantization: 8-bit absmax per 64 + 32 bits per 256 of those = 8/64 + 32/(64*256) bit),
                 everything else (embeddings, norms, lm_head, biases) in 16-bit
    trainable    T * bytes: adapters (LoRA, prefix, prompt, bottleneck) live in fp32 (peft upcasts them); full
                 fine-tuning trains the weights in their own dtype
    gradients    T * the trainable dtype's bytes
    master       fp32 master copy (4 bytes * T) under mixed precision when the trained weights are 16-bit
    optimizer    AdamW: two fp32 moments = 8 bytes * T; 8-bit AdamW (bitsandbytes): 2 bytes * T; paged 8-bit: the
                 same bytes, but pages can move to CPU memory under pressure
    activations  activations.py: saved tensors + logits buffers (+ one recomputed layer under checkpointing);
                 fp32 weights under 16-bit autocast (CPUs with native bf16) add the 16-bit weight casts autograd keeps
    overhead     framework: CUDA context and kernels (GPU), allocator and runtime scratch (CPU)

Peak (one micro-batch, gradients set to None after each step, as tunesmith's loop does):
    peak = weights + trainable + master + optimizer + overhead
           + max(activations + head gradient,   # start of backward: all saved tensors + first gradients
                 gradients + step temporaries)  # optimizer step: all gradients + AdamW scratch
           (CPU: under 16-bit autocast + the saved activations in the step branch, whose freed heap glibc keeps
            resident; + allocator retention = a fitted share (retention_share; in fp32 by method) of the forward pass's
            layer allocations)
With gradient accumulation the gradients live through the next forward pass, so they are added instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from tunesmith.methods.registry import get_method
from tunesmith.models.attention import segment_attention_applies
from tunesmith.models.facts import ModelFacts
from tunesmith.models.head import config_returns_head_output
from tunesmith.plan.activations import activation_estimate
from tunesmith.plan.counts import trainable_params

if TYPE_CHECKING:
    from tunesmith.config import MethodConfig

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
# Framework overhead. GPU: CUDA context + cuBLAS workspace. CPU (where the budget is the whole process): the
# resident Python/torch/transformers/peft runtime of `tunesmith train`, measured by bench/memory_accuracy.py's
# calibration case (LoRA on the tiny random model, 1 x 128 tokens, whose weights and activations are ~3 MiB):
# 528 MiB peak RSS on 2026-12-01, so 525 MiB. Only that case sets it; the reported cases are other shapes.
OVERHEAD_BYTES = {"cuda": int(1.0 * GiB), "cpu": 525 * 1024**2}
# Heap that glibc's malloc keeps resident after the tensors in it are freed (CPU only; the CUDA caching allocator's
# slack is the 8% kept free per GPU). With glibc's defaults the mmap threshold rises to the size of freed tensors
# (up to 32 MiB), so activations come from the heap, which is not returned between the forward and backward passes
# and fragments: the peak RSS of `tunesmith train` exceeds the live tensors by a share of what the layers allocate
# in one forward pass (`forward_layer_bytes`; measured 0.13-0.66 of it). FITTED (not derived) on other shapes than
# the reported ones: docs/benchmarks.md, "Memory estimate", fit set.
ALLOCATOR_RETENTION = {"cuda": 0.0, "cpu": 0.4}
# fp32 compute (CPUs without native bf16, where `precision: auto` trains in fp32, with models/fused_ops.py's norm and
# rotary Functions). How much heap stays resident depends on the method's pattern of allocations, not only on what
# it keeps: RSS growth over one forward pass minus the saved tensors, per token between 1 x 256 and 2 x 1,024 tokens
# on the reference model, was 0.61 MiB for bottleneck adapters against 0.21 for LoRA and 0.14 for full fine-tuning
# (bench/forward_heap.py, docs/benchmarks.md).
# So each method states its own fitted share (`Method.cpu_fp32_heap_share`); CPU_FP32_RETENTION is the pooled share
# for a method that states none. Fitted on the fit set on such a CPU (the EPYC, 2026-12-02, trainer 892a374: the
# 12-layer model at 256/512/1,024 tokens and the reference model at 512 tokens, micro-batches 1 and 2, + full
# fine-tuning at 2,048 tokens on both; 32 runs without checkpointing), each share minimising the worst error over its
# method's runs. Checkpointed runs of one config peak
# apart by up to ~20% (CPU_CHECKPOINT_SPREAD), so their share minimises the worst error over each fit case's highest
# run (6 LoRA cases, 10 runs; the 12-layer model at 2 x 1,024 and the reference model at 2 x 512 three times each):
# the figure is meant for the high runs. FITTED, like the above.
CPU_FP32_RETENTION = 0.32
CPU_FP32_CHECKPOINT_RETENTION = 0.47
# Measured, not modelled: the same checkpointed config peaked up to ~25% apart from run to run on a CPU (bf16 autocast;
# glibc heap fragmentation over identical live tensors: docs/benchmarks.md, "Memory estimate").
CPU_CHECKPOINT_SPREAD = ("the real peak varies from run to run (measured up to ~25% below this figure in some runs, "
                         "which is meant for the high runs)")


@dataclass
class TrainSetup:
    """What the estimate assumes about the run; every field is printed with the result."""

    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    weight_dtype: str = "bf16"  # dtype of the loaded base weights
    compute_dtype: str = "bf16"  # activations
    master_weights: bool = False  # fp32 master copy of 16-bit trained weights (mixed precision)
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit
    device: str = "cuda"  # cuda | cpu: which overhead applies
    gpus: int = 1
    gpu_memory_bytes: int | None = None
    # Share of positions whose next token is a training target; the trainer computes logits only there
    # (train/loop.py forward_loss). 1.0 (every position, the upper bound) unless the data says otherwise.
    labelled_fraction: float = 1.0

    @property
    def autocast(self) -> bool:
        """fp32 weights with 16-bit compute: the trainer runs them under torch.autocast (CPU with native bf16)."""
        return DTYPE_BYTES[self.weight_dtype] == 4 and DTYPE_BYTES[self.compute_dtype] == 2


@dataclass
class MemoryEstimate:
    method: str
    trainable_params: int
    trainable_formula: str
    weights: int
    trainable: int
    gradients: int
    master_weights: int
    optimizer: int
    activations: int
    overhead: int
    total: int
    step_temporaries: int
    quant_constant_bits_per_param: float | None = None
    head_gradient: int = 0  # the output layer's gradient, alive with all activations (full fine-tuning)
    allocator_retention: int = 0  # CPU: freed heap glibc keeps resident (ALLOCATOR_RETENTION, fitted)
    gradient_accumulation_steps: int = 1
    notes: list[str] = field(default_factory=list)

    def memory_bytes(self) -> dict[str, int]:
        keys = ("weights", "trainable", "gradients", "master_weights", "optimizer", "activations", "overhead", "total")
        return {k: int(getattr(self, k)) for k in keys}


def optimizer_bytes_per_param(optimizer: str) -> int:
    if optimizer == "adamw":
        return 8
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2
    raise ValueError(f"--optimizer: unknown optimizer {optimizer!r} (adamw, adamw_8bit, paged_adamw_8bit)")


def estimate_memory(f: ModelFacts, method: MethodConfig, setup: TrainSetup) -> MemoryEstimate:
    """The breakdown and peak of one training step (module docstring); every method-specific term comes from the
    method itself (methods/base.py hooks), so a newly registered method is planned without changes here."""
    owner = get_method(method.name)
    count = trainable_params(f, method)
    n = count.trainable_params
    wbytes = DTYPE_BYTES[setup.weight_dtype]
    abytes = DTYPE_BYTES[setup.compute_dtype]
    frozen = owner.frozen_weight_bytes(f, method, n, wbytes, setup.weight_dtype)
    tbytes = wbytes if owner.trains_base_weights else 4
    trainable = n * tbytes
    gradients = n * tbytes
    master = n * 4 if (setup.master_weights and tbytes < 4) else 0
    optimizer = n * optimizer_bytes_per_param(setup.optimizer)
    # fp32 weights with 16-bit compute = autocast (tunesmith train on a CPU with native bf16: train/loop.py
    # forward_loss runs under torch.autocast); 16-bit weights compute in their own dtype (GPU plans).
    autocast = setup.autocast
    # On CPUs the trainer runs packed rows through per-example attention (models/attention.py
    # segment_attention_applies): the same rule here, with packing and transformers' SDPA assumed.
    segments = segment_attention_applies(setup.device, None, owner.supports_packing, owner.uses_virtual_tokens)
    # The trainer runs head and loss in chunks where the model returns its head's output unchanged (it probes the
    # model, train/head_loss.py); the planner guesses from the config (models/head.py).
    fused = owner.selective_logits and config_returns_head_output(f.config)
    act = activation_estimate(f, method, setup.batch_size, setup.seq_len, abytes, setup.gradient_checkpointing,
                              labelled_fraction=setup.labelled_fraction, autocast=autocast,
                              segment_attention=segments, fused_head=fused)
    activations = act.peak_bytes + owner.extra_activation_bytes(f, method, abytes)
    notes: list[str] = list(frozen.notes)
    # The first gradient of the backward pass is the output layer's (V x h), made while every activation lives.
    # (The chunked head loss makes it in the forward pass, in fp32, and holds it until the backward pass.)
    head_grad = f.vocab_size * f.hidden_size * (4 if fused else tbytes) if owner.trains_base_weights else 0
    # Optimizer step scratch: torch's AdamW on CPU walks one tensor at a time (the largest tensor's temporaries);
    # on CUDA we assume the fused kernel (torch.optim.AdamW(fused=True)), which needs none. (The default foreach
    # path would add one fp32 temporary per trainable parameter at the step.)
    largest_trainable = f.vocab_size * f.hidden_size if owner.trains_base_weights else 0
    step_temp = 0 if setup.device == "cuda" else largest_trainable * 4 * 2
    overhead = OVERHEAD_BYTES[setup.device]
    persistent = frozen.bytes + trainable + master + optimizer + overhead
    # CPU: a fitted share of the forward pass's layer allocations is lost to retention/fragmentation on top. Under
    # bf16 autocast the freed activation heap also stays resident through the optimizer step (glibc does not return
    # it; full fine-tuning on the Xeon matched only with it). In fp32 it does not: the fit set's full fine-tuning runs
    # on the EPYC were over-estimated by +5.4..+13.4% with it and are within -5.2..-1.6% without it. A likely cause
    # (not verified): fp32 weight gradients are carved from the freed fp32 activation chunks of similar sizes, where
    # under autocast those chunks are bf16, half the size, and interleaved with the kept weight casts.
    retained = act.saved_bytes if setup.device == "cpu" and autocast else 0
    retention = int(retention_share(setup.device, autocast, setup.gradient_checkpointing, owner.cpu_fp32_heap_share)
                    * act.forward_layer_bytes)
    if setup.device == "cpu" and setup.gradient_checkpointing:
        notes.append(f"CPU + gradient checkpointing: {CPU_CHECKPOINT_SPREAD}")
    if setup.gradient_accumulation_steps > 1:
        total = persistent + gradients + max(activations, step_temp + retained) + retention
        notes.append("gradient accumulation: gradients live through the forward pass and are added in full")
    else:
        total = persistent + max(activations + head_grad, gradients + step_temp + retained) + retention
    return MemoryEstimate(
        method=method.name, trainable_params=n, trainable_formula=count.formula, weights=int(frozen.bytes),
        trainable=int(trainable), gradients=int(gradients), master_weights=int(master), optimizer=int(optimizer),
        activations=int(activations), overhead=overhead, total=int(total), step_temporaries=int(step_temp),
        quant_constant_bits_per_param=frozen.quant_constant_bits_per_param, notes=notes, head_gradient=int(head_grad),
        gradient_accumulation_steps=setup.gradient_accumulation_steps, allocator_retention=retention,
    )


def retention_share(device: str, autocast: bool, gradient_checkpointing: bool, method_share: float | None = None) -> float:
    """The fitted share of the forward pass's layer allocations that the allocator keeps on top of live tensors;
    `method_share`: the method's own fp32 share (`Method.cpu_fp32_heap_share`), used for fp32 runs without
    checkpointing (the checkpointed share was fitted on LoRA alone)."""
    if device == "cpu" and not autocast:
        if gradient_checkpointing:
            return CPU_FP32_CHECKPOINT_RETENTION
        return CPU_FP32_RETENTION if method_share is None else method_share
    return ALLOCATOR_RETENTION[device]


def gpus_needed(est: MemoryEstimate, gpu_memory_bytes: int, sharded: bool, usable_fraction: float = 0.92) -> int | None:
    """GPUs of `gpu_memory_bytes` needed. Without sharding (DDP) every GPU holds everything: 1 if it fits, else None
    (more GPUs do not help). With ZeRO-3/FSDP full sharding, weights, trainable weights, gradients, master weights
    and optimizer state divide by the GPU count; activations and overhead stay per GPU. 8% of each GPU is kept
    free for fragmentation."""
    usable = gpu_memory_bytes * usable_fraction
    per_gpu = est.activations + est.overhead + est.step_temporaries
    if not sharded:
        return 1 if est.total <= usable else None
    shardable = est.weights + est.trainable + est.gradients + est.master_weights + est.optimizer
    room = usable - per_gpu
    if room <= 0:
        return None
    return max(1, math.ceil(shardable / room))


def sharded_bytes_per_gpu(est: MemoryEstimate, gpus: int, layer_bytes: int, offload: bool = False) -> int:
    """Peak per GPU under full sharding (FSDP2 / ZeRO-3) across `gpus`:

        (weights + trainable + master + optimizer) / N + overhead + 2 * layer     # the all-gathered layer + the
                                                                                  # prefetched next one
        + max(activations + head gradient / N, gradients / N + step scratch)    (gradients / N + max(...) when
                                                                                  accumulating)
    With CPU offload (FSDP2's CPUOffloadPolicy) parameters, gradients and optimizer state live in host memory; the
    GPU keeps overhead + activations + the head gradient + 4 layers (two gathered, their gradients)."""
    if offload:
        return int(est.overhead + est.activations + est.head_gradient + 4 * layer_bytes)
    states = (est.weights + est.trainable + est.master_weights + est.optimizer) / gpus
    persistent = states + est.overhead + 2 * layer_bytes + est.allocator_retention  # retention: CPU only (0 on GPU)
    if est.gradient_accumulation_steps > 1:
        return int(persistent + est.gradients / gpus + max(est.activations, est.step_temporaries))
    return int(persistent + max(est.activations + est.head_gradient / gpus, est.gradients / gpus + est.step_temporaries))


def as_dict(setup: TrainSetup) -> dict:
    return asdict(setup)
