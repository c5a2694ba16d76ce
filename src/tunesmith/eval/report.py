"""`tunesmith eval`: evaluate a trained run (or adapter folder), compare with the base and earlier runs, write
eval.json and eval.html beside the run.

eval.json keeps the layout the trainer writes ({"models": {"base"|"tuned": {split: evaluate_task result}}}) and
adds: "data" (files, snapshot hash, how many examples of how many), "forgetting", "lm_eval", "comparison"
(rows for base, earlier runs on the same data, and this run) and "settings".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from tunesmith.atomic import write_json, write_text


class EvalError(ValueError):
    """A problem with what `tunesmith eval` was asked to do, phrased for a person."""


def resolve_run(path: str | Path) -> tuple[Path | None, Path]:
    """(run directory or None, folder that receives eval.json) for a run directory or an adapter folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory or adapter folder")
    if (path / "config.yaml").exists():
        return path, path
    if (path.parent / "config.yaml").exists():  # runs/<name>/adapter
        return path.parent, path.parent
    return None, path


def _run_config(run_dir: Path | None):
    from tunesmith.config import RunConfig

    if run_dir is None:
        return RunConfig()
    try:
        return RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})
    except Exception as exc:
        raise EvalError(f"{run_dir / 'config.yaml'}: cannot be read as a run config: {exc}") from exc


def _splits(data: list[str] | None, config) -> dict[str, list[str]]:
    if data:
        return {"test": list(data)}
    splits = {"test": list(config.data.test)} if config.data.test else {}
    splits.update(config.eval.splits)
    if not splits:
        raise EvalError("no evaluation data: pass --data test.jsonl (the run's config names no data.test)")
    return splits


def _read_split(paths: list[str], fmt: str, system_prompt: str | None):
    from tunesmith.data.formats import read_conversations

    conversations = []
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: evaluation data file not found (--data)")
        conversations.extend(read_conversations(path, fmt))
    if system_prompt:
        for c in conversations:
            if c.messages[0]["role"] != "system":
                c.messages.insert(0, {"role": "system", "content": system_prompt})
    return conversations


def _data_record(paths: list[str], conversations, max_examples: int | None) -> dict[str, Any]:
    from tunesmith.data.formats import snapshot_hash

    n = min(len(conversations), max_examples or len(conversations))
    return {"files": [str(Path(p).resolve()) for p in paths], "hash": snapshot_hash(conversations[:n]),
            "n_total": len(conversations), "n_evaluated": n,
            "subset": "all" if n == len(conversations) else f"first {n} of {len(conversations)} (file order)"}


def _evaluate(model, tokenizer, splits_data, metrics, options, settings, label, log) -> dict[str, Any]:
    from tunesmith.eval.task import evaluate_task

    results = {}
    for split, (paths, conversations) in splits_data.items():
        started = time.perf_counter()
        n = min(len(conversations), settings["max_examples"] or len(conversations))
        log(f"evaluating the {label} model on {split} ({n} of {len(conversations)} examples)")
        result = evaluate_task(model, tokenizer, conversations, metrics, max_new_tokens=settings["max_new_tokens"],
                               batch_size=settings["batch_size"], max_examples=settings["max_examples"], **options)
        result["seconds"] = round(time.perf_counter() - started, 2)
        result["files"] = list(paths)
        results[split] = result
    return results


def _same_files(other: dict[str, Any], result: dict[str, Any], record: dict[str, Any]) -> bool:
    """For an eval.json written by `tunesmith train` (no data hash): same files, same number evaluated."""
    if "data" in other:
        return False
    files = [str(Path(p).resolve()) for p in result.get("files", [])]
    return files == record["files"] and result.get("n") == record["n_evaluated"]


