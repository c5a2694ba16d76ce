"""Read a PEFT LoRA adapter folder (safetensors only) into per-module (A, B·scale) pairs, checked against the base.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors` with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (r, in) and `...lora_B.weight` (out, r).
For serving, each module's update is  delta(x) = scale · B (A x)  with scale = alpha/r (alpha/sqrt(r) with rsLoRA),
so the scale is folded into B once at load time (LoRA paper, Hu et al. 2021, §4.1).

Refused with an error that names the file and field: a pickled `adapter_model.bin` (loading pickles runs code),
a file that is a symlink leading out of the adapter folder (except into the Hugging Face cache's own blobs/), a
truncated or corrupt safetensors file, a non-LoRA method, DoRA, trained biases, extra saved modules, embedding
LoRA, an adapter recorded for another base model (identity.py: by local copy and fingerprint, not by name), and
weights whose shapes do not fit the base's modules.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from tunesmith.errors import UsageError
from tunesmith.serve.identity import BaseIdentity, BaseMismatch

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(UsageError):
    """An adapter that cannot be served here, phrased for a person (file, field, what to do)."""


@dataclass
class AdapterSpec:
    """What is known about an adapter without loading its weights (cheap, kept for every registered adapter)."""

    name: str
    path: Path
    rank: int  # the largest rank over its modules
    modules: dict[str, tuple[int, int, int]]  # module name -> (rank, in_features, out_features)
    scales: dict[str, float]
    base_model: str | None
    tenant: str | None = None  # None = shared
    source: str = ""  # how it was named (a path, or registry:ALIAS)
    extra: dict = field(default_factory=dict)


def _inside(folder: Path, path: Path) -> Path:
    """`path`, refused when it is a symlink that leads out of the adapter folder: an adapter named by an operator
    must not make the server read files elsewhere. The Hugging Face cache's own layout (snapshots/<rev>/file ->
    ../../blobs/<sha>) is allowed."""
    target = path.resolve()
    root = folder.resolve()
    if path.is_symlink() and not target.is_relative_to(root):
        hf_blob = target.parent.name == "blobs" and root.parent.name == "snapshots" and \
            target.parent.parent == root.parent.parent
        if not hf_blob:
            raise AdapterError(f"{path}: a symlink to {target}, outside the adapter folder {root}; refused (copy "
                               "the real file into the folder, e.g. cp -L)")
    return path


def _config(folder: Path) -> dict:
    cfg_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: missing; is {folder} a PEFT LoRA adapter folder?")
    _inside(folder, cfg_path)
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path}: not valid JSON ({exc})") from None


def _refuse_unsupported(cfg: dict, cfg_path: Path) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type={peft_type}; the server batches LoRA adapters only")
    checks = [
        ("use_dora", bool(cfg.get("use_dora")), "DoRA needs the weight norm per request; merge it instead (tunesmith merge)"),
        ("bias", cfg.get("bias", "none") not in ("none", None), "trained biases are not batched; retrain with bias=none or merge"),
        ("lora_bias", bool(cfg.get("lora_bias")), "LoRA biases are not batched; merge this adapter instead"),
        ("modules_to_save", bool(cfg.get("modules_to_save")), "fully trained modules differ per adapter; merge instead"),
        ("fan_in_fan_out", bool(cfg.get("fan_in_fan_out")), "Conv1D (GPT-2 style) layers are not supported"),
        ("layer_replication", bool(cfg.get("layer_replication")), "layer replication changes the base; merge instead"),
        ("trainable_token_indices", bool(cfg.get("trainable_token_indices")), "trained token rows differ per adapter"),
    ]
    for name, bad, why in checks:
        if bad:
            raise AdapterError(f"{cfg_path}: field '{name}'={cfg.get(name)!r} is not supported for serving: {why}")


def _scale(cfg: dict, module: str, rank: int) -> float:
    """scale = alpha / r, or alpha / sqrt(r) with rsLoRA; alpha_pattern overrides alpha per module (as peft does)."""
    from peft.utils.other import get_pattern_key

    alpha = cfg.get("lora_alpha", 8)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if alpha_pattern:
        key = get_pattern_key(list(alpha_pattern), module)
        alpha = alpha_pattern.get(key, alpha)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _weights_file(folder: Path) -> Path:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise AdapterError(
                f"{folder / pickled[0]}: pickled adapter weights are refused (loading a pickle can run code); "
                f"convert it once in a trusted place to {WEIGHTS_FILE} (peft: save_pretrained(safe_serialization=True))"
            )
        raise AdapterError(f"{path}: missing; a LoRA adapter folder holds {WEIGHTS_FILE}")
    return _inside(folder, path)


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header; a truncated or corrupt file is refused here, at load time
    (the library checks that the header parses and that every tensor's byte range lies inside the file)."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError/ValueError)
        raise AdapterError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
                           "truncated or corrupt: copy it again, or save the adapter again") from None


def _module_name(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.q_proj.lora_A.weight' -> ('model.layers.0.q_proj', 'A')."""
    stem = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for part in ("A", "B"):
        for tail in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if stem.endswith(tail):
                return stem[: -len(tail)], part
    return stem, ""


