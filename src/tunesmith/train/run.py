"""`tunesmith train`: config → data → model + method → training → artifacts in `runs/<name>/`.

Run directory: config.yaml, data_manifest.json, metrics.jsonl, loss_curves.png, adapter/, summary.json,
checkpoints/step-N/, and eval.json when test data is configured.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tunesmith.atomic import write_json, write_text
from tunesmith.config import ConfigError, RunConfig, resolved_yaml
from tunesmith.data.formats import Conversation, read_conversations, snapshot_hash
from tunesmith.data.pack import pack_examples, single_packs
from tunesmith.data.render import RenderStats, render_dataset
from tunesmith.methods.registry import get_method
from tunesmith.models.hardware import peak_memory_bytes, resolve_precision
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.train.loop import LoopContext, train


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _with_system_prompt(conversations: list[Conversation], system_prompt: str | None) -> list[Conversation]:
    if not system_prompt:
        return conversations
    for conversation in conversations:
        if conversation.messages[0]["role"] != "system":
            conversation.messages.insert(0, {"role": "system", "content": system_prompt})
    return conversations


def load_splits(config: RunConfig, log=print) -> tuple[list[Conversation], list[Conversation], dict[str, Any]]:
    """Read train/validation conversations (strict: a bad record is an error naming file, line and field)."""
    data = config.data
    if not data.train:
        raise ConfigError("data.train: no training files given")
    files: list[dict[str, Any]] = []
    train_conversations: list[Conversation] = []
    for path in data.train:
        records = read_conversations(path, data.format, data.columns)
        files.append({"path": str(path), "split": "train", "sha256": file_sha256(path), "records": len(records)})
        train_conversations.extend(records)
    if data.max_train_examples is not None:
        train_conversations = train_conversations[: data.max_train_examples]
    validation: list[Conversation] = []
    for path in data.validation:
        records = read_conversations(path, data.format, data.columns)
        files.append({"path": str(path), "split": "validation", "sha256": file_sha256(path), "records": len(records)})
        validation.extend(records)
    held_out = 0
    if not data.validation and data.validation_fraction > 0 and len(train_conversations) > 1:
        order = list(range(len(train_conversations)))
        random.Random(config.train.seed).shuffle(order)
        held_out = max(1, int(round(len(order) * data.validation_fraction)))
        chosen = set(order[:held_out])
        validation = [c for i, c in enumerate(train_conversations) if i in chosen]
        train_conversations = [c for i, c in enumerate(train_conversations) if i not in chosen]
    if data.max_validation_examples is not None:
        validation = validation[: data.max_validation_examples]
    _with_system_prompt(train_conversations, data.system_prompt)
    _with_system_prompt(validation, data.system_prompt)
    manifest = {
        "files": files,
        "train_records": len(train_conversations),
        "validation_records": len(validation),
        "validation_held_out_from_train": held_out,
        "max_train_examples": data.max_train_examples,
        "max_validation_examples": data.max_validation_examples,
        "hash": snapshot_hash(train_conversations),
        "validation_hash": snapshot_hash(validation),
    }
    return train_conversations, validation, manifest


def prepare_data(config: RunConfig, run_dir: Path, log=print) -> dict[str, Any]:
    """`data.prepare: true`: run `tunesmith data prepare` on the raw training files (validate, dedup, PII screen,
    split) into run_dir/data and train on its output; the prepare manifest goes into data_manifest.json."""
    from tunesmith.data.prepare import options_for_training, prepare

    options = options_for_training(config.data, tokenizer=None, seed=config.train.seed)
    manifest = prepare(list(config.data.train), run_dir / "data", options).to_dict()
    splits = manifest["splits"]
    config.data.train = [splits["train"]["path"]]
    if not config.data.validation and splits.get("validation", {}).get("count"):
        config.data.validation = [splits["validation"]["path"]]
    log(f"prepared data: {manifest['input']} records in, {manifest['kept']} kept, {manifest['quarantined']} quarantined, "
        f"{manifest['duplicates_exact']} + {manifest['duplicates_near']} duplicates; report in {run_dir / 'data'}")
    return manifest


def prepare_run_dir(config: RunConfig, resume: bool) -> Path:
    run_dir = Path(config.output.dir) / (config.output.name or "run")
    if run_dir.exists() and not resume:
        if not config.output.overwrite:
            raise ConfigError(f"{run_dir} already exists: pass --resume to continue it, "
                              "--set output.overwrite=true to replace it, or choose another output.name")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_training(config: RunConfig, resume: bool = False, log=print) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    sharded = accelerator.distributed_type.name
    if sharded in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # Checkpoints, the best-model reload and the adapter save read parameters from the unwrapped model: right
        # for single process and DDP (full replicas), wrong for sharded parameters. Refuse rather than save shards.
        raise ConfigError(f"accelerate is configured for {sharded}, which tunesmith does not support yet; "
                          "use data parallelism (DDP: torchrun or `accelerate launch` without FSDP/DeepSpeed)")
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
    prepared = None
    if config.data.prepare:
        if main:
            prepared = prepare_data(config, run_dir, log=say)
        accelerator.wait_for_everyone()
        if not main:  # the main process wrote the prepared splits; every process reads the same files
            config.data.train = [str(run_dir / "data" / "train.jsonl")]
            if not config.data.validation and (run_dir / "data" / "validation.jsonl").exists():
                config.data.validation = [str(run_dir / "data" / "validation.jsonl")]
    train_conversations, validation, manifest = load_splits(config, log=say)
    if prepared is not None:
        manifest["prepare"] = prepared
    train_examples, train_stats = render_dataset(tokenizer, train_conversations, config.data.max_seq_len,
                                                 config.data.truncation)
    val_examples, val_stats = render_dataset(tokenizer, validation, config.data.max_seq_len, config.data.truncation)
    pack = (lambda ex: pack_examples(ex, config.data.max_seq_len)) if config.data.packing else single_packs
    train_packs, val_packs = pack(train_examples), pack(val_examples)
    if not train_packs:
        raise ConfigError("data.train: no trainable examples after rendering (see data_manifest.json)")
    manifest.update(render={"train": train_stats.as_dict(), "validation": val_stats.as_dict()},
                    sequences={"train": len(train_packs), "validation": len(val_packs)},
                    packing=config.data.packing, max_seq_len=config.data.max_seq_len)
    if main:
        write_json(run_dir / "data_manifest.json", manifest)
        _report_truncation(train_stats, val_stats, say)

    from transformers import set_seed

    set_seed(config.train.seed)  # adapter initialisation (LoRA's A, prefixes, ...) is part of the seeded run
    model = load_model(config.model, log=say, **method.base_load_kwargs(config.method))
    before = _task_eval(config, model, tokenizer, "base", say) if main and config.eval.compare_base else None
    model = method.apply(model, config.method)
    if config.train.gradient_checkpointing:
        method.enable_gradient_checkpointing(model)
    model.to(accelerator.device)
    attn = getattr(model.config, "_attn_implementation", None) or ""
    callbacks = _callbacks(config)
    ctx = LoopContext(config.train, run_dir, tokenizer.pad_token_id, block_mask=config.data.packing and
                      attn != "flash_attention_2", precision=precision, accelerator=accelerator, method=method,
                      tokenizer=tokenizer, callbacks=callbacks, log=say)
    trainable = method.trainable_parameter_count(model)
    total = sum(p.numel() for p in model.parameters())
    say(f"{method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), "
        f"{len(train_packs)} training sequences, precision {precision}")
    state = train(model, ctx, train_packs, val_packs, resume=resume)
    if state.stop_reason:
        say(state.stop_reason)

    summary: dict[str, Any] = {}
    if main:
        method.save(model, run_dir / "adapter", config.method, config.model.name_or_path)
        after = None
        if _has_test(config):
            after = _task_eval(config, method.prepare_for_generation(model), tokenizer, "tuned", say)
        summary = {
            "name": config.output.name, "method": method.name, "base_model": config.model.name_or_path,
            "run_dir": str(run_dir), "steps": state.step, "max_steps": state.max_steps,
            "best_step": state.best_step, "best_eval_loss": state.best_eval_loss,
            "final_train_loss": _last(run_dir, "train_loss"), "tokens_seen": state.tokens_seen,
            "target_tokens_seen": state.target_tokens_seen, "trainable_params": trainable, "total_params": total,
            "wall_seconds": round(time.perf_counter() - started, 2), "peak_memory_bytes": peak_memory_bytes(),
            "precision": precision, "stop_reason": state.stop_reason, "data_hash": manifest["hash"],
            "processes": accelerator.num_processes,
        }
        if before or after:
            from tunesmith.train.report import write_task_eval

            summary["eval"] = write_task_eval(run_dir, before, after, say)
        write_json(run_dir / "summary.json", summary)
        _finish(config, run_dir, summary, say)
    accelerator.wait_for_everyone()
    return summary


def _has_test(config: RunConfig) -> bool:
    return bool(config.data.test or config.eval.splits)


def _task_eval(config: RunConfig, model, tokenizer, label: str, log) -> dict[str, Any] | None:
    """Generate on the test split (and named extra splits) and score; None when no test data is configured."""
    if not _has_test(config):
        return None
    from tunesmith.eval.task import evaluate_task

    results = {}
    splits = {"test": config.data.test} if config.data.test else {}
    splits.update(config.eval.splits)
    for split, paths in splits.items():
        conversations = [c for p in paths for c in read_conversations(p, config.data.format, config.data.columns)]
        _with_system_prompt(conversations, config.data.system_prompt)
        t0 = time.perf_counter()
        log(f"evaluating the {label} model on {split} "
            f"({min(len(conversations), config.eval.max_examples or len(conversations))} of {len(conversations)} examples)")
        model.eval()
        result = evaluate_task(model, tokenizer, conversations, config.eval.metrics,
                               max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                               max_examples=config.eval.max_examples, **config.eval.metric_options)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        result["files"] = list(paths)
        results[split] = result
    return results


def _callbacks(config: RunConfig) -> list[Any]:
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


def _finish(config: RunConfig, run_dir: Path, summary: dict[str, Any], log) -> None:
    """Plot, diagnose, register, and say where everything is."""
    from tunesmith.train.report import finish_run

    finish_run(config, run_dir, summary, log)
