"""Compare two runs: every config key that differs, and their metrics side by side (summary.json + eval.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.registry.runs import show_run

# Keys that differ between any two runs by construction; listing them would bury the real differences.
IGNORED_CONFIG_KEYS = ("output.name",)
RECORD_FIELDS = ("method", "base_model", "base_model_hash", "data_hash", "adapter_digest", "code_version")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay whole values."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(flatten(child, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value} if prefix else {"": value}


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Numbers from summary.json (as `summary.<key>`) and eval.json (as `eval.<dotted key>`)."""
    out: dict[str, float] = {}
    for source in ("summary", "eval"):
        for key, value in flatten(record.get(source) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key:
                out[f"{source}.{key}"] = float(value)
    return out


def compare_runs(ref_a: str, ref_b: str, url: str | Path | None = None) -> dict[str, Any]:
    """{a, b, record: [(field, a, b)], config: [(key, a, b)] for differing keys, metrics: [(key, a, b, b - a)]}."""
    a, b = show_run(ref_a, url), show_run(ref_b, url)
    config_a, config_b = flatten(a["config"]), flatten(b["config"])
    config = [
        (key, config_a.get(key), config_b.get(key))
        for key in sorted(set(config_a) | set(config_b))
        if key not in IGNORED_CONFIG_KEYS and config_a.get(key) != config_b.get(key)
    ]
    metrics_a, metrics_b = numeric_metrics(a), numeric_metrics(b)
    metrics = []
    for key in sorted(set(metrics_a) | set(metrics_b)):
        va, vb = metrics_a.get(key), metrics_b.get(key)
        metrics.append((key, va, vb, None if va is None or vb is None else vb - va))
    record = [(f, a.get(f), b.get(f)) for f in RECORD_FIELDS]
    return {"a": a["ref"], "b": b["ref"], "record": record, "config": config, "metrics": metrics}


def format_comparison(result: dict[str, Any]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.6g}"
        text = str(value)
        return text if len(text) <= 28 else text[:27] + "…"  # full values: --json

    a, b = result["a"], result["b"]
    lines = [f"{'':34} {a:>28} {b:>28}"]
    lines += [f"{f:34} {cell(va):>28} {cell(vb):>28}" for f, va, vb in result["record"]]
    lines.append(f"\nconfig differences ({len(result['config'])}):")
    lines += [f"  {k:32} {cell(va):>28} {cell(vb):>28}" for k, va, vb in result["config"]] or ["  (none)"]
    lines.append(f"\nmetrics ({len(result['metrics'])}):{'':19} {a:>28} {b:>28} {'b - a':>12}")
    lines += [f"  {k:32} {cell(va):>28} {cell(vb):>28} {cell(d):>12}" for k, va, vb, d in result["metrics"]]
    return "\n".join(lines)
