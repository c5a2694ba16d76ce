"""What the machine can do: device choice and whether bf16 runs natively.

Measured on the development machines (2 cores, AVX2, no AVX-512-BF16/AMX): bf16 autocast ran 10-30x slower than
fp32, so bf16 is used only where the hardware has native support.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def bf16_is_native(device: torch.device | None = None) -> bool:
    device = device or default_device()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_precision(requested: str, device: torch.device | None = None, log=print) -> str:
    """'auto' → 'bf16' where native, else 'fp32'. An explicit 'bf16' on hardware without it falls back with a notice."""
    device = device or default_device()
    if requested == "auto":
        if bf16_is_native(device):
            return "bf16"
        if device.type == "cpu":
            log("notice: no native bf16 on this CPU (bf16 measured 10-30x slower than fp32 on such CPUs); using fp32")
        return "fp32"
    if requested == "bf16" and not bf16_is_native(device):
        log("notice: this CPU has no native bf16 (measured 10-30x slower than fp32 here); training in fp32")
        return "fp32"
    if requested == "fp16" and device.type != "cuda":
        log("notice: fp16 autocast needs a GPU; training in fp32")
        return "fp32"
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak GPU memory allocated, or the process's peak resident set size on CPU."""
    device = device or default_device()
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
