"""Continual fine-tuning: a run that starts from an earlier run, and the pieces a sequence of tasks is built from.

`tunesmith train next.yaml --continue-from NAME@VERSION|RUN_DIR` (`continue_run`):
1. resolve the parent (registry ref or run directory) and check, BEFORE anything is written, that it exists, has
   the same base model and a compatible method (same method; for LoRA the same rank, alpha and target modules,
   since the parent's adapter is loaded into the new run's adapter); an error names both runs;
2. materialise the training inputs (multi-task mixture, replay from the parent's buffer) with recipes/multitask.py;
3. run the finetune recipe with `init_model` = load the parent's trained weights, plus the EWC penalty
   (train/ewc.py) from the parent's stored Fisher when `continual.ewc_lambda > 0`;
4. afterwards: estimate and store this run's Fisher (ewc.safetensors) and replay buffer (replay_buffer.jsonl),
   record `continued_from` in summary.json and the registry (lineage), and the replay counts in data_manifest.json.

Progressive per-task adapters and merged adapters live in methods/combine.py; recipes/multitask.py trains one
adapter per task and computes the interference matrix. `train_stage` below is the in-process training step that
bench/continual_bench.py strings into sequences (no run directory bookkeeping, no registry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import ConfigError, RunConfig, TrainConfig
from tunesmith.data.formats import Conversation


class ContinueError(ConfigError):
    """`--continue-from` cannot be honoured; the message names the new run and the parent."""


# ------------------------------------------------------------------------------------ in-process stage
def render_packs(tokenizer, conversations: list[Conversation], max_seq_len: int, packing: bool = True) -> list:
    from tunesmith.data.pack import pack_examples, single_packs
    from tunesmith.data.render import render_dataset

    examples, _ = render_dataset(tokenizer, conversations, max_seq_len, "truncate")
    return pack_examples(examples, max_seq_len) if packing else single_packs(examples)


def train_stage(model, tokenizer, conversations: list[Conversation], train_config: TrainConfig, run_dir: Path,
                max_seq_len: int = 512, loss_terms: list[Any] = (), log=print):
    """Train `model` (already carrying its trainable adapter) on `conversations` with the library's loop; metrics
    and checkpoints go to run_dir. Returns the loop's TrainState."""
    from accelerate import Accelerator

    from tunesmith.methods.registry import get_method
    from tunesmith.models.hardware import resolve_precision
    from tunesmith.train.loop import LoopContext, train

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    precision = resolve_precision(train_config.precision, accelerator.device, log=lambda *a: None)
    run_dir.mkdir(parents=True, exist_ok=True)
    packs = render_packs(tokenizer, conversations, max_seq_len)
    extra = {}
    if loss_terms:
        if "loss_terms" not in LoopContext.__dataclass_fields__:
            raise RuntimeError("this trainer has no loss-term hook (LoopContext.loss_terms); EWC needs it")
        extra["loss_terms"] = list(loss_terms)
    ctx = LoopContext(train_config, run_dir, tokenizer.pad_token_id, block_mask=True, precision=precision,
                      accelerator=accelerator, method=get_method("lora"), tokenizer=tokenizer, log=log, **extra)
    model.to(accelerator.device)
    return train(model, ctx, packs, [])


@dataclass
class TaskSpec:
    """A task of a sequence: formatted splits and how it is scored."""

    name: str
    train: list[Conversation]
    validation: list[Conversation]
    test: list[Conversation]
    metrics: list[str]
    headline: str
    max_new_tokens: int
    metric_options: dict[str, Any]


def score_task(model, tokenizer, task: TaskSpec, max_examples: int | None = None, batch_size: int = 16) -> dict:
    """Generate on the task's test records and score; returns evaluate_task's result (metrics + examples)."""
    from tunesmith.eval.task import evaluate_task

    model.eval()
    return evaluate_task(model, tokenizer, task.test, task.metrics, max_new_tokens=task.max_new_tokens,
                         batch_size=batch_size, max_examples=max_examples, **task.metric_options)


# ------------------------------------------------------------------------------------ continue a run
@dataclass
class Parent:
    ref: str  # what the user gave
    run_dir: Path
    config: dict[str, Any]
    registry_ref: str | None  # NAME@VERSION when the parent is in the registry


def resolve_parent(ref: str, registry_url: str | None = None) -> Parent:
    """A registry ref (NAME@VERSION, NAME@latest, alias, NAME) or a run directory → its run directory and config."""
    import yaml

    path = Path(ref).expanduser()
    registry_ref = None
    if path.is_dir():
        run_dir = path.resolve()
        summary_file = run_dir / "summary.json"
        if summary_file.exists():
            registered = json.loads(summary_file.read_text()).get("registry") or {}
            if registered.get("name") and registered.get("version"):
                registry_ref = f"{registered['name']}@{registered['version']}"
    else:
        from tunesmith.registry import RegistryError, show_run

        try:
            record = show_run(ref, url=registry_url)
        except RegistryError as exc:
            raise ContinueError(f"--continue-from {ref}: no such run directory, and the registry says: {exc}") from None
        run_dir, registry_ref = Path(record["run_dir"]), record["ref"]
        if not run_dir.is_dir():
            raise ContinueError(f"--continue-from {ref}: registered run {record['ref']} points at {run_dir}, which "
                                "no longer exists (restore it, or `tunesmith runs export` it first)")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file() or not (run_dir / "adapter").is_dir():
        raise ContinueError(f"--continue-from {ref}: {run_dir} is not a finished run directory "
                            "(config.yaml and adapter/ are needed)")
    return Parent(ref, run_dir, yaml.safe_load(config_file.read_text()) or {}, registry_ref)


CONTINUABLE = ("lora", "qlora", "full", "prefix", "prompt")
LORA_SHAPE_KEYS = ("r", "alpha", "target_modules", "use_dora", "use_rslora", "modules_to_save")


def check_continuation(config: RunConfig, parent: Parent) -> None:
    """Same base model, same method, same adapter shape; raises ContinueError naming both runs."""
    new = config.output.name or "this run"
    both = f"run {new!r} cannot continue from {parent.ref} ({parent.run_dir})"
    parent_base = (parent.config.get("model") or {}).get("name_or_path")
    if parent_base != config.model.name_or_path:
        raise ContinueError(f"{both}: different base models ({config.model.name_or_path!r} here, {parent_base!r} "
                            "there); continue on the parent's base, or start a new run")
    parent_method = (parent.config.get("method") or {}).get("name")
    if parent_method != config.method.name:
        raise ContinueError(f"{both}: incompatible methods ({config.method.name} here, {parent_method} there); "
                            f"set method.name={parent_method} to continue its weights")
    if config.method.name not in CONTINUABLE:
        raise ContinueError(f"{both}: continuing a {config.method.name} run is not supported "
                            f"(supported: {', '.join(CONTINUABLE)})")
    if config.method.name in ("lora", "qlora"):
        mine = config.method.lora.model_dump(mode="json")
        theirs = ((parent.config.get("method") or {}).get("lora")) or {}
        differ = [k for k in LORA_SHAPE_KEYS if k in theirs and theirs[k] != mine.get(k)]
        if differ:
            detail = ", ".join(f"{k}: {mine.get(k)!r} here, {theirs[k]!r} there" for k in differ)
            raise ContinueError(f"{both}: incompatible LoRA adapters ({detail}); use the parent's values")
