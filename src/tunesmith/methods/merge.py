"""`tunesmith merge RUN --out DIR`: fold a trained method into the base weights, or say why not and export the pair.

- lora: merge_and_unload into a plain transformers model; the logits of merged and unmerged models are compared
  on a few fixed inputs (fp32: max |diff| within 1e-5, held by a test).
- qlora: the base is dequantized to its compute dtype first, then LoRA merges; the reported difference is between
  the merged model and the quantized base + adapter that was trained, which is the quantization error users meet.
- prefix / prompt / adapters: nothing to merge (state is in the context or in nonlinear blocks); the output folder
  gets a copy of the adapter and a README naming the base model and how to load the pair.
- full: refused; the run's adapter/ folder already is a full model.
The merged folder carries `tunesmith_merged.json` and no adapter, so merging it again is refused clearly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tunesmith.atomic import atomic_dir
from tunesmith.methods.base import MethodError, read_method_file
from tunesmith.records.run import RunDir

MERGED_FILE = "tunesmith_merged.json"
PROBE_TEXTS = (
    "The supplier shall indemnify the buyer against all claims.",
    "Either party may terminate this agreement with 30 days' notice.",
    "Hello! How are you today?",
)


def _adapter_dir(path: Path) -> Path:
    """The method folder of a run directory or the folder itself; refuses merged or plain model folders."""
    if (path / MERGED_FILE).exists():
        merged = json.loads((path / MERGED_FILE).read_text())
        raise MethodError(
            f"{path}: already a merged model (merged from {merged.get('source')}); it has no adapter left to merge"
        )
    found = RunDir.find(path)
    candidate = found.adapter if found.is_run and found.adapter.is_dir() else path
    if read_method_file(candidate) is None and not (candidate / "adapter_config.json").exists():
        if (candidate / "config.json").exists():
            raise MethodError(f"{path}: a plain model folder with no adapter (already merged?); nothing to merge")
        raise FileNotFoundError(f"{path}: neither a run directory (config.yaml + adapter/) nor a saved adapter")
    return candidate


def _probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    batch = tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    mask = batch["attention_mask"].bool()
    return logits.float().cpu()[mask]  # (real tokens, vocab): padding positions are not compared


def _export_pair(adapter_dir: Path, out: Path, info: dict[str, Any], reason: str) -> dict[str, Any]:
    with atomic_dir(out) as tmp:
        shutil.copytree(adapter_dir, tmp / "adapter")
        (tmp / "README.md").write_text(
            f"# {info['method']} adapter (not mergeable)\n\n"
            f"Base model: `{info['base_model']}`\n\n"
            f"Why not merged: {reason}.\n\n"
            "Load the pair with:\n\n"
            "```python\nfrom tunesmith.methods.registry import load_trained\n"
            "model, tokenizer, info = load_trained('adapter')\n```\n"
        )
    return {"merged": False, "method": info["method"], "base_model": info["base_model"], "reason": reason,
            "out": str(out), "exported": ["adapter", "README.md"]}


def merge_run(path: str | Path, out: str | Path, log=print) -> dict[str, Any]:
    """Merge (or export) the trained state at `path` into `out`; returns a report (see module doc)."""
    from tunesmith.methods.registry import get_method, load_trained

    path, out = Path(path), Path(out)
    adapter_dir = _adapter_dir(path)
    meta = read_method_file(adapter_dir) or {"method": "lora"}
    method = get_method(meta["method"])
    if not method.export_pair:  # the trained folder is already a whole model
        raise MethodError(f"{path}: {method.merge_refusal}; use {adapter_dir} directly")
    if out.resolve() == path.resolve() or out.resolve() == adapter_dir.resolve():
        raise MethodError(f"--out {out} would overwrite the source; choose another folder")
    model, tokenizer, info = load_trained(path, log=log)
    if not method.can_merge:
        log(f"{method.name} cannot merge into the base weights: {method.merge_refusal}")
        return _export_pair(adapter_dir, out, info, method.merge_refusal)
    # load_trained's base came through models.load.load_model, which already keeps bitsandbytes from repacking the
    # 4-bit weights during this probe (keep_4bit_kernels): merging dequantizes the weights as trained.
    before = _probe_logits(model, tokenizer)
    merged = method.merge(model)
    after = _probe_logits(merged, tokenizer)
    diff = (after - before).abs()
    report = {
        "merged": True, "method": method.name, "base_model": info["base_model"], "source": str(path),
        "out": str(out), "probe_inputs": len(PROBE_TEXTS),
        "compared_to": method.merge_compared_to,
        "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
    }
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGED_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
