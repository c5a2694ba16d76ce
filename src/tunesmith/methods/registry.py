"""Method registry: name → Method (peft's `register_peft_method` pattern).

Adding a method is one module (its Method subclass with its options and planning terms, see base.py) and one line
in `BUILTIN` — or a `register_method(METHOD)` call from outside the package. The config schema (`MethodConfig`),
the CLI's method choices, the planner and merge all iterate this registry; none of them names a method.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from tunesmith.methods.base import Method, MethodError, read_method_file

# Modules holding `METHOD`, in the order the config lists their options and the planner its rows.
BUILTIN = (
    "tunesmith.methods.lora",
    "tunesmith.methods.qlora",
    "tunesmith.methods.full",
    "tunesmith.methods.prefix",
    "tunesmith.methods.prompt",
    "tunesmith.methods.adapters",
)
_METHODS: dict[str, Method] = {}


def _builtins() -> dict[str, Method]:
    if not _METHODS:
        for module in BUILTIN:  # light imports: method modules load torch/peft only inside their functions
            method = importlib.import_module(module).METHOD
            _METHODS.setdefault(method.name, method)
    return _METHODS


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make `method` available by its name to the trainer, planner, CLI and merge. Options sections a method
    registered after config.py was imported are not part of MethodConfig (register before importing config to
    add sections); a method without options needs nothing more."""
    methods = _builtins()
    if not method.name:
        raise MethodError(f"{type(method).__name__}: a method needs a name")
    if method.name in methods and not replace:
        raise MethodError(f"method {method.name!r} is already registered (pass replace=True to replace it)")
    methods[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (tests use it to clean up after registering a dummy)."""
    _builtins().pop(name, None)


def method_names() -> list[str]:
    return list(_builtins())


def available_methods() -> list[str]:
    return method_names()


def all_methods() -> list[Method]:
    return list(_builtins().values())


def get_method(name: str) -> Method:
    methods = _builtins()
    if name not in methods:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name]


def load_trained(path: str | Path, log=print) -> tuple[Any, Any, dict[str, Any]]:
    """Load base model + trained state for inference from a run directory or a saved method folder.

    Returns (model, tokenizer, info) with info = {"method", "base_model", "adapter_dir", "run_dir"}.
    """
    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.records.run import RunDir

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    found = RunDir.find(path)
    run_dir = found.root if found.is_run and found.adapter.is_dir() else None
    if run_dir is not None:
        adapter_dir = found.adapter
        run_config = found.config()
        model_config, method_config = run_config.model, run_config.method
    elif path.is_dir():
        adapter_dir = path
        meta = read_method_file(path)
        if meta is None:
            peft_config = path / "adapter_config.json"
            if not peft_config.exists():
                raise FileNotFoundError(f"{path}: neither a run directory (config.yaml + adapter/) nor a saved adapter")
            import json

            base = json.loads(peft_config.read_text())["base_model_name_or_path"]
            meta = {"method": "lora", "base_model": base, "options": {}}
        model_config = ModelConfig(name_or_path=meta["base_model"])
        method_config = MethodConfig.model_validate({**meta.get("options", {}), "name": meta["method"]})
    else:
        raise FileNotFoundError(f"{path}: not found")
    method = get_method(method_config.name)
    tokenizer = load_tokenizer(model_config, log=log)
    base = load_model(model_config, log=log, **method.base_load_kwargs(method_config))
    model = method.prepare_for_generation(method.load(base, adapter_dir))
    model.eval()
    info = {"method": method.name, "base_model": model_config.name_or_path, "adapter_dir": str(adapter_dir),
            "run_dir": str(run_dir) if run_dir else None}
    return model, tokenizer, info
