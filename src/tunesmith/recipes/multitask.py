"""Multi-task runs: the task mixture a run trains on, one adapter per task, and the interference matrix.

A run config may list `data.datasets` (each: name, train/validation/test files, weight, task_prefix,
system_prompt) instead of data.train. `materialize` turns that into what the finetune recipe reads:
    inputs/train.jsonl        the weighted mixture (data/mixing.py: apportioned counts, without replacement
                              within a task, shuffled), plus data.general at data.general_share and the parent's
                              replay buffer at continual.replay_share
    inputs/validation-<task>.jsonl   each task's validation records, task-formatted (a validation loss per task)
    inputs/test-<task>.jsonl  every task's test records, task-formatted; evaluated as the split `<task>`, so
                              `eval` reports every metric per task
The inputs folder is `<output.dir>/<name>.inputs/` (beside the run directory, which the recipe creates itself);
the mixture's per-task counts (drawn, repeats, unused, realised share, replayed records per source run) are
added to the run's data_manifest.json under "mixture".

`train_per_task` trains one LoRA per task on the shared base (one run each, registered under `<name>-<task>`),
and prints the `tunesmith serve` line that serves them side by side. `interference_matrix` scores every task's
test set with every adapter: M[i][j] = metric of task j under adapter i.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.config import ConfigError, RunConfig, TaskDataset
from tunesmith.data.formats import Conversation, read_conversations
from tunesmith.data.mixing import TaskSource, apply_task_format, mix, replay_counts, with_general, write_conversations


def inputs_dir(config: RunConfig) -> Path:
    return Path(config.output.dir) / f"{config.output.name or 'run'}.inputs"


def _read_all(paths: list[str], fmt: str) -> list[Conversation]:
    return [c for path in paths for c in read_conversations(path, fmt)]


def task_splits(task: TaskDataset, fmt: str = "auto") -> dict[str, list[Conversation]]:
    """A task's train/validation/test records with its prefix and system prompt applied."""
    return {split: apply_task_format(_read_all(getattr(task, split), fmt), task.task_prefix, task.system_prompt,
                                     task.name)
            for split in ("train", "validation", "test")}


def with_share(sources: list[TaskSource], name: str, records: list[Conversation], share: float,
               origin: str) -> list[TaskSource]:
    """Add a source making up `share` of the mixture; the other weights keep their ratios."""
    if share <= 0:
        return sources
    if not records:
        raise ConfigError(f"a share of {share} is asked of '{name}' but it has no records")
    if name == "general":
        return with_general(sources, records, share)
    norm = sum(s.weight for s in sources)
    scaled = [TaskSource(s.name, s.conversations, s.weight / norm * (1 - share), s.prefix, s.system_prompt, s.origin)
              for s in sources]
    return [*scaled, TaskSource(name, records, share, origin=origin)]


def materialize(config: RunConfig, replay: list[Conversation] | None = None,
                log=print) -> tuple[RunConfig, dict, list[Conversation] | None]:
    """Write the mixture and the per-task splits; return (a copy of the config that reads them, mixture report,
    the mixed records with their meta: task, and for replayed records the run they come from).

    Without data.datasets the configured train files form the single task `train` (so replay and general data
    can still be mixed in). Nothing is written when there is nothing to mix (returns the config unchanged, {}, None).
    """
    data = config.data
    if not data.datasets and not replay and not data.general_share:
        return config, {}, None
    folder = inputs_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    new = config.model_copy(deep=True)
    sources, validation, tests = [], {}, {}
    tasks = data.datasets or [TaskDataset(name="train", train=data.train, validation=data.validation, test=data.test)]
    for task in tasks:
        if not task.train:
            raise ConfigError(f"data.datasets[{task.name}].train: no training files")
        splits = task_splits(task, data.format)
        sources.append(TaskSource(task.name, splits["train"], task.weight, origin="dataset"))
        if splits["validation"]:
            validation[task.name] = splits["validation"]
        if splits["test"]:
            tests[task.name] = splits["test"]
    if data.general_share:
        sources = with_share(sources, "general", _read_all(data.general, data.format), data.general_share, "general")
    if replay:
        sources = with_share(sources, "replay", replay, config.continual.replay_share, "replay")
    mixed, report = mix(sources, total=data.mix_size, seed=config.train.seed)
    report["replayed_from"] = replay_counts(mixed)
    write_conversations(folder / "train.jsonl", mixed)
    new.data.train = [str((folder / "train.jsonl").resolve())]
    if validation:  # one file per task: the trainer logs eval_loss/<task> per validation file (recipes/finetune.py)
        new.data.validation = []
        for name, records in validation.items():
            path = folder / (f"validation-{name}.jsonl" if data.datasets else "validation.jsonl")
            write_conversations(path, records)
            new.data.validation.append(str(path.resolve()))
    if data.datasets:
        new.data.test = []
        for name, records in tests.items():
            path = folder / f"test-{name}.jsonl"
            write_conversations(path, records)
            new.eval.splits[name] = [str(path.resolve())]
    counts = ", ".join(f"{name} {row['drawn']}" for name, row in report["tasks"].items())
    log(f"training mixture: {len(mixed)} records ({counts}); inputs in {folder}")
    return new, report, mixed


