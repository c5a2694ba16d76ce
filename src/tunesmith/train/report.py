"""End-of-run reporting: the before/after table, loss curves, diagnosis, registration, artifact list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_json
from tunesmith.config import RunConfig


def write_task_eval(run_dir: Path, before: dict | None, after: dict | None, log=print) -> dict[str, Any]:
    """Write eval.json ({"models": {"base": {split: result}, "tuned": {...}}}) and print the comparison table.

    Returns the compact metrics ({model: {split: {metric: value}}}) for summary.json.
    """
    models = {label: results for label, results in (("base", before), ("tuned", after)) if results}
    write_json(run_dir / "eval.json", {"models": models})
    compact = {label: {split: r["metrics"] for split, r in results.items()} for label, results in models.items()}
    log(format_comparison(models))
    return compact


def format_comparison(models: dict[str, dict[str, Any]]) -> str:
    """A before/after table: one row per (split, metric), one column per model, plus the change."""
    from rich.console import Console
    from rich.table import Table

    labels = list(models)
    table = Table(title="task metrics (measured)")
    table.add_column("split")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    if len(labels) == 2:
        table.add_column("change", justify="right")
    splits = list(dict.fromkeys(s for results in models.values() for s in results))
    for split in splits:
        n = next((models[label][split]["n"] for label in labels if split in models[label]), 0)
        metric_names = list(dict.fromkeys(m for label in labels for m in models[label].get(split, {}).get("metrics", {})))
        for metric in metric_names:
            values = [models[label].get(split, {}).get("metrics", {}).get(metric) for label in labels]
            cells = [f"{v:.3f}" if isinstance(v, (int, float)) else "-" for v in values]
            if len(labels) == 2 and all(isinstance(v, (int, float)) for v in values):
                cells.append(f"{values[1] - values[0]:+.3f}")
            elif len(labels) == 2:
                cells.append("-")
            table.add_row(f"{split} (n={n})", metric, *cells)
    console = Console(width=110, record=True)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def finish_run(config: RunConfig, run_dir: Path, summary: dict[str, Any], log=print) -> None:
    from tunesmith.eval.diagnose import diagnose_file
    from tunesmith.eval.plots import plot_loss_curves

    metrics = run_dir / "metrics.jsonl"
    diagnosis = diagnose_file(metrics) if metrics.exists() else None
    if diagnosis:
        summary["diagnosis"] = diagnosis.get("diagnosis")
        write_json(run_dir / "diagnosis.json", diagnosis)
        log(f"diagnosis: {diagnosis.get('diagnosis')}" + "".join(f"\n  - {a}" for a in diagnosis.get("advice", [])))
    if metrics.exists():
        plot_loss_curves(metrics, run_dir / "loss_curves.png", diagnosis=diagnosis)
    write_json(run_dir / "summary.json", summary)
    if config.output.register_run:
        try:
            from tunesmith.registry import register_run

            record = register_run(run_dir, url=config.output.registry_url)
            log(f"registered as {record.get('name')}@{record.get('version')}")
            summary["registry"] = {"name": record.get("name"), "version": record.get("version")}
            write_json(run_dir / "summary.json", summary)
        except Exception as exc:  # the run's files are complete; registration can be redone with `runs register`
            log(f"warning: registration failed ({exc}); register later with `tunesmith runs register {run_dir}`")
    artifacts = ["config.yaml", "data_manifest.json", "metrics.jsonl", "loss_curves.png", "adapter", "summary.json",
                 "eval.json", "diagnosis.json", "checkpoints"]
    lines = [f"run directory: {run_dir}"]
    for name in artifacts:
        if (run_dir / name).exists():
            lines.append(f"  {name}")
    log("\n".join(lines))
    log(json.dumps({k: summary[k] for k in ("steps", "best_step", "best_eval_loss", "tokens_seen", "wall_seconds")
                    if k in summary}))
