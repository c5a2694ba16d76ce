"""Printed tables of task metrics: the trainer's before/after table and `tunesmith eval`'s comparison table."""

from __future__ import annotations

from typing import Any


def _render(table, width: int) -> str:
    from rich.console import Console

    console = Console(width=width, record=True)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def format_comparison(models: dict[str, dict[str, Any]]) -> str:
    """A before/after table: one row per (split, metric), one column per model, plus the change."""
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
    return _render(table, 110)


def format_table(rows: list[dict[str, Any]], metric_names: list[str]) -> str:
    """`tunesmith eval`'s table: one row per (model, split) — this run, its base, earlier runs on the same data."""
    from rich.table import Table

    table = Table(title="task metrics (measured)")
    table.add_column("model")
    table.add_column("split")
    for name in metric_names:
        table.add_column(name, justify="right")
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, (int, float)) else "-" for v in (row["metrics"].get(n) for n in metric_names)]
        table.add_row(row["model"], row["split"], *cells)
    return _render(table, 140)


def format_forgetting(forgetting: dict[str, Any] | None) -> str:
    if not forgetting:
        return ""
    acc = forgetting["probe_accuracy"]
    ppl = forgetting["perplexity"]
    kept = forgetting["probe_retention"]
    return (f"forgetting: KL(base||tuned) {forgetting['kl_drift']:.4f} nats/token over {forgetting['prompts']} prompts; "
            f"probe accuracy base {acc['base']:.3f} -> tuned {acc['tuned']:.3f} "
            f"(retention {'n/a' if kept is None else f'{kept:.3f}'}); "
            f"perplexity base {ppl['base']:.2f} -> tuned {ppl['tuned']:.2f}")