def add_mixture_to_manifest(run_dir: Path, report: dict[str, Any]) -> None:
    import json

    from tunesmith.atomic import write_json

    path = Path(run_dir) / "data_manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest["mixture"] = report
    write_json(path, manifest)


def train_per_task(config: RunConfig, log=print) -> list[dict[str, Any]]:
    """One LoRA per task of data.datasets on the shared base, each its own run `<name>-<task>`; prints the serve
    line. Returns [{"task", "run_dir", "registry"}]."""
    from tunesmith.recipes.finetune import run_finetune

    if not config.data.datasets:
        raise ConfigError("data.datasets: `multitask train` needs a list of tasks (name, train, test, ...)")
    base_name = config.output.name or "run"
    runs = []
    for task in config.data.datasets:
        single = config.model_copy(deep=True)
        single.data.datasets = [task.model_copy(update={"weight": 1.0})]
        single.output.name = f"{base_name}-{task.name}"
        log(f"--- task {task.name}: run {single.output.name}")
        prepared, report, _ = materialize(single, log=log)
        summary = run_finetune(prepared)
        run_dir = Path(prepared.output.dir) / single.output.name
        add_mixture_to_manifest(run_dir, report)
        registry = getattr(summary, "registry", None) if summary is not None else None
        runs.append({"task": task.name, "run_dir": str(run_dir), "registry": registry})
    adapters = " ".join(f"--adapter {r['task']}={Path(r['run_dir']) / 'adapter'}" for r in runs)
    log(f"serve them side by side:\n  tunesmith serve --model {config.model.name_or_path} {adapters}")
    return runs


def interference_matrix(config: RunConfig, adapters: dict[str, str | Path], max_examples: int | None = None,
                        include_base: bool = True, log=print) -> dict[str, Any]:
    """M[adapter][task] = the task's headline metric (the first of eval.metrics) with that adapter alone active.

    Returns {"tasks", "metric", "rows": {adapter: {task: value}}, "details": {adapter: {task: metrics}}}.
    """
    from tunesmith.eval.task import evaluate_task
    from tunesmith.methods.combine import load_stack
    from tunesmith.models.load import load_model, load_tokenizer

    if not config.data.datasets:
        raise ConfigError("data.datasets: the interference matrix needs the tasks (and their test files)")
    tokenizer = load_tokenizer(config.model, log=log)
    tests = {t.name: task_splits(t, config.data.format)["test"] for t in config.data.datasets}
    missing = [name for name, records in tests.items() if not records]
    if missing:
        raise ConfigError(f"data.datasets: no test files for task(s) {', '.join(missing)}")
    metric = config.eval.metrics[0]
    rows: dict[str, dict[str, float | None]] = {}
    details: dict[str, dict[str, Any]] = {}
    candidates: list[tuple[str, str | Path | None]] = ([("base", None)] if include_base else [])
    candidates += list(adapters.items())
    for name, path in candidates:
        model = load_model(config.model, log=lambda *a: None)
        if path is not None:
            model = load_stack(model, {name: path})
        model.eval()
        rows[name], details[name] = {}, {}
        for task, records in tests.items():
            result = evaluate_task(model, tokenizer, records, config.eval.metrics,
                                   max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                                   max_examples=max_examples or config.eval.max_examples,
                                   **config.eval.metric_options)
            rows[name][task] = result["metrics"].get(metric)
            details[name][task] = {"n": result["n"], "metrics": result["metrics"]}
            log(f"{name} on {task}: {metric} {rows[name][task]}")
    return {"tasks": list(tests), "metric": metric, "rows": rows, "details": details}


