"""Load a base model and its tokenizer from a local path, a hub id, or a GGUF file.

Resolution order for `name_or_path`: an existing local directory; a known id whose packaged GGUF copy can be
converted locally (see reference.py); otherwise a hub id, downloaded by transformers as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.config import ModelConfig
from tunesmith.models import reference
from tunesmith.models.hardware import bf16_is_native, default_device

# Used when a tokenizer has no chat template of its own (base models): ChatML, the most common convention.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_source(config: ModelConfig, log=print) -> str:
    """The path or hub id transformers should load from."""
    if Path(config.name_or_path).expanduser().is_dir():
        return str(Path(config.name_or_path).expanduser())
    if config.gguf_file is None and config.name_or_path in reference.PACKAGED and reference.is_available(
        config.name_or_path
    ):
        return str(reference.ensure_converted(config.name_or_path, log=log))
    return config.name_or_path  # a hub id: real download code, needs network access


def torch_dtype(config: ModelConfig, device: torch.device | None = None) -> torch.dtype:
    if config.dtype == "auto":
        device = device or default_device()
        return torch.bfloat16 if device.type == "cuda" and bf16_is_native(device) else torch.float32
    return getattr(torch, config.dtype)


def load_tokenizer(config: ModelConfig, log=print) -> PreTrainedTokenizerBase:
    source = resolve_source(config, log=log)
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if config.revision:
        kwargs["revision"] = config.revision
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log(f"notice: {config.name_or_path} has no chat template; using ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_model(config: ModelConfig, log=print, **extra: Any) -> PreTrainedModel:
    """Load the base model. `extra` goes to from_pretrained (a method's quantization_config, device_map, ...)."""
    source = resolve_source(config, log=log)
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code, "dtype": torch_dtype(config)}
    if config.revision:
        kwargs["revision"] = config.revision
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    kwargs.update(extra)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if config.gguf_file:
        reference.detach_gguf_quantizer(model)
    keep_4bit_kernels(model)
    return model


def keep_4bit_kernels(model) -> None:
    """Stop bitsandbytes (>= 0.48) from repacking 4-bit weights into its CPU inference layout on the fly.

    On CPUs with AVX512-BF16/AMX, a Linear4bit forward in eval mode without grad converts its weight IN PLACE to a
    packed layout with other numerics; every later forward, training included, then runs on it. So a run that
    evaluated at step N trained differently from one resumed after step N (9e-5 loss at the next step), and a loaded
    adapter's logits depended on whether something had evaluated first. One kernel throughout; no-op elsewhere."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
