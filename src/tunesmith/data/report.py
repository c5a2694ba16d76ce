"""report.md + report.html for a prepared dataset: counts table (with the counting identity), length histogram and
cluster chart as PNG, examples of each rejection reason, PII counts by type and every finding (file, line, field,
placeholder), duplicate clusters, leakage.

Text taken from records (reasons, examples) passes through `pii.redact` first: reports never show PII values.
This module reads the manifest and the pipeline's lists; it imports nothing from `prepare` (which imports it).
"""

from __future__ import annotations

import html
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tunesmith.atomic import atomic_file
from tunesmith.data import pii
from tunesmith.records.data import COUNT_ROWS, DataManifest


def reason_class(reason: str) -> str:
    """Group quarantine reasons for the report: drop quoted values and numbers ("unknown role 'bot2'" -> "unknown role")."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\([^)]*\)|(?<![\w-])\d+", "", reason.split(":")[0]).strip()
    return re.sub(r"\s+", " ", text) or reason[:40]


def _save_png(figure, path: Path) -> None:
    with atomic_file(path) as temp:
        figure.savefig(temp, format="png", dpi=100, bbox_inches="tight")


def write_charts(out: Path, manifest: DataManifest) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = {}
    histogram = manifest.lengths["before_trim"].get("histogram")
    if histogram:
        figure, axis = plt.subplots(figsize=(7, 3.5))
        edges, counts = histogram["edges"], histogram["counts"]
        axis.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:], strict=True)], align="edge")
        limit = manifest.lengths["trim_limit"]
        if limit is not None:
            axis.axvline(limit, color="red", linestyle="--", label=f"trim limit {limit:g}")
        seq_len = manifest.lengths["before_trim"].get("seq_len")
        if seq_len is not None and seq_len <= edges[-1]:
            axis.axvline(seq_len, color="orange", linestyle=":", label=f"seq_len {seq_len}")
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
        axis.set_xlabel(manifest.lengths["unit"])
        axis.set_ylabel("records")
        axis.set_title("Record length (before trimming)")
        _save_png(figure, out / "length_hist.png")
        plt.close(figure)
        charts["length_hist"] = "length_hist.png"
    sizes = manifest.diversity.get("sizes")
    if sizes:
        figure, axis = plt.subplots(figsize=(7, 3.5))
        near_empty = set(manifest.diversity.get("near_empty", []))
        axis.bar(range(len(sizes)), sizes, color=["tab:red" if c in near_empty else "tab:blue" for c in range(len(sizes))])
        axis.set_xlabel("cluster (red: near-empty region)")
        axis.set_ylabel("records")
        axis.set_title(f"Clusters ({manifest.diversity.get('embedder', '')})", fontsize=9)
        _save_png(figure, out / "clusters.png")
        plt.close(figure)
        charts["clusters"] = "clusters.png"
    return charts


def _examples(quarantine: list[dict], removed: list[dict], per_reason: int) -> dict[str, list[str]]:
    examples: dict[str, list[str]] = defaultdict(list)
    for q in quarantine:
        key = f"quarantined: {reason_class(q['reason'])}"
        if len(examples[key]) < per_reason:
            field = f" field `{q['field']}`" if q.get("field") else ""
            examples[key].append(f"{q['file']}:{q['line']}{field}: {pii.redact(q['reason'])[:200]}")
    for r in removed:
        key = f"removed: {r['reason']}"
        if len(examples[key]) < per_reason:
            extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("file", "line", "reason"))
            examples[key].append(f"{r['file']}:{r['line']} ({extra})")
    return dict(examples)


def _duplicate_clusters(removed: list[dict], top: int = 10) -> list[tuple[str, int, str]]:
    clusters: Counter = Counter()
    kinds: dict[str, set[str]] = defaultdict(set)
    for r in removed:
        if r["reason"].startswith("duplicate_"):
            key = f"{r['duplicate_of']['file']}:{r['duplicate_of']['line']}"
            clusters[key] += 1
            kinds[key].add(r["reason"].removeprefix("duplicate_"))
    return [(key, n + 1, "+".join(sorted(kinds[key]))) for key, n in clusters.most_common(top)]


def _findings(manifest: DataManifest, findings: list[dict[str, Any]]) -> list[str]:
    """Every PII/secret finding, one row each: where it was and what replaced it, never the value."""
    lines = [f"## PII and secrets (mode: {manifest.pii_mode})", ""]
    lines += [f"- {kind}: {n}" for kind, n in manifest.pii.items()] or ["None found."]
    if findings:
        lines += ["", "| file | line | field | type | placeholder | action |", "|---|---:|---|---|---|---|"]
        lines += [f"| {f['file']} | {f['line']} | `{f['field']}` | {f['type']} | `{f['placeholder']}` | {f['action']} |"
                  for f in findings]
    return lines


def build_markdown(manifest: DataManifest, examples: dict[str, list[str]], clusters: list, charts: dict,
                   findings: list[dict[str, Any]] | None = None) -> str:
    lines = ["# Dataset report", "", "## Counts", "", "| count | records |", "|---|---:|"]
    lines += [f"| {row} | {getattr(manifest, row)} |" for row in COUNT_ROWS]
    lines += ["", f"Identity ({'holds' if manifest.identity['holds'] else 'BROKEN'}): "
              f"{manifest.identity['formula']}", "", "## Splits", "", "| split | count | hash |", "|---|---:|---|"]
    lines += [f"| {name} | {s.count} | `{s.hash}` |" for name, s in manifest.splits.items()]
    if manifest.tool_conversations:
        lines += ["", f"Conversations with tools or tool calls: {manifest.tool_conversations}."]
    lengths = manifest.lengths
    before = lengths["before_trim"]
    lines += ["", "## Lengths", "", f"Unit: {lengths['unit']}.", ""]
    if before.get("count"):
        lines += [f"min {before['min']}, mean {before['mean']}, p50 {before['p50']}, p90 {before['p90']}, "
                  f"p99 {before['p99']}, max {before['max']}; trim limit: {lengths['trim_limit']}."]
        if "seq_len" in lengths["after_trim"]:
            lines += ["", f"Kept records longer than the training sequence length {lengths['after_trim']['seq_len']} "
                      f"(would be truncated): {lengths['after_trim']['over_seq_len']}."]
    if "length_hist" in charts:
        lines += ["", f"![length histogram]({charts['length_hist']})"]
    lines += [""] + _findings(manifest, findings or [])
    diversity = manifest.diversity
    lines += ["", "## Diversity", ""]
    if diversity.get("sizes"):
        lines += [f"Embedder: {diversity['embedder']}; {diversity['clusters']} clusters; sizes {diversity['sizes']}; "
                  f"largest cluster share {diversity['largest_share']:.1%}; near-empty regions (clusters below a fifth "
                  f"of the mean size): {diversity['near_empty'] or 'none'}."]
        if "clusters" in charts:
            lines += ["", f"![clusters]({charts['clusters']})"]
        lines += [""] + [f"- cluster {c}: {text[:120]!r}" for c, text in enumerate(diversity.get("examples", []))]
    else:
        lines += ["Skipped."]
    lines += ["", "## Duplicate clusters (largest first)", ""]
    lines += [f"- {key}: {size} records ({kind})" for key, size, kind in clusters] or ["None."]
    leakage = manifest.leakage["pairs"]
    lines += ["", f"## Leakage across splits (Jaccard >= {manifest.leakage['threshold']})", ""]
    lines += [f"- {p['split']} {p['record']['file']}:{p['record']['line']} ~ train {p['train_record']['file']}:"
              f"{p['train_record']['line']} (J={p['similarity']})" for p in leakage[:20]] or ["None."]
    lines += ["", "## Examples of each rejection reason", ""]
    for reason, items in examples.items():
        lines += [f"### {reason}", ""] + [f"- {item}" for item in items] + [""]
    if not examples:
        lines += ["No record was rejected."]
    return "\n".join(lines).rstrip() + "\n"


def markdown_to_html(markdown: str) -> str:
    """A small converter for the subset build_markdown emits (headings, tables, lists, images, paragraphs)."""
    body, table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            tag = "th" if not table else "td"
            body.append(("<table>" if not table else "") + "<tr>" + "".join(
                f"<{tag}>{html.escape(c).replace('`', '')}</{tag}>" for c in cells) + "</tr>")
            table = True
            continue
        if table:
            body.append("</table>")
            table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if table:
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:2px 8px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Dataset report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def write_report(out: Path, manifest: DataManifest, quarantine: list[dict], removed: list[dict],
                 findings: list[dict] | None = None, per_reason: int = 3) -> dict[str, str]:
    from tunesmith.atomic import write_text as atomic_write_text

    charts = write_charts(out, manifest)
    markdown = build_markdown(manifest, _examples(quarantine, removed, per_reason), _duplicate_clusters(removed), charts,
                              findings)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", markdown_to_html(markdown))
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), **{k: str(out / v) for k, v in charts.items()}}