def earlier_runs(run_dir: Path | None, data: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Sibling run directories whose eval.json scored the same data (same snapshot hash) — for the table."""
    if run_dir is None or not run_dir.parent.is_dir():
        return []
    rows = []
    for sibling in sorted(run_dir.parent.iterdir()):
        path = sibling / "eval.json"
        if sibling.resolve() == run_dir.resolve() or not path.is_file():
            continue
        try:
            other = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for split, record in data.items():
            same_hash = other.get("data", {}).get(split, {}).get("hash") == record["hash"]
            for label, results in other.get("models", {}).items():
                if split in results and (same_hash or _same_files(other, results[split], record)):
                    rows.append({"model": f"{sibling.name} ({label})" if label != "tuned" else sibling.name,
                                 "split": split, "source": str(path), "metrics": results[split]["metrics"]})
    return rows


def comparison_rows(models: dict[str, dict[str, Any]], earlier: list[dict[str, Any]], run_name: str) -> list[dict[str, Any]]:
    rows = []
    for label in ("base", "tuned"):
        for split, result in models.get(label, {}).items():
            rows.append({"model": run_name if label == "tuned" else "base", "split": split, "source": "this eval",
                         "metrics": result["metrics"]})
    have_base = any(r["model"] == "base" for r in rows)
    for row in earlier:
        if row["model"].endswith("(base)"):
            if have_base:
                continue
            row = {**row, "model": f"base (from {row['model'][: -len(' (base)')]})"}
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], metric_names: list[str]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="task metrics (measured)")
    table.add_column("model")
    table.add_column("split")
    for name in metric_names:
        table.add_column(name, justify="right")
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, (int, float)) else "-" for v in (row["metrics"].get(n) for n in metric_names)]
        table.add_row(row["model"], row["split"], *cells)
    console = Console(width=140, record=True)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


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


def _lm_eval(model, tokenizer, tasks: list[str], limit: int | None, log) -> dict[str, Any]:
    from tunesmith.eval.lm_eval_adapter import LmEvalUnavailable, run_lm_eval

    try:
        return {"tasks": tasks, "results": run_lm_eval(model, tokenizer, tasks, limit=limit)}
    except LmEvalUnavailable as exc:
        log(f"notice: {exc}")
        return {"tasks": tasks, "error": str(exc)}


def run_eval(path: str | Path, data: list[str] | None = None, metrics: list[str] | None = None, base: bool = False,
             max_examples: int | None = None, forgetting: bool = False, forgetting_max_prompts: int | None = None,
             forgetting_max_probes: int | None = None, forgetting_max_text_tokens: int | None = 4096,
             lm_eval_tasks: list[str] | None = None,
             lm_eval_limit: int | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
             options: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Evaluate, compare, write eval.json + eval.html; returns the eval.json content."""
    from tunesmith.eval.metrics import check_metric_names
    from tunesmith.methods.registry import load_trained

    started = time.perf_counter()
    run_dir, out_dir = resolve_run(path)
    config = _run_config(run_dir)
    metric_names = check_metric_names(metrics or config.eval.metrics)
    metric_options = {**config.eval.metric_options, **(options or {})}
    settings = {"max_new_tokens": max_new_tokens or config.eval.max_new_tokens,
                "batch_size": batch_size or config.eval.batch_size,
                "max_examples": max_examples or config.eval.max_examples, "decoding": "greedy"}
    splits = _splits(data, config)
    splits_data = {s: (p, _read_split(p, config.data.format, config.data.system_prompt)) for s, p in splits.items()}
    data_record = {s: _data_record(p, c, settings["max_examples"]) for s, (p, c) in splits_data.items()}

    model, tokenizer, info = load_trained(path, log=log)
    models = {"tuned": _evaluate(model, tokenizer, splits_data, metric_names, metric_options, settings, "tuned", log)}
    base_model = None
    if base or (forgetting and not hasattr(model, "disable_adapter")):
        from tunesmith.config import ModelConfig
        from tunesmith.models.load import load_model

        model_config = config.model if run_dir is not None else ModelConfig(name_or_path=info["base_model"])
        base_model = load_model(model_config, log=log).to(next(model.parameters()).device).eval()
    if base:
        models = {"base": _evaluate(base_model, tokenizer, splits_data, metric_names, metric_options, settings,
                                    "base", log), **models}
    forgetting_result = None
    if forgetting:
        from tunesmith.eval.forgetting import measure_forgetting

        forgetting_result = measure_forgetting(model, tokenizer, base_model=base_model,
                                               max_prompts=forgetting_max_prompts, max_probes=forgetting_max_probes,
                                               max_text_tokens=forgetting_max_text_tokens, log=log)
    lm_eval = None
    if lm_eval_tasks:
        lm_eval = {"tuned": _lm_eval(model, tokenizer, lm_eval_tasks, lm_eval_limit, log)}
        if base_model is not None and "error" not in lm_eval["tuned"]:
            lm_eval["base"] = _lm_eval(base_model, tokenizer, lm_eval_tasks, lm_eval_limit, log)

    run_name = run_dir.name if run_dir is not None else out_dir.name
    rows = comparison_rows(models, earlier_runs(run_dir, data_record), run_name)
    report = {
        "version": 1, "run_dir": str(run_dir) if run_dir else None, "evaluated": str(Path(path)), "model": info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metric_names,
        "metric_options": metric_options, "settings": settings, "data": data_record, "models": models,
        "forgetting": forgetting_result, "lm_eval": lm_eval, "comparison": rows,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out_dir / "eval.json", report)
    from tunesmith.eval.html import render_eval_html

    write_text(out_dir / "eval.html", render_eval_html(report))
    report["paths"] = {"eval_json": str(out_dir / "eval.json"), "eval_html": str(out_dir / "eval.html")}
    log(format_table(rows, metric_names))
    if forgetting_result:
        log(format_forgetting(forgetting_result))
    return report


def compact(report: dict[str, Any]) -> dict[str, Any]:
    """eval.json without the per-example records and probe items: what `--json` prints."""
    models = {label: {split: {k: v for k, v in r.items() if k != "examples"} for split, r in results.items()}
              for label, results in report["models"].items()}
    out = {**report, "models": models}
    if report.get("forgetting"):
        f = dict(report["forgetting"])
        f["probes"] = {k: {kk: vv for kk, vv in v.items() if kk != "items"} for k, v in f["probes"].items()}
        out["forgetting"] = f
    return out
