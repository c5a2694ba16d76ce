"""Pictures: loss curves (with the eval-loss minimum and the diagnosis) and base-vs-tuned bar charts.

matplotlib runs headless (Agg); every file goes through `atomic.atomic_file` (a temporary name in the target
folder, then one rename, mode 0644), so a reader never sees half a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tunesmith.atomic import atomic_file  # noqa: E402
from tunesmith.records.metrics import read_metrics  # noqa: E402


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of records that carry a finite numeric `key` and a `step`."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and "step" in record:
            steps.append(float(record["step"]))
            values.append(float(value))
    return steps, values


def save_figure_atomic(figure, out_path: str | Path, **kwargs: Any) -> Path:
    out_path = Path(out_path)
    try:
        with atomic_file(out_path) as tmp:
            figure.savefig(tmp, format=out_path.suffix.lstrip(".") or "png", **kwargs)
    finally:
        plt.close(figure)
    return out_path


def _diagnosis_text(diagnosis: str | dict[str, Any] | None) -> str | None:
    if diagnosis is None:
        return None
    if isinstance(diagnosis, str):
        return diagnosis
    text = str(diagnosis.get("diagnosis", ""))
    late = [s["step"] for s in diagnosis.get("spikes", []) if isinstance(s, dict) and s.get("kind") == "late"]
    if late:
        text += f" (late spike at step {', '.join(str(int(s)) for s in late)})"
    return text


def plot_loss_curves(metrics_jsonl_path: str | Path, out_png: str | Path,
                     diagnosis: str | dict[str, Any] | None = None) -> Path:
    """Train and eval loss against optimizer step, a marker at the lowest eval loss, the diagnosis in the title.

    `diagnosis` is a label or the dict from `tunesmith.eval.diagnose.diagnose` (its first advice line is shown).
    """
    records = read_metrics(metrics_jsonl_path)
    train_steps, train_loss = series(records, "train_loss")
    eval_steps, eval_loss = series(records, "eval_loss")
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train_steps:
        axis.plot(train_steps, train_loss, label="train loss", color="#1f77b4", linewidth=1.2, alpha=0.85)
    if eval_steps:
        axis.plot(eval_steps, eval_loss, label="eval loss", color="#d62728", marker="o", markersize=3, linewidth=1.6)
        best = min(range(len(eval_loss)), key=eval_loss.__getitem__)
        axis.scatter([eval_steps[best]], [eval_loss[best]], s=110, marker="*", color="black", zorder=5,
                     label=f"eval min {eval_loss[best]:.4f} @ step {int(eval_steps[best])}")
    if not train_steps and not eval_steps:
        axis.text(0.5, 0.5, "no loss values in metrics.jsonl", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    if train_steps or eval_steps:
        axis.legend(loc="upper right", fontsize=8)
    label = _diagnosis_text(diagnosis)
    axis.set_title(f"Loss curves — diagnosis: {label}" if label else "Loss curves", fontsize=10)
    if isinstance(diagnosis, dict) and diagnosis.get("advice"):
        figure.text(0.01, 0.01, f"advice: {diagnosis['advice'][0]}", fontsize=7, color="#444444")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure_atomic(figure, out_png)


def comparison_figure(groups: dict[str, dict[str, float | None]], title: str, ylabel: str = ""):
    """Grouped bars: one group per measure, one bar per model (e.g. {"base": {...}, "tuned": {...}}).
    A missing value is drawn as no bar (not as zero) and labelled "n/a"."""
    models = list(groups)
    measures = list(dict.fromkeys(m for values in groups.values() for m, v in values.items() if v is not None))
    figure, axis = plt.subplots(figsize=(max(5.0, 1.0 * len(measures) * max(1, len(models)) / 2 + 3), 3.8), dpi=110)
    width = 0.8 / max(1, len(models))
    for k, model in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(measures))]
        values = [groups[model].get(m) for m in measures]
        bars = axis.bar(xs, [v if v is not None else 0.0 for v in values], width=width, label=model)
        axis.bar_label(bars, labels=["n/a" if v is None else f"{v:.3g}" for v in values], fontsize=7)
    axis.set_xticks(range(len(measures)), measures, rotation=20, ha="right", fontsize=8)
    axis.set_title(title, fontsize=10)
    if ylabel:
        axis.set_ylabel(ylabel)
    if models:
        axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def plot_comparison(groups: dict[str, dict[str, float | None]], out_png: str | Path, title: str) -> Path:
    return save_figure_atomic(comparison_figure(groups, title), out_png)


def figure_svg(figure) -> str:
    """The figure as an inline <svg> element (for a self-contained HTML page)."""
    import io

    buffer = io.StringIO()
    try:
        figure.savefig(buffer, format="svg")
    finally:
        plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]
