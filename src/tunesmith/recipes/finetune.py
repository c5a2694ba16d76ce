"""`tunesmith train`: config → data → model + method → training → evaluation → artifacts → registry.

The finetune recipe is the one place that wires the library's packages together for a run; `train/` only
trains. Steps, in order (the order is part of the seeded run: the same seed gives the same numbers):
    start    accelerator, method checks, run directory, config.yaml, tokenizer
    data     optional `data prepare`, the splits (recipes/splits.py), rendering and packing, data_manifest.json
    model    seeded base load, optional base evaluation, method.apply, `init_model` (a starting adapter)
    train    train.loop.train with the configured callbacks plus `extra_callbacks`
    finish   save the adapter, evaluate on the test splits, summary.json, plots, diagnosis, registration

Run directory: config.yaml, data_manifest.json, metrics.jsonl, loss_curves.png, adapter/, summary.json,
checkpoints/step-N/, and eval.json when test data is configured.

Building on it (continual learning, multi-task sequences): `run_finetune(config, init_model=..., extra_callbacks=...,
loss_terms=...)` starts from given weights (`init_model(model, method) -> model` runs after `method.apply`, before
training), adds trainer callbacks (the protocol in train/callbacks.py) and extra loss terms (an EWC penalty); each
step below is a function that a recipe may reuse.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_json, write_text
from tunesmith.config import ConfigError, RunConfig, resolved_yaml
from tunesmith.data.pack import Pack, pack_examples, single_packs
from tunesmith.data.render import RenderStats, render_dataset
from tunesmith.methods.base import Method
from tunesmith.methods.registry import get_method
from tunesmith.models.attention import segment_attention_applies
from tunesmith.models.hardware import peak_memory_bytes, resolve_precision
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.recipes.checks import check_run_paths
from tunesmith.recipes.report import finish_run, task_eval, write_task_eval
from tunesmith.recipes.splits import load_splits, prepare_data
from tunesmith.records.run import RunSummary
from tunesmith.train.callbacks import TrainState
from tunesmith.train.lock import acquire_run_lock
from tunesmith.train.loop import LoopContext, train

InitModel = Callable[[Any, Method], Any]
LossTerm = Callable[[Any], tuple[str, Any]]


@dataclass
class FinetuneRun:
    """What one run carries between its steps."""

    config: RunConfig
    accelerator: Any
    method: Method
    precision: str
    run_dir: Path
    tokenizer: Any
    log: Callable[..., None]  # prints on the main process only
    main: bool
    started: float


@dataclass
class TrainingData:
    train_packs: list[Pack]
    val_packs: list[Pack]
    manifest: dict[str, Any]
    val_groups: dict[str, list[Pack]] | None = None  # per validation file (one per task in multi-task runs)


def run_finetune(config: RunConfig, resume: bool = False, log=print, *, init_model: InitModel | None = None,
                 extra_callbacks: Sequence[Any] = (), loss_terms: Sequence[LossTerm] = ()) -> RunSummary | None:
    """Train one run end to end; returns its summary (None on processes other than the main one).

    init_model(model, method) -> model: runs after method.apply (start from given weights, e.g. an earlier adapter).
    extra_callbacks: trainer callbacks (train/callbacks.py) beside the configured ones.
    loss_terms: term(model) -> (name, scalar tensor) added to the loss each step (e.g. an EWC penalty; train/loop.py).

    Raises RegistrationFailed (run directory complete) when `output.register_run` is on and registering fails.
    """
    check_run_paths(config)  # every missing file at once, before any model or data is loaded
    run = start_run(config, resume, log)
    data = training_data(run)
    model, before = build_model(run, init_model)
    callbacks = [*_callbacks(config), *extra_callbacks]
    state, trainable, total = train_model(run, model, data, resume, callbacks, list(loss_terms))
    from tunesmith.train import sharding

    with sharding.exportable(model, run.method, run.accelerator) as export:  # collective under FSDP: gathers shards
        if run.main:
            run.method.save(export, run.run_dir / "adapter", config.method, config.model.name_or_path)
    summary = None
    if run.main:
        summary = finish(run, model, state, data, before, trainable, total)
    run.accelerator.wait_for_everyone()
    return summary


def start_run(config: RunConfig, resume: bool, log) -> FinetuneRun:
    from tunesmith.train import sharding

    accelerator = sharding.make_accelerator(config.train)  # one process, DDP or FSDP2; DeepSpeed refused
    main = accelerator.is_main_process
    say = log if main else (lambda *a, **k: None)
    started = time.perf_counter()
    method = get_method(config.method.name)
    if config.data.packing and not getattr(method, "supports_packing", True):
        raise ConfigError(f"data.packing: {method.name} prepends virtual tokens, which packing cannot share; "
                          "set data.packing=false")
    if config.train.gradient_checkpointing and not method.supports_gradient_checkpointing:
        raise ConfigError(f"train.gradient_checkpointing: not supported by method {method.name}")
    precision = resolve_precision(config.train.precision, accelerator.device, log=say)
    run_dir = prepare_run_dir(config, resume) if main else Path(config.output.dir) / (config.output.name or "run")
    accelerator.wait_for_everyone()
    if main:
        write_text(run_dir / "config.yaml", resolved_yaml(config))
    tokenizer = load_tokenizer(config.model, log=say)
    return FinetuneRun(config, accelerator, method, precision, run_dir, tokenizer, say, main, started)


def prepare_run_dir(config: RunConfig, resume: bool) -> Path:
    run_dir = Path(config.output.dir) / (config.output.name or "run")
    acquire_run_lock(run_dir)  # a second `tunesmith train` on this directory is refused (train/lock.py)
    if run_dir.exists() and not resume:
        if not config.output.overwrite:
            raise ConfigError(f"{run_dir} already exists: pass --resume to continue it, "
                              "--set output.overwrite=true to replace it, or choose another output.name")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def training_data(run: FinetuneRun) -> TrainingData:
    """Prepare (optionally), read, render and pack the splits; write data_manifest.json."""
    config, run_dir = run.config, run.run_dir
    prepared = None
    if config.data.prepare:
        if run.main:
            prepared = prepare_data(config, run_dir, log=run.log)
        run.accelerator.wait_for_everyone()
        if not run.main:  # the main process wrote the prepared splits; every process reads the same files
            config.data.train = [str(run_dir / "data" / "train.jsonl")]
            if not config.data.validation and (run_dir / "data" / "validation.jsonl").exists():
                config.data.validation = [str(run_dir / "data" / "validation.jsonl")]
    train_conversations, validation, manifest = load_splits(config, log=run.log)
    if prepared is not None:
        manifest["prepare"] = prepared
    max_len, truncation = config.data.max_seq_len, config.data.truncation
    train_examples, train_stats = render_dataset(run.tokenizer, train_conversations, max_len, truncation)
    val_examples, val_stats = render_dataset(run.tokenizer, validation, max_len, truncation)
    pack = (lambda ex: pack_examples(ex, max_len)) if config.data.packing else single_packs
    train_packs, val_groups = pack(train_examples), _validation_groups(list(config.data.validation or []), val_examples, pack)
    val_packs = [p for packs in val_groups.values() for p in packs]
    if not train_packs:
        raise ConfigError("data.train: no trainable examples after rendering (see data_manifest.json)")
    manifest.update(render={"train": train_stats.as_dict(), "validation": val_stats.as_dict()},
                    sequences={"train": len(train_packs), "validation": len(val_packs)},
                    packing=config.data.packing, max_seq_len=max_len)
    if run.main:
        write_json(run_dir / "data_manifest.json", manifest)
        _report_truncation(train_stats, val_stats, run.log)
    return TrainingData(train_packs, val_packs, manifest, val_groups)


def _validation_groups(files: list[str], examples, pack) -> dict[str, list[Pack]]:
    """Validation packs per validation file when the run names several (multi-task runs write one per task:
    validation-<task>.jsonl), each file packed on its own so that no pack mixes them; else one group "all"."""
    if len(files) < 2:
        return {"all": pack(examples)}
    names = {str(Path(f).resolve()): Path(f).stem.removeprefix("validation-") for f in files}
    if len(set(names.values())) < len(names):  # the same stem in two folders: name the groups by path
        names = {f: f for f in names}
    groups: dict[str, list] = {name: [] for name in names.values()}
    for example in examples:
        groups.setdefault(names.get(str(Path(example.source).resolve()), "other"), []).append(example)
    return {name: pack(group) for name, group in groups.items() if group}


def build_model(run: FinetuneRun, init_model: InitModel | None) -> tuple[Any, dict[str, Any] | None]:
    """Seeded base load → optional base evaluation → method.apply → init_model → device. Returns (model, before)."""
    from transformers import set_seed

    config, method = run.config, run.method
    set_seed(config.train.seed)  # adapter initialisation (LoRA's A, prefixes, ...) is part of the seeded run
    model = load_model(config.model, log=run.log, **method.base_load_kwargs(config.method))
    before = task_eval(config, model, run.tokenizer, "base", run.log) if run.main and config.eval.compare_base else None
    model = method.apply(model, config.method)
    if init_model is not None:
        model = init_model(model, method)
    if config.train.gradient_checkpointing:
        method.enable_gradient_checkpointing(model)
    model.to(run.accelerator.device)
    return model, before


def train_model(run: FinetuneRun, model, data: TrainingData, resume: bool, callbacks: list[Any],
                loss_terms: list[LossTerm] | None = None) -> tuple[TrainState, int, int]:
    """Hand the model, the packs and the callbacks to the trainer; returns (state, trainable, total parameters)."""
    config, method = run.config, run.method
    attn = getattr(model.config, "_attn_implementation", None) or ""
    segments = segment_attention_applies(run.accelerator.device.type, attn, config.data.packing,
                                         method.uses_virtual_tokens)
    ctx = LoopContext(config.train, run.run_dir, run.tokenizer.pad_token_id,
                      block_mask=config.data.packing and attn != "flash_attention_2", segment_attention=segments,
                      precision=run.precision,
                      accelerator=run.accelerator, method=method, tokenizer=run.tokenizer, callbacks=callbacks,
                      log=run.log, loss_terms=list(loss_terms or []), val_groups=data.val_groups)
    trainable = method.trainable_parameter_count(model)
    total = sum(p.numel() for p in model.parameters())
    run.log(f"{method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), "
            f"{len(data.train_packs)} training sequences, precision {run.precision}")
    state = train(model, ctx, data.train_packs, data.val_packs, resume=resume)
    if state.stop_reason:
        run.log(state.stop_reason)
    return state, trainable, total


def finish(run: FinetuneRun, model, state: TrainState, data: TrainingData, before: dict[str, Any] | None,
           trainable: int, total: int) -> RunSummary:
    """Main process: save the adapter, evaluate on the test splits, write summary.json, report and register."""
    config, method, run_dir = run.config, run.method, run.run_dir
    from tunesmith.train import sharding

    after = None  # the adapter was saved (gathered) by run_finetune before this
    if (config.data.test or config.eval.splits) and sharding.is_sharded(run.accelerator):
        run.log(f"notice: no test-split evaluation inside a sharded run; run `tunesmith eval {run_dir}`")
    elif config.data.test or config.eval.splits:
        after = task_eval(config, method.prepare_for_generation(model), run.tokenizer, "tuned", run.log)
    summary = RunSummary(
        name=config.output.name, method=method.name, base_model=config.model.name_or_path, run_dir=str(run_dir),
        steps=state.step, max_steps=state.max_steps, best_step=state.best_step,
        best_eval_loss=state.best_eval_loss, final_train_loss=_last(run_dir, "train_loss"),
        tokens_seen=state.tokens_seen, target_tokens_seen=state.target_tokens_seen, trainable_params=trainable,
        total_params=total, wall_seconds=round(time.perf_counter() - run.started, 2),
        peak_memory_bytes=peak_memory_bytes(), precision=run.precision, stop_reason=state.stop_reason,
        data_hash=data.manifest["hash"], processes=run.accelerator.num_processes,
    )
    if before or after:
        summary.eval = write_task_eval(config, run_dir, before, after, run.log)
    summary.write(run_dir)
    finish_run(config, run_dir, summary, run.log)
    return summary


def _callbacks(config: RunConfig) -> list[Any]:
    """The callbacks the config asks for (tests replace this to inject faults)."""
    if not config.eval.forgetting:
        return []
    from tunesmith.eval.forgetting import ForgettingCallback

    return [ForgettingCallback(config.eval)]


def _report_truncation(train_stats: RenderStats, val_stats: RenderStats, log) -> None:
    for name, stats in (("train", train_stats), ("validation", val_stats)):
        if stats.truncated or stats.dropped_too_long:
            log(f"notice: {name}: {stats.truncated} example(s) truncated ({stats.truncated_tokens} tokens cut), "
                f"{stats.dropped_too_long} dropped for length; details in data_manifest.json")


def _last(run_dir: Path, key: str) -> float | None:
    import json

    value = None
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if key in record:
                value = record[key]
    return value
