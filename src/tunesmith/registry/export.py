"""Export a registered run as a self-contained folder that vLLM, LoRAX or peft load directly.

Layout (plain PEFT at the top level, so `--lora-modules name=DIR` and `PeftModel.from_pretrained(base, DIR)` work):
    adapter_config.json, adapter_model.safetensors   the adapter, byte-identical to the registered artifact
    README.md                                        model card: base + weights hash, data hash, config, metrics
    config.yaml, tunesmith_run.json                  the resolved run config and the full registry record
    logs/metrics.jsonl, logs/loss_curves.png         training curves, when the run has them
The folder is built under a temporary name beside DIR and renamed into place, so DIR is complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tunesmith.registry import artifacts as art
from tunesmith.registry.compare import numeric_metrics
from tunesmith.registry.runs import show_run
from tunesmith.registry.store import RegistryError, open_registry


def export_run(ref: str, out: str | Path, url: str | Path | None = None) -> dict[str, Any]:
    registry = open_registry(url)
    record = show_run(ref, url)
    if record["adapter_digest"] is None:
        raise RegistryError(f"{record['ref']} has no adapter (status {record['status']}); nothing to export")
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise RegistryError(f"{out}: exists and is not empty; choose a new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _copy_tree(art.materialize(registry.store, record["adapter_digest"]), staging)
        if record["logs_digest"]:
            _copy_tree(art.materialize(registry.store, record["logs_digest"]), staging / "logs")
        (staging / "config.yaml").write_text(record["config_yaml"], encoding="utf-8")
        (staging / "tunesmith_run.json").write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        (staging / "README.md").write_text(model_card(record), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    peft = (out / "adapter_config.json").is_file()
    return {"ref": record["ref"], "out": str(out), "adapter_digest": record["adapter_digest"], "peft_layout": peft,
            "files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())}


def _copy_tree(source: Path, target: Path) -> None:
    for rel, path in art.tree_files(source):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / rel)


def model_card(record: dict[str, Any]) -> str:
    """README.md with Hugging Face model-card front matter (base_model, library_name) and the run's facts."""
    front = {"base_model": record["base_model"], "library_name": "peft", "tags": ["tunesmith", record["method"] or "adapter"]}
    metrics = numeric_metrics(record)
    rows = [
        ("run", record["ref"]), ("status", record["status"]), ("method", record["method"]),
        ("base model", record["base_model"]), ("base weights sha256 (safetensors)", record["base_model_hash"]),
        ("training data snapshot", record["data_hash"]), ("data files", ", ".join(record["data_location"]) or None),
        ("adapter digest", record["adapter_digest"]), ("code version", record["code_version"]),
        ("lineage", ", ".join(f"{p['relation']} {p['ref']}" for p in record["parents"]) or None),
        ("registered", record["created_at"]),
    ]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {record['name']} (version {record['version']})", "",
             "Fine-tuned with tunesmith; exported from its run registry.", "",
             "| field | value |", "|---|---|"]
    lines += [f"| {k} | {'unknown' if v is None else v} |" for k, v in rows]
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No metrics were recorded for this run.")
    lines += ["", "## Training configuration", "", "```yaml", record["config_yaml"].rstrip(), "```", "",
              "## Loading", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM",
              f"base = AutoModelForCausalLM.from_pretrained({record['base_model']!r})",
              "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')", "```", "",
              f"vLLM: `vllm serve {record['base_model']} --enable-lora --lora-modules {record['name']}=THIS_FOLDER`", ""]
    return "\n".join(lines)
