"""Sharded data parallelism: FSDP2 (`torch.distributed.fsdp.fully_shard`) set up through accelerate's FSDP plugin.

What is sharded: parameters, gradients and optimizer state are split over all processes (one flat mesh dimension,
`dp_shard` = world size); each decoder layer is its own FSDP unit (accelerate's transformer-based wrap policy,
which reads the model's `_no_split_modules`), the embedding + final norm + head form one more unit, and the root
holds the rest. A unit's parameters are all-gathered just before its forward/backward and freed after.

Gradient reduction (the math the loop relies on): every process scales its token-loss sum by world / N (see
loop.py), and the reduce-scatter must return the MEAN over processes, exactly as DDP does. FSDP2 uses
ReduceOp.AVG for that when the backend offers it; on gloo an AVG reduction has been reported to return the sum
(PyTorch issue 162338), which would silently double the gradients of a 2-process run. We therefore force
`SUM` followed by an explicit division by the world size (`set_force_sum_reduction_for_comms`), which is the
same on every backend; tests/train/test_sharded.py compares the gradient norm of each step with a
single-process run, which catches a sum-for-mean error of any origin.

Device mesh: built explicitly on the accelerator's device type. Left to itself `fully_shard` builds its default
mesh on the machine's accelerator type (CUDA when a GPU is present), even when the process group is gloo on
CPU (PyTorch issue 132471: segfaults). accelerate 1.15 enables its FSDP code path only for accelerator devices
(state.py leaves MULTI_CPU out), so on CPU we set the same three switches its constructor sets on a GPU
(distributed type, here and in PartialState as accelerate does, plugin, parallelism config + mesh); everything after that — `prepare`, `no_sync`,
`clip_grad_norm_`, `backward` — is accelerate's own FSDP2 code on both device types.

Mixed precision: under bf16/fp16 the plugin's MixedPrecisionPolicy gathers parameters in that dtype and reduces
gradients in fp32 (a bf16 base with fp32 LoRA weights in one unit needs this: FSDP2 gathers one dtype per unit).
CPU offload (`train.fsdp_cpu_offload` or `fsdp_offload_params` in the accelerate config) keeps the sharded
parameters, gradients and optimizer state in CPU memory (GPU runs only; untested here: no GPU).

Not supported (refused with a message): FSDP1, DeepSpeed and Megatron-LM (not tested here); prompt-learning
methods (peft saves their prompt embeddings from the live module, which FSDP shards); extra loss terms (they
would see DTensor shards).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from tunesmith.config import ConfigError, TrainConfig

UNSUPPORTED_ENGINES = ("DEEPSPEED", "MEGATRON_LM")


def sharding_requested(config: TrainConfig) -> bool:
    """FSDP is asked for by the config (`train.sharding=fsdp`, for torchrun) or by `accelerate launch` (env)."""
    return config.sharding == "fsdp" or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(config: TrainConfig):
    """An Accelerator for one process, DDP, or FSDP2 (see the module docstring); refuses engines not tested here."""
    from accelerate import Accelerator

    use_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "false").lower() != "true"
    if not sharding_requested(config):
        accelerator = Accelerator(cpu=not use_cuda)
        engine = accelerator.distributed_type.name
        if engine in UNSUPPORTED_ENGINES or engine == "FSDP":
            raise ConfigError(f"accelerate is configured for {engine}, which tunesmith does not support; use FSDP2 "
                              "(train.sharding=fsdp or examples/accelerate/fsdp.yaml) or plain data parallelism")
        return accelerator
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise ConfigError(f"accelerate config asks for FSDP version {version}; tunesmith supports FSDP2 only "
                          "(set fsdp_version: 2, see examples/accelerate/fsdp.yaml)")
    from accelerate import PartialState
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        cpu_offload=True if config.fsdp_cpu_offload else None,  # None: the accelerate config (env) decides
        state_dict_type="SHARDED_STATE_DICT",
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:  # nothing to shard over; a sharded checkpoint still resumes here (checkpoint.py)
        print("notice: train.sharding=fsdp with one process: training unsharded")
        return Accelerator(cpu=not use_cuda)
    parallel = ParallelismConfig(dp_shard_size=world)
    if use_cuda:
        return Accelerator(fsdp_plugin=plugin, parallelism_config=parallel)  # mesh built on "cuda" by accelerate
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):  # it pins memory for a GPU that is not there
        print("notice: FSDP CPU offload ignored: training on CPU, parameters already live in CPU memory")
        plugin.cpu_offload = OffloadPolicy()
    accelerator = Accelerator(cpu=True)
    state = accelerator.state
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ does
    state.fsdp_plugin = plugin
    state.parallelism_config = parallel
    state.device_mesh = parallel.get_device_mesh("cpu")  # explicit CPU mesh (PyTorch issue 132471)
    return accelerator


def is_sharded(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def fsdp_units(model) -> list:
    """The model's FSDP2 units (modules `fully_shard` wrapped); empty for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def describe(model, accelerator) -> str:
    """One line for the log: how the model is sharded (units, mesh, offload, mixed precision)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    units = [type(m).__name__.removeprefix("FSDP") for m in fsdp_units(model)]
    plugin = accelerator.state.fsdp_plugin
    return (f"FSDP2 over {accelerator.num_processes} processes, mesh {accelerator.torch_device_mesh}, "
            f"{len(units)} units ({', '.join(sorted(set(units)))}), cpu offload {isinstance(plugin.cpu_offload, CPUOffloadPolicy)}, "
            f"mixed precision {plugin.mixed_precision_policy}")


def check_supported(accelerator, method, model, loss_terms: list[Any]) -> None:
    if not is_sharded(accelerator):
        return
    peft_configs = getattr(model, "peft_config", None) or {}
    prompt_learning = any(getattr(c, "is_prompt_learning", False) for c in peft_configs.values())
    if not getattr(method, "supports_sharding", True) or prompt_learning:
        raise ConfigError(f"method.name={method.name}: prompt-learning methods (prefix, prompt) are not supported with "
                          "FSDP sharding (peft builds their virtual tokens outside the sharded modules); use data "
                          "parallelism (train.sharding=none)")
    if loss_terms:
        raise ConfigError("extra loss terms (e.g. EWC) are not supported with FSDP sharding yet (they would see "
                          "parameter shards); use data parallelism (train.sharding=none)")


def set_mixed_precision(accelerator, precision: str) -> None:
    """Under bf16/fp16, gather parameters in that dtype and reduce gradients in fp32 (before `prepare`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from tunesmith.models.hardware import autocast_dtype

    dtype = autocast_dtype(precision)
    if is_sharded(accelerator) and dtype is not None:
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32)


