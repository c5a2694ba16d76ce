"""The solver behind `tunesmith plan`: per method, turn the knobs a practitioner turns, in the order of their cost,
until the configuration fits the memory budget (with 8% of each GPU kept free for fragmentation).

Knobs, cheapest first. The search is lexicographic: a costlier knob is turned only when no combination of the
cheaper ones fits, so the answer is the cheapest configuration that fits, not merely one that does.
 1. gradient checkpointing: each layer is recomputed in the backward pass, one extra forward per step, so the step
    takes ~4/3 as long (a forward is ~1/3 of forward + backward FLOPs); not offered for prefix tuning;
 2. a smaller micro-batch with more gradient accumulation, the effective batch kept (same tokens per step; the
    lower GPU utilisation of very small micro-batches is not modelled);
 3. 8-bit paged AdamW (bitsandbytes): 2 instead of 8 bytes of optimizer state per trainable parameter (GPU only);
 4. with --gpus N > 1: sharded (FSDP2 full sharding, train.sharding=fsdp) instead of replicated (data parallel);
 5. a shorter sequence (halved, down to 256 tokens): the last resort, since it truncates data; with --data the
    share of examples and tokens it would cut is reported;
 6. with --gpus N > 1, CPU offload (train.fsdp_cpu_offload, FSDP2's CPUOffloadPolicy): parameters, gradients and
    optimizer state in host memory; the step is much slower (not estimated). One process trains unsharded, so a
    single GPU gets no offload plan.
The memory of each candidate comes from plan/memory.py's `estimate_memory` (the model bench/memory_accuracy.py
measures); this module adds no second copy of it, only the per-GPU split under sharding (`sharded_bytes_per_gpu`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from tunesmith.methods.registry import get_method
from tunesmith.models.facts import ModelFacts
from tunesmith.plan.memory import GiB, MemoryEstimate, TrainSetup, estimate_memory, sharded_bytes_per_gpu

if TYPE_CHECKING:
    from tunesmith.config import MethodConfig

USABLE_FRACTION = 0.92  # 8% of each GPU kept free for allocator fragmentation
CHECKPOINTING_STEP_TIME = 4 / 3  # one extra forward per step (forward ~ 1/3 of forward + backward)
MIN_SEQ_LEN = 256


@dataclass(frozen=True)
class Knobs:
    gradient_checkpointing: bool
    batch_size: int  # micro-batch per process
    gradient_accumulation_steps: int
    optimizer: str
    max_seq_len: int
    strategy: str  # "single" | "replicated" | "sharded"
    gpus: int
    cpu_offload: bool = False

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * (self.gpus if self.strategy != "single" else 1)


@dataclass
class Solution:
    method: str
    fits: bool
    knobs: Knobs
    estimate: MemoryEstimate  # one process's estimate at these knobs (unsharded breakdown)
    per_gpu_bytes: int  # the peak on each GPU under the chosen strategy
    usable_bytes: int
    per_gpu_by_strategy: dict[str, int | None]  # replicated / sharded peaks per GPU at the same knobs
    relative_step_time: float
    turned: list[str] = field(default_factory=list)  # the knobs turned, in words
    step_time_notes: list[str] = field(default_factory=list)  # slowdowns the estimate does not include
    truncated: dict[str, float] | None = None  # with --data: share of examples and tokens cut at max_seq_len
    shortened_from: int | None = None  # the asked sequence length when the solver had to shorten it
    host_bytes_for_offload: int | None = None  # with CPU offload: host memory for parameters, grads and optimizer
    launch: str = ""
    why_not: str | None = None

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("estimate", "knobs")}
        out["knobs"] = {**asdict(self.knobs), "effective_batch": self.knobs.effective_batch}
        return out


@dataclass(frozen=True)
class Budget:
    device: str  # "cuda" | "cpu"
    memory_bytes: int  # per GPU (or the host's budget on CPU)
    gpus: int = 1

    @property
    def usable(self) -> int:
        return int(self.memory_bytes * USABLE_FRACTION)


@dataclass(frozen=True)
class Start:
    """Where the search starts: what the user asked for (flags) before any knob is turned."""

    batch_size: int = 4
    effective_batch: int = 16
    seq_len: int = 2048
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    master_weights: bool = False
    labelled_fraction: float = 1.0
    precision: str = "auto"  # train.precision of the run (resolved for the device: `train_dtypes`)
    model_dtype: str = "auto"  # model.dtype of the run


def train_dtypes(device: str, precision: str = "auto", model_dtype: str = "auto") -> tuple[str, str]:
    """(weight dtype, compute dtype) that `tunesmith train` will use on `device`, by the trainer's own rules.

    GPU plans assume bf16 weights and compute (model.dtype auto on a bf16 GPU). On a CPU, model.dtype auto loads
    fp32 weights (models/load.py torch_dtype) and train.precision resolves through models/hardware.py
    resolve_precision for this machine's CPU: auto -> bf16 where the CPU runs it natively (AVX512-BF16/AMX), else
    fp32. fp32 weights with bf16 compute is autocast (train/loop.py forward_loss), which the memory model treats
    apart (plan/activations.py)."""
    if device != "cpu":
        return "bf16", "bf16"
    weights = {"auto": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(model_dtype, "fp32")
    import torch

    from tunesmith.models.hardware import resolve_precision

    resolved = resolve_precision(precision, torch.device("cpu"), log=lambda *_a, **_k: None)
    compute = "bf16" if resolved == "bf16" else "fp32"
    if weights != "fp32":  # 16-bit weights compute in their own dtype
        compute = weights
    return weights, compute


def _halvings(start: int, floor: int) -> list[int]:
    values = [start]
    while values[-1] // 2 >= floor:
        values.append(values[-1] // 2)
    return values


def _strategies(budget: Budget, supports_sharding: bool) -> list[tuple[str, bool]]:
    """(strategy, cpu offload) in cost order. Sharding and its CPU offload need several processes: `tunesmith train`
    trains unsharded in one process (train/sharding.py), so one GPU gets no offload plan."""
    if budget.device == "cpu" or budget.gpus == 1:
        return [("single", False)]
    if not supports_sharding:
        return [("replicated", False)]
    return [("replicated", False), ("sharded", False), ("sharded", True)]


def launch_line(knobs: Knobs, config_path: str = "run.yaml") -> str:
    """The command that runs the plan: one process, or N processes through torchrun (data parallel; FSDP2 when the
    written config says train.sharding: fsdp, with train.fsdp_cpu_offload for offload: train/sharding.py)."""
    if knobs.strategy == "single":
        return f"tunesmith train {config_path}"
    line = f"torchrun --nproc_per_node {knobs.gpus} -m tunesmith.cli train {config_path}"
    if knobs.strategy == "sharded":
        line += "  # FSDP2: train.sharding=fsdp" + (", train.fsdp_cpu_offload=true" if knobs.cpu_offload else "")
    return line


def _layer_bytes(facts: ModelFacts, est: MemoryEstimate) -> int:
    """One decoder layer's weights at the plan's average storage per parameter (what FSDP all-gathers)."""
    per_param = (est.weights + est.trainable) / max(1, facts.params_total)
    return int(max(facts.layer_params or [0]) * per_param)


def _candidates(method_supports_ckpt: bool, budget: Budget, start: Start, supports_sharding: bool = True):
    """Knob combinations with their cost key, cheapest first (see the module docstring for the order)."""
    first_mb = max(1, min(start.batch_size, start.effective_batch))
    micro = _halvings(first_mb, 1)
    seqs = _halvings(start.seq_len, MIN_SEQ_LEN) if start.seq_len > MIN_SEQ_LEN else [start.seq_len]
    optimizers = [start.optimizer] + (["paged_adamw_8bit"] if budget.device != "cpu" and start.optimizer == "adamw" else [])
    if not method_supports_ckpt:
        ckpts = [False]
    else:
        ckpts = [True] if start.gradient_checkpointing else [False, True]
    out = []
    for (_s_i, (strategy, offload)), (q_i, seq), (o_i, opt), (m_i, mb), (c_i, ckpt) in itertools.product(
            enumerate(_strategies(budget, supports_sharding)), enumerate(seqs), enumerate(optimizers), enumerate(micro), enumerate(ckpts)):
        sharded = strategy == "sharded" and not offload
        key = (offload, q_i, sharded, o_i, m_i, c_i)
        processes = budget.gpus if strategy != "single" else 1
        accumulation = max(1, math.ceil(start.effective_batch / (mb * processes)))
        out.append((key, Knobs(ckpt, mb, accumulation, opt, seq, strategy, processes, offload)))
    out.sort(key=lambda item: item[0])
    return [knobs for _, knobs in out]


def evaluate(facts: ModelFacts, method: MethodConfig, knobs: Knobs, budget: Budget, start: Start) -> tuple[MemoryEstimate, int, dict]:
    """(estimate, per-GPU peak under the knobs' strategy, per-GPU peak replicated and sharded) for one candidate."""
    weight_dtype, compute_dtype = train_dtypes(budget.device, start.precision, start.model_dtype)
    setup = TrainSetup(batch_size=knobs.batch_size, seq_len=knobs.max_seq_len,
                       gradient_checkpointing=knobs.gradient_checkpointing,
                       gradient_accumulation_steps=knobs.gradient_accumulation_steps, weight_dtype=weight_dtype,
                       compute_dtype=compute_dtype, master_weights=start.master_weights, optimizer=knobs.optimizer,
                       device=budget.device, gpus=knobs.gpus, gpu_memory_bytes=budget.memory_bytes,
                       labelled_fraction=start.labelled_fraction)
    est = estimate_memory(facts, method, setup)
    layer = _layer_bytes(facts, est)
    by_strategy: dict[str, int | None] = {"replicated": est.total, "sharded": None}
    if budget.device != "cpu" and budget.gpus > 1 and get_method(method.name).supports_sharding:
        by_strategy["sharded"] = sharded_bytes_per_gpu(est, budget.gpus, layer, offload=False)
    if knobs.strategy == "sharded":
        peak = sharded_bytes_per_gpu(est, knobs.gpus, layer, offload=knobs.cpu_offload)
    else:
        peak = est.total
    return est, peak, by_strategy


def describe(knobs: Knobs) -> str:
    """All knobs in words, e.g. 'checkpointing, micro-batch 1 x 16, paged_adamw_8bit, 2048 tokens, sharded over 2'."""
    parts = ["checkpointing" if knobs.gradient_checkpointing else "no checkpointing",
             f"micro-batch {knobs.batch_size} x {knobs.gradient_accumulation_steps}", knobs.optimizer,
             f"{knobs.max_seq_len} tokens"]
    if knobs.strategy != "single":
        parts.append(f"{knobs.strategy} over {knobs.gpus} GPUs")
    if knobs.cpu_offload:
        parts.append("CPU offload")
    return ", ".join(parts)


def _turned(knobs: Knobs, start: Start) -> list[str]:
    words = []
    if knobs.gradient_checkpointing and not start.gradient_checkpointing:
        words.append("gradient checkpointing (~4/3 step time)")
    if knobs.batch_size < min(start.batch_size, start.effective_batch):
        words.append(f"micro-batch {knobs.batch_size} x {knobs.gradient_accumulation_steps} accumulation steps")
    if knobs.optimizer != start.optimizer:
        words.append(f"{knobs.optimizer} (2 bytes of optimizer state per trainable parameter)")
    if knobs.strategy == "sharded" and not knobs.cpu_offload:
        words.append(f"sharded over {knobs.gpus} GPUs (FSDP2)")
    if knobs.max_seq_len < start.seq_len:
        words.append(f"sequences cut to {knobs.max_seq_len} tokens (last resort)")
    if knobs.cpu_offload:
        words.append("CPU offload of parameters, gradients and optimizer state")
    return words


def solve(facts: ModelFacts, method: MethodConfig, budget: Budget, start: Start,
          truncation: Callable[[int], dict[str, float]] | None = None) -> Solution:
    """The cheapest configuration of `method` that fits `budget`, or the smallest one with why it does not fit."""
    owner = get_method(method.name)
    candidates = _candidates(owner.supports_gradient_checkpointing, budget, start, owner.supports_sharding)
    smallest = None
    for knobs in candidates:
        est, peak, by_strategy = evaluate(facts, method, knobs, budget, start)
        if smallest is None or peak < smallest[2]:
            smallest = (knobs, est, peak, by_strategy)
        if peak <= budget.usable:
            return _solution(owner, True, knobs, est, peak, by_strategy, budget, start, truncation)
    knobs, est, peak, by_strategy = smallest
    solution = _solution(owner, False, knobs, est, peak, by_strategy, budget, start, truncation)
    solution.why_not = why_not(facts, method, knobs, est, peak, budget)
    return solution


def _solution(owner, fits, knobs, est, peak, by_strategy, budget, start, truncation) -> Solution:
    notes = []
    if knobs.cpu_offload:
        notes.append("CPU offload: the optimizer step runs on the host and weights stream over PCIe (much slower; "
                     "not estimated); the host needs the parameters, gradients and optimizer state in RAM "
                     "(host_bytes_for_offload, not checked against the host)")
    if knobs.strategy != "single":
        notes.append("multi-GPU communication (gradient all-reduce, FSDP all-gathers) is not included")
    if est.quant_constant_bits_per_param is not None:
        notes.append("4-bit base: each matmul dequantizes its weight first (slower than 16-bit LoRA; not included)")
    if knobs.effective_batch != start.effective_batch:
        notes.append(f"effective batch {knobs.effective_batch} (asked {start.effective_batch}: not divisible)")
    return Solution(
        method=owner.name, fits=fits, knobs=knobs, estimate=est, per_gpu_bytes=int(peak), usable_bytes=budget.usable,
        per_gpu_by_strategy=by_strategy,
        relative_step_time=round(CHECKPOINTING_STEP_TIME if knobs.gradient_checkpointing else 1.0, 3),
        turned=_turned(knobs, start), step_time_notes=notes,
        truncated=truncation(knobs.max_seq_len) if truncation and knobs.max_seq_len < start.seq_len else None,
        shortened_from=start.seq_len if knobs.max_seq_len < start.seq_len else None, launch=launch_line(knobs),
        host_bytes_for_offload=(est.weights + est.trainable + est.gradients + est.master_weights + est.optimizer)
        if knobs.cpu_offload else None,
    )


def why_not(facts: ModelFacts, method: MethodConfig, knobs: Knobs, est: MemoryEstimate, peak: int, budget: Budget) -> str:
    """Why nothing fits, and what would: the smallest peak found, GPUs needed sharded, or the GPU size needed."""
    where = f"{budget.gpus} x {budget.memory_bytes / GiB:g} GiB" if budget.device != "cpu" else f"{budget.memory_bytes / GiB:g} GiB of host memory"
    text = (f"does not fit {where} ({budget.usable / GiB:.1f} GiB usable each): the smallest configuration "
            f"({describe(knobs)}) peaks at "
            f"{peak / GiB:.1f} GiB per {'GPU' if budget.device != 'cpu' else 'host'}")
    if budget.device == "cpu":
        return text + f"; needs {peak / USABLE_FRACTION / GiB:.1f} GiB"
    if not get_method(method.name).supports_sharding:
        return text + f"; needs one GPU of {est.total / USABLE_FRACTION / GiB:.0f} GiB ({method.name} is not sharded)"
    layer = _layer_bytes(facts, est)
    for n in range(max(2, budget.gpus + 1), 1025):
        if sharded_bytes_per_gpu(est, n, layer) <= budget.usable:
            return text + (f"; needs {n} GPUs of {budget.memory_bytes / GiB:g} GiB sharded, "
                           f"or one GPU of {est.total / USABLE_FRACTION / GiB:.0f} GiB")
    return text + f"; needs one GPU of {est.total / USABLE_FRACTION / GiB:.0f} GiB"