def merge_runs(sources: list[str], out: str | Path, combination: str = "cat", weights: list[float] | None = None,
               density: float | None = None, register: bool = True, registry_url: str | None = None,
               log=print) -> dict[str, Any]:
    """Merge the LoRA adapters of several runs into one run directory `out` (config.yaml, adapter/, summary.json
    with merged_from, merge_report.json with the logit drift against the stacked adapters) and register it with
    `merged_from` lineage when the parents are registered. Refuses mixed base models or non-LoRA runs."""
    import yaml

    from tunesmith.atomic import write_json, write_text
    from tunesmith.config import ModelConfig
    from tunesmith.methods.combine import load_stack, logit_drift, merge_adapters, probe_logits, save_adapter
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.recipes.continual import ContinueError, resolve_parent
    from tunesmith.records.run import RunSummary

    out = Path(out)
    if len(sources) < 2:
        raise ConfigError("merge-adapters: give at least two runs to merge")
    if out.exists():
        raise ConfigError(f"merge-adapters --out {out}: already exists; choose a new folder")
    parents = [resolve_parent(ref, registry_url) for ref in sources]
    bases = {(p.config.get("model") or {}).get("name_or_path") for p in parents}
    if len(bases) > 1:
        raise ContinueError(f"merge-adapters: the runs have different base models ({', '.join(map(str, bases))}): "
                            + ", ".join(f"{p.ref} on {(p.config.get('model') or {}).get('name_or_path')}" for p in parents))
    not_lora = [f"{p.ref} ({(p.config.get('method') or {}).get('name')})" for p in parents
                if (p.config.get("method") or {}).get("name") != "lora"]
    if not_lora:
        raise ContinueError(f"merge-adapters: only LoRA runs merge; not LoRA: {', '.join(not_lora)}")
    model_config = ModelConfig.model_validate(parents[0].config.get("model") or {})
    tokenizer = load_tokenizer(model_config, log=log)
    names = [f"a{i + 1}" for i in range(len(parents))]
    folders = {n: p.run_dir / "adapter" for n, p in zip(names, parents, strict=True)}
    model = load_stack(load_model(model_config, log=log), folders)
    stacked = probe_logits(model, tokenizer)
    report = merge_adapters(model, names, "merged", combination, weights, density)
    report.update(logit_drift(stacked, probe_logits(model, tokenizer)), compared_to="the stacked adapters",
                  sources=[p.registry_ref or str(p.run_dir) for p in parents])
    log(f"merged {len(parents)} adapters ({combination}, rank {report['rank']}): max |logit diff| vs stacked "
        f"{report['max_abs_logit_diff']:.3g}" + (" (exact merge)" if report["exact"] else ""))
    out.mkdir(parents=True)
    save_adapter(model, "merged", out / "adapter", base_model=model_config.name_or_path,
                 extra={"merged_from": report["sources"], "combination": combination})
    config = dict(parents[0].config)
    config["output"] = {**(config.get("output") or {}), "name": out.name, "dir": str(out.parent)}
    config["method"] = {**(config.get("method") or {}), "name": "lora"}
    config["method"]["lora"] = {**(config["method"].get("lora") or {}), "r": report["rank"],
                                "alpha": model.peft_config["merged"].lora_alpha}
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_json(out / "merge_report.json", report)
    summary = RunSummary(name=out.name, method="lora", base_model=model_config.name_or_path, run_dir=str(out),
                         extra={"merged_from": report["sources"], "merge": report})
    summary.write(out)
    registered = [p.registry_ref for p in parents if p.registry_ref]
    if register and len(registered) == len(parents):
        from tunesmith.registry import register_run

        record = register_run(out, url=registry_url, merged_from=registered)
        summary.registry = {"name": record["name"], "version": record["version"]}
        summary.write(out)
        log(f"registered as {record['ref']}, merged from {', '.join(registered)}")
    elif register:
        log("notice: not every source is a registered run; lineage is kept in summary.json only")
    return {**report, "out": str(out)}