def after_prepare(model) -> None:
    """Force SUM + explicit division for gradient reduction on every FSDP unit (see the module docstring)."""
    for module in fsdp_units(model):
        module.set_force_sum_reduction_for_comms(True)


def as_float(value) -> float:
    """A scalar that may be a replicated DTensor (gradient norms under FSDP)."""
    from torch.distributed.tensor import DTensor

    return float(value.full_tensor() if isinstance(value, DTensor) else value)


def gathered_state(model, full_model: bool) -> dict[str, torch.Tensor]:
    """Collective: the unsharded parameters on the main process's CPU ({} elsewhere).

    full_model=True gathers every parameter (full fine-tuning exports the whole model); False only the trainable
    ones (adapters), so a frozen 70B base is never gathered.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not full_model)
    state = get_model_state_dict(model, options=options)
    # Tied parameters (embedding = head) come back as two separate tensors; alias them again as model.state_dict()
    # does, so that save_pretrained recognises the tie and writes the weight once, exactly as an unsharded run.
    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    for names in names_by_param.values():
        present = [n for n in names if n in state]
        for name in present[1:]:
            state[name] = state[present[0]]
    return state


@contextlib.contextmanager
def exportable(model, method, accelerator):
    """Yield a model that `method.save` can write on the main process; collective under FSDP (all ranks enter).

    Every method saves what `model.state_dict()` returns (peft's and transformers' `save_pretrained`, the
    bottleneck adapters' writer). Under FSDP that would be parameter shards; the export accelerate documents is
    `save_pretrained(dir, state_dict=<gathered state>)`, so for the duration of the block `model.state_dict()`
    returns the gathered, unsharded state instead of widening every method's `save`. Without sharding the model
    is yielded unchanged.
    """
    if not is_sharded(accelerator):
        yield model
        return
    state = gathered_state(model, full_model=method.name == "full")
    model.state_dict = lambda *args, **kwargs: dict(state)
    try:
        yield model
    finally:
        del model.state_dict
