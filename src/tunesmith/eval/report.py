"""`tunesmith eval`: evaluate a trained run (or adapter folder), compare with the base and earlier runs, write
eval.json and eval.html beside the run.

eval.json is an `EvalReport` (records/eval.py), the same record the trainer writes after training; this command
fills its "forgetting", "lm_eval" and "comparison" (rows for base, earlier runs on the same data, and this run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_text
from tunesmith.errors import UsageError
from tunesmith.eval.tables import format_forgetting, format_table
from tunesmith.eval.task import GenerationSettings, data_record_of, evaluate_splits, read_split
from tunesmith.records.eval import EvalReport
from tunesmith.records.run import RunDir


class EvalError(UsageError):
    """A problem with what `tunesmith eval` was asked to do, phrased for a person."""


def _splits(data: list[str] | None, config) -> dict[str, list[str]]:
    from tunesmith.eval.task import configured_splits

    if data:
        return {"test": list(data)}
    splits = configured_splits(config)
    if not splits:
        raise EvalError("no evaluation data: pass --data test.jsonl (the run's config names no data.test)")
    return splits


def _same_files(other: EvalReport, result: dict[str, Any], record: dict[str, Any]) -> bool:
    """For an eval.json written by `tunesmith train` before schema 2 (no data hash): same files, same count."""
    if other.data:
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
            other = EvalReport.read(path)
        except (OSError, ValueError, TypeError):  # unreadable or foreign: not comparable, the table skips it
            continue
        for split, record in data.items():
            same_hash = other.data.get(split, {}).get("hash") == record["hash"]
            for label, results in other.models.items():
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


def _lm_eval(model, tokenizer, tasks: list[str], limit: int | None, log) -> dict[str, Any]:
    from tunesmith.eval.lm_eval_adapter import LmEvalUnavailable, run_lm_eval

    try:
        return {"tasks": tasks, "results": run_lm_eval(model, tokenizer, tasks, limit=limit)}
    except LmEvalUnavailable as exc:
        log(f"notice: {exc}")
        return {"tasks": tasks, "error": str(exc)}


@dataclass(frozen=True)
class EvalRequest:
    """What `tunesmith eval` is asked to do. Unset (None) fields take the run config's eval.* values."""

    path: str | Path  # run directory or saved adapter folder
    data: list[str] | None = None  # test files; default: the run's data.test and eval.splits
    metrics: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # metric options, over the run's eval.metric_options
    base: bool = False  # also evaluate the base model
    max_examples: int | None = None
    max_new_tokens: int | None = None
    batch_size: int | None = None
    forgetting: bool = False
    forgetting_max_prompts: int | None = None
    forgetting_max_probes: int | None = None
    forgetting_max_text_tokens: int | None = 4096
    lm_eval_tasks: list[str] | None = None
    lm_eval_limit: int | None = None

    def settings(self, config) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens or config.eval.max_new_tokens,
                                  batch_size=self.batch_size or config.eval.batch_size,
                                  max_examples=self.max_examples or config.eval.max_examples)


def run_eval(request: EvalRequest, log=print) -> EvalReport:
    """Evaluate, compare, write eval.json + eval.html (paths in `report.paths`); returns the report."""
    from tunesmith.eval.metrics import check_metric_names
    from tunesmith.methods.registry import load_trained

    started = time.perf_counter()
    run = RunDir.find(request.path)
    config = run.config()
    metric_names = check_metric_names(request.metrics or config.eval.metrics)
    metric_options = {**config.eval.metric_options, **request.options}
    settings = request.settings(config)
    splits = {s: (p, read_split(p, config.data.format, config.data.system_prompt))
              for s, p in _splits(request.data, config).items()}
    data_record = {s: data_record_of(p, c, settings.max_examples) for s, (p, c) in splits.items()}

    model, tokenizer, info = load_trained(request.path, log=log)
    def evaluate(m, label):
        return evaluate_splits(m, tokenizer, splits, metric_names, settings, label, log, metric_options=metric_options)

    models = {"tuned": evaluate(model, "tuned")}
    base_model = _base_model(run, config, info, model, log) if request.base or (
        request.forgetting and not hasattr(model, "disable_adapter")) else None
    if request.base:
        models = {"base": evaluate(base_model, "base"), **models}
    forgetting = _forgetting(request, model, tokenizer, base_model, log) if request.forgetting else None
    lm_eval = _lm_eval_both(request, model, base_model, tokenizer, log) if request.lm_eval_tasks else None
    rows = comparison_rows(models, earlier_runs(run.root, data_record), run.name)
    report = EvalReport(
        models=models, data=data_record, metrics=metric_names, metric_options=metric_options,
        settings=settings.as_dict(), written_by="eval", run_dir=str(run.root) if run.root else None,
        evaluated=str(Path(request.path)), model=info, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        forgetting=forgetting, lm_eval=lm_eval, comparison=rows, wall_seconds=round(time.perf_counter() - started, 2),
    )
    _write(report, run.output_dir)
    log(format_table(rows, metric_names))
    if forgetting:
        log(format_forgetting(forgetting))
    return report


def _base_model(run: RunDir, config, info: dict[str, Any], model, log):
    """The base model beside the tuned one (for --base, and forgetting when the tuned model cannot switch off)."""
    from tunesmith.config import ModelConfig
    from tunesmith.models.load import load_model

    model_config = config.model if run.root is not None else ModelConfig(name_or_path=info["base_model"])
    return load_model(model_config, log=log).to(next(model.parameters()).device).eval()


def _forgetting(request: EvalRequest, model, tokenizer, base_model, log) -> dict[str, Any]:
    from tunesmith.eval.forgetting import measure_forgetting

    return measure_forgetting(model, tokenizer, base_model=base_model, max_prompts=request.forgetting_max_prompts,
                              max_probes=request.forgetting_max_probes,
                              max_text_tokens=request.forgetting_max_text_tokens, log=log)


def _lm_eval_both(request: EvalRequest, model, base_model, tokenizer, log) -> dict[str, Any]:
    tasks, limit = request.lm_eval_tasks, request.lm_eval_limit
    result = {"tuned": _lm_eval(model, tokenizer, tasks, limit, log)}
    if base_model is not None and "error" not in result["tuned"]:
        result["base"] = _lm_eval(base_model, tokenizer, tasks, limit, log)
    return result


def _write(report: EvalReport, out_dir: Path) -> None:
    from tunesmith.eval.html import render_eval_html

    report.write(out_dir)
    write_text(out_dir / "eval.html", render_eval_html(report.to_dict()))
    report.paths["eval_html"] = str(out_dir / "eval.html")


def compact(report: EvalReport) -> dict[str, Any]:
    """eval.json without the per-example records and probe items: what `--json` prints."""
    models = {label: {split: {k: v for k, v in r.items() if k != "examples"} for split, r in results.items()}
              for label, results in report.models.items()}
    out = {**report.to_dict(), "models": models, "paths": report.paths}
    if report.forgetting:
        f = dict(report.forgetting)
        f["probes"] = {k: {kk: vv for kk, vv in v.items() if kk != "items"} for k, v in f["probes"].items()}
        out["forgetting"] = f
    return out
