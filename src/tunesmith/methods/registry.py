"""Method registry: name → Method. Adding a method is one module and one line here."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from tunesmith.methods.base import Method, MethodError, read_method_file

# name → module holding `METHOD`
_MODULES = {
    "lora": "tunesmith.methods.lora",
    "qlora": "tunesmith.methods.qlora",
    "full": "tunesmith.methods.full",
    "prefix": "tunesmith.methods.prefix",
    "prompt": "tunesmith.methods.prompt",
    "adapters": "tunesmith.methods.adapters",
}


def available_methods() -> list[str]:
    return list(_MODULES)


def get_method(name: str) -> Method:
    if name not in _MODULES:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).METHOD


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