def inspect_adapter(
    name: str, folder: str | os.PathLike, linear_shapes: dict[str, tuple[int, int]],
    base: BaseIdentity | set[str], allow_base_mismatch: bool = False,
) -> AdapterSpec:
    """Validate an adapter against the base without loading its tensors: config, file type, modules, shapes.

    linear_shapes: base module name -> (in_features, out_features) for every nn.Linear of the base model.
    base: the server's base (identity.py), or the set of names it goes by.
    allow_base_mismatch: serve an adapter recorded for another base anyway (logged, and noted in spec.extra).
    """
    folder = Path(folder).expanduser()
    cfg = _config(folder)
    cfg_path = folder / CONFIG_FILE
    _refuse_unsupported(cfg, cfg_path)
    recorded = cfg.get("base_model_name_or_path")
    base = base if isinstance(base, BaseIdentity) else BaseIdentity(set(base))
    try:
        base_check = base.check(recorded)
    except BaseMismatch as exc:
        if not allow_base_mismatch:
            raise AdapterError(
                f"{cfg_path}: base_model_name_or_path: {exc}; adapters are trained for one base model: serve it "
                "with its own base or retrain it on this one (--allow-base-mismatch serves it anyway, for experts)"
            ) from None
        base_check = f"MISMATCH allowed by --allow-base-mismatch: {exc}"
        logging.getLogger("tunesmith.serve").warning("adapter '%s' (%s): %s", name, folder, base_check)
    weights = _weights_file(folder)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in _tensor_shapes(weights).items():
        module, part = _module_name(key)
        if not part:
            raise AdapterError(
                f"{weights}: tensor '{key}' is not a LoRA A/B matrix (embedding LoRA or extra state is not served)"
            )
        shapes.setdefault(module, {})[part] = shape
    if not shapes:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    modules: dict[str, tuple[int, int, int]] = {}
    scales: dict[str, float] = {}
    for module, parts in sorted(shapes.items()):
        if set(parts) != {"A", "B"}:
            raise AdapterError(f"{weights}: module '{module}' has lora_{''.join(parts)} but not both A and B")
        if module not in linear_shapes:
            raise AdapterError(
                f"{weights}: module '{module}' is not a linear layer of this base model; the adapter was made for "
                "another architecture"
            )
        (rank, fan_in), (fan_out, rank_b) = parts["A"], parts["B"]
        base_in, base_out = linear_shapes[module]
        if rank != rank_b or fan_in != base_in or fan_out != base_out:
            raise AdapterError(
                f"{weights}: module '{module}' has A {parts['A']} and B {parts['B']} but the base layer is "
                f"{base_in}->{base_out}; the adapter was made for another base model"
            )
        modules[module] = (rank, fan_in, fan_out)
        scales[module] = _scale(cfg, module, rank)
    return AdapterSpec(
        name=name, path=folder, rank=max(r for r, _, _ in modules.values()), modules=modules, scales=scales,
        base_model=recorded, source=str(folder), extra={"base_check": base_check},
    )


def read_weights(spec: AdapterSpec, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load the tensors: module -> (A (r, in), B·scale (out, r)) in `dtype`, on CPU. Runs off the engine thread."""
    from safetensors.torch import load_file

    tensors = load_file(str(_weights_file(spec.path)))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, part = _module_name(key)
        pairs.setdefault(module, {})[part] = value
    out = {}
    for module, (rank, fan_in, fan_out) in spec.modules.items():
        a, b = pairs[module]["A"], pairs[module]["B"]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError(f"{spec.path / WEIGHTS_FILE}: '{module}' changed on disk since it was registered")
        out[module] = (a.to(dtype), (b.float() * spec.scales[module]).to(dtype))
    return out
