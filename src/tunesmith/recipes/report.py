"""End of a finetune run: task evaluation, the before/after table, loss curves, diagnosis, registration, artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_json
from tunesmith.config import RunConfig
from tunesmith.errors import Failure
from tunesmith.records.eval import EvalReport
from tunesmith.records.run import RunSummary

ARTIFACTS = ("config.yaml", "data_manifest.json", "metrics.jsonl", "loss_curves.png", "adapter", "summary.json",
             "eval.json", "diagnosis.json", "checkpoints")


class RegistrationFailed(Failure):
    """Training finished and its run directory is complete, but recording it in the registry failed."""


def _eval_splits(config: RunConfig) -> dict[str, tuple[list[str], list[Any]]]:
    from tunesmith.eval.task import configured_splits, read_split

    return {name: (paths, read_split(paths, config.data.format, config.data.system_prompt))
            for name, paths in configured_splits(config).items()}


def _settings(config: RunConfig):
    from tunesmith.eval.task import GenerationSettings

    return GenerationSettings(max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                              max_examples=config.eval.max_examples)


def task_eval(config: RunConfig, model, tokenizer, label: str, log) -> dict[str, Any] | None:
    """Generate on the test split (and named extra splits) and score; None when no test data is configured."""
    from tunesmith.eval.task import evaluate_splits

    splits = _eval_splits(config)
    if not splits:
        return None
    return evaluate_splits(model, tokenizer, splits, config.eval.metrics, _settings(config), label, log,
                           metric_options=config.eval.metric_options)


def write_task_eval(config: RunConfig, run_dir: Path, before: dict | None, after: dict | None,
                    log=print) -> dict[str, Any]:
    """Write eval.json (an EvalReport written by "train") and print the before/after table.

    Returns the compact metrics ({model: {split: {metric: value}}}) for summary.json.
    """
    import time

    from tunesmith.eval.tables import format_comparison
    from tunesmith.eval.task import data_record_of

    settings = _settings(config)
    models = {label: results for label, results in (("base", before), ("tuned", after)) if results}
    data = {name: data_record_of(paths, conversations, settings.max_examples)
            for name, (paths, conversations) in _eval_splits(config).items()}
    report = EvalReport(models=models, data=data, metrics=list(config.eval.metrics),
                        metric_options=dict(config.eval.metric_options), settings=settings.as_dict(),
                        written_by="train", run_dir=str(run_dir),
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    report.write(run_dir)
    log(format_comparison(models))
    return report.compact_metrics()


def finish_run(config: RunConfig, run_dir: Path, summary: RunSummary, log=print) -> None:
    """Diagnose and plot the loss curves, register the run, and say where everything is.

    A failed registration raises RegistrationFailed after everything else is written (the run directory is
    complete and can be registered later with `tunesmith runs register RUN_DIR`).
    """
    from tunesmith.eval.diagnose import diagnose_file
    from tunesmith.eval.plots import plot_loss_curves

    metrics = run_dir / "metrics.jsonl"
    diagnosis = diagnose_file(metrics) if metrics.exists() else None
    if diagnosis:
        summary.diagnosis = diagnosis.get("diagnosis")
        write_json(run_dir / "diagnosis.json", diagnosis)
        log(f"diagnosis: {diagnosis.get('diagnosis')}" + "".join(f"\n  - {a}" for a in diagnosis.get("advice", [])))
    if metrics.exists():
        plot_loss_curves(metrics, run_dir / "loss_curves.png", diagnosis=diagnosis)
    summary.write(run_dir)
    failure = register(config, run_dir, summary, log) if config.output.register_run else None
    lines = [f"run directory: {run_dir}"] + [f"  {name}" for name in ARTIFACTS if (run_dir / name).exists()]
    log("\n".join(lines))
    log(json.dumps({k: getattr(summary, k) for k in ("steps", "best_step", "best_eval_loss", "tokens_seen",
                                                    "wall_seconds")}))
    if failure is not None:
        raise failure


def register(config: RunConfig, run_dir: Path, summary: RunSummary, log) -> RegistrationFailed | None:
    """Record the run in the registry; returns (does not raise) the failure so the run's report still prints."""
    try:
        from tunesmith.registry import register_run

        record = register_run(run_dir, url=config.output.registry_url)
    except Exception as exc:  # any cause (store, disk, schema): the run's files are complete either way
        return RegistrationFailed(f"training finished but registering {run_dir} failed: {exc}",
                                  hint=f"the run directory is intact; register it later with "
                                       f"`tunesmith runs register {run_dir}`")
    log(f"registered as {record.get('name')}@{record.get('version')}")
    summary.registry = {"name": record.get("name"), "version": record.get("version")}
    summary.write(run_dir)
    return None
