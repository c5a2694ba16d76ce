"""eval.html: one self-contained page — bar charts of task and forgetting metrics (base vs tuned and earlier
runs), the comparison table and a sample of per-example records. Charts are inline SVG, so the page needs no
other files and no network."""

from __future__ import annotations

import html
from typing import Any

from tunesmith.eval.plots import comparison_figure, figure_svg

SAMPLE = 20  # per-example records shown per split (all of them are in eval.json)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def task_charts(report: dict[str, Any]) -> list[str]:
    charts = []
    splits = list(dict.fromkeys(r["split"] for r in report["comparison"]))
    for split in splits:
        groups = {r["model"]: {m: r["metrics"].get(m) for m in report["metrics"]}
                  for r in report["comparison"] if r["split"] == split}
        charts.append(figure_svg(comparison_figure(groups, f"task metrics — {split}")))
    return charts


def forgetting_charts(forgetting: dict[str, Any]) -> list[str]:
    probes = forgetting["probes"]
    accuracy = {label: {"all probes": probes[label]["accuracy"], "multiple choice": probes[label]["mc_accuracy"],
                        "short answer": probes[label]["short_accuracy"], **probes[label]["by_category"]}
                for label in ("base", "tuned")}
    ppl = {label: {"perplexity (general text)": forgetting["perplexity"][label]} for label in ("base", "tuned")}
    return [figure_svg(comparison_figure(accuracy, "general probes: accuracy (higher is better)")),
            figure_svg(comparison_figure(ppl, "perplexity on general text (lower is better)"))]


def _examples(report: dict[str, Any]) -> str:
    parts = []
    for label, results in report["models"].items():
        for split, result in results.items():
            rows = []
            for example in result["examples"][:SAMPLE]:
                prompt = example["prompt"][-1]["content"] if example["prompt"] else ""
                scores = ", ".join(f"{k}={_fmt(v)}" for k, v in example["scores"].items())
                rows.append([example["index"], prompt[:400], example["reference"][:400], example["prediction"][:400],
                             scores])
            parts.append(f"<h3>{html.escape(label)} — {html.escape(split)}: first {len(rows)} of {result['n']}</h3>"
                         + _table(["#", "last user turn", "reference", "prediction", "scores"], rows))
    return "".join(parts)


def render_eval_html(report: dict[str, Any]) -> str:
    title = f"tunesmith eval — {report.get('run_dir') or report.get('evaluated')}"
    sections = [f"<h1>{html.escape(title)}</h1>",
                f"<p>created {html.escape(report['created'])}; greedy decoding, "
                f"max_new_tokens={report['settings']['max_new_tokens']}</p>"]
    data_rows = [[s, d["subset"], d["hash"].removeprefix("sha256:")[:16], ", ".join(d["files"])]
                 for s, d in report["data"].items()]
    sections.append("<h2>Data</h2>" + _table(["split", "examples", "snapshot hash", "files"], data_rows))
    sections.append("<h2>Task metrics</h2>" + "".join(task_charts(report)))
    rows = [[r["model"], r["split"], *[r["metrics"].get(m, "-") if r["metrics"].get(m) is not None else "-"
                                        for m in report["metrics"]]] for r in report["comparison"]]
    sections.append(_table(["model", "split", *report["metrics"]], rows))
    forgetting = report.get("forgetting")
    if forgetting:
        kept = forgetting["probe_retention"]
        sections.append(
            "<h2>Forgetting</h2>"
            f"<p>mean KL(base || tuned) {forgetting['kl_drift']:.4f} nats per token over {forgetting['prompts']} "
            f"general prompts ({forgetting['kl_positions']} positions); probe retention "
            f"{'n/a' if kept is None else f'{kept:.3f}'}; perplexity ratio {forgetting['perplexity_ratio']:.3f}</p>"
            + "".join(forgetting_charts(forgetting)))
    if report.get("lm_eval"):
        sections.append("<h2>lm-eval</h2><pre>" + html.escape(str(report["lm_eval"])) + "</pre>")
    sections.append("<h2>Examples</h2>" + _examples(report))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top;text-align:left}"
             "svg{max-width:100%;height:auto;display:block;margin:1em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")
