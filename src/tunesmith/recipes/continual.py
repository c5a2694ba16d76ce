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
    from tunesmith.models.attention import segment_attention_applies
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
    attn = getattr(model.config, "_attn_implementation", None)
    segments = segment_attention_applies(accelerator.device.type, attn, packing=True, virtual_tokens=False)
    ctx = LoopContext(train_config, run_dir, tokenizer.pad_token_id, block_mask=True, segment_attention=segments,
                      precision=precision, accelerator=accelerator, method=get_method("lora"), tokenizer=tokenizer,
                      log=log, **extra)
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


# ------------------------------------------------------------------------------------ the continual recipe
REPLAY_FILE = "replay_buffer.jsonl"
STACK_FILE = "stack.json"


def _load_parent_weights(parent: Parent, progressive: bool):
    """init_model for the finetune recipe: the parent's trained weights into the freshly applied method."""

    def init(model, method):
        directory = parent.run_dir / "adapter"
        if method.name == "full":
            from safetensors.torch import load_file

            state = {}
            for file in sorted(directory.glob("*.safetensors")):
                state.update(load_file(str(file)))
            if not state:
                raise ContinueError(f"{parent.ref}: {directory} holds no *.safetensors weights")
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = {k for k in missing if "lm_head" in k}  # tied heads are saved once, as the embeddings
            if set(missing) - tied or unexpected:
                raise ContinueError(f"{parent.ref}: weights do not fit this model (missing {sorted(missing)[:2]}, "
                                    f"unexpected {sorted(unexpected)[:2]})")
            return model
        if progressive:
            from tunesmith.methods.combine import activate

            stack = _parent_stack(parent)
            frozen = _frozen_names(stack)
            for name, folder in zip(frozen, stack, strict=True):
                model.load_adapter(folder, adapter_name=name, is_trainable=False)
            activate(model, [*frozen, "default"], trainable=["default"])
            return model
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(directory / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ContinueError(f"{parent.ref}: its adapter does not fit this run's ({unexpected[:2]} unexpected)")
        return model

    return init


def _frozen_names(stack: list[Path]) -> list[str]:
    """The adapter names a progressive child gives its parent's stack (frozen1..N)."""
    return [f"frozen{i + 1}" for i in range(len(stack))]


def _parent_stack(parent: Parent) -> list[Path]:
    """The adapter folders a progressive child stacks on: the parent's own stack, then the parent's adapter."""
    stack_file = parent.run_dir / STACK_FILE
    earlier = [Path(p) for p in json.loads(stack_file.read_text())["adapters"]] if stack_file.exists() else []
    return [*earlier, parent.run_dir / "adapter"]


class FisherAtEnd:
    """Trainer callback: at the end of training, estimate the empirical Fisher on this run's training records,
    accumulate it onto the parent's (online or summed) and store ewc.safetensors in the run directory."""

    def __init__(self, config: RunConfig, run_dir: Path, conversations: list[Conversation], previous, task: str,
                 log=print):
        self.config, self.run_dir, self.conversations = config, run_dir, conversations
        self.previous, self.task, self.log = previous, task, log

    def on_train_end(self, state, model, tokenizer) -> None:
        from tunesmith.data.render import render_dataset
        from tunesmith.methods.registry import get_method
        from tunesmith.train.ewc import FILE_NAME, EwcState, estimate_fisher, trainable_values

        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # one process estimates; the weights are replicas
        options = self.config.continual
        examples, _ = render_dataset(tokenizer, self.conversations[: options.ewc_examples],
                                     self.config.data.max_seq_len, "truncate")
        fisher, used = estimate_fisher(model, get_method(self.config.method.name), examples, tokenizer.pad_token_id,
                                       max_examples=options.ewc_examples)
        base = self.previous or EwcState(online=options.ewc_online, gamma=options.ewc_gamma)
        base.online, base.gamma = options.ewc_online, options.ewc_gamma
        base.accumulate(fisher, trainable_values(model), self.task, used).save(self.run_dir / FILE_NAME)
        self.log(f"EWC: empirical Fisher over {used} training examples stored in {self.run_dir / FILE_NAME}")


def _write_replay(config: RunConfig, run_dir: Path, parent_buffer, train: list[Conversation], log) -> None:
    from tunesmith.data.mixing import ReservoirBuffer, stratified_sample, tag_replay

    options = config.continual
    name = config.output.name or run_dir.name
    own = [c for c in train if "replay" not in c.meta]  # replayed records are in the parent's buffer already
    new = [r for task in dict.fromkeys(c.meta.get("task", name) for c in own)
           for r in tag_replay([c for c in own if c.meta.get("task", name) == task], name, task)]
    if options.replay_strategy == "stratified":
        from tunesmith.data.diversity import cluster_report

        pool = [*(parent_buffer.items if parent_buffer else []), *new]
        labels, _ = cluster_report([c.text() for c in pool], seed=config.train.seed)
        items = stratified_sample(pool, labels, options.replay_size, seed=config.train.seed)
        buffer = ReservoirBuffer(options.replay_size, (parent_buffer.seen if parent_buffer else 0) + len(new), items,
                                 config.train.seed)
    else:
        buffer = parent_buffer or ReservoirBuffer(options.replay_size, seed=config.train.seed)
        buffer.capacity = options.replay_size
        buffer.add(new)
    buffer.save(run_dir / REPLAY_FILE)
    log(f"replay buffer: {len(buffer.items)} of {buffer.seen} records seen so far ({options.replay_strategy}), "
        f"in {run_dir / REPLAY_FILE}")


def run_continual(config: RunConfig, resume: bool = False, log=print):
    """`tunesmith train` when the config continues a run, mixes tasks, or keeps replay/Fisher for later runs."""
    from tunesmith.data.mixing import ReservoirBuffer
    from tunesmith.recipes.finetune import run_finetune
    from tunesmith.recipes.multitask import add_mixture_to_manifest, materialize
    from tunesmith.train.ewc import FILE_NAME, EwcPenalty, EwcState

    options = config.continual
    parent = resolve_parent(options.continue_from, config.output.registry_url) if options.continue_from else None
    if parent is not None:
        check_continuation(config, parent)
        if options.orthogonal_lambda and not options.progressive:
            raise ContinueError("continual.orthogonal_lambda (O-LoRA) needs continual.progressive=true: the new adapter "
                                "is kept orthogonal to the parent's frozen ones")
        if options.progressive and config.method.name not in ("lora", "qlora"):
            raise ContinueError(f"continual.progressive: stacking adapters needs LoRA, not {config.method.name}")
    if parent is None and (options.ewc_lambda or options.replay_share or options.progressive or options.orthogonal_lambda):
        raise ContinueError("continual.ewc_lambda / replay_share / progressive / orthogonal_lambda need continual.continue_from "
                            "(--continue-from NAME@VERSION or a run directory)")
    parent_buffer = previous_fisher = None
    if parent is not None and (options.replay_share or options.replay_size):
        replay_path = parent.run_dir / REPLAY_FILE
        if replay_path.exists():
            parent_buffer = ReservoirBuffer.load(replay_path)
        elif options.replay_share:
            raise ContinueError(f"continual.replay_share: {parent.ref} kept no replay buffer ({replay_path}); "
                                "train it with continual.replay_size > 0")
    if parent is not None and options.ewc_lambda:
        previous_fisher = EwcState.load(parent.run_dir / FILE_NAME)  # a missing file is an error naming it
    run_dir = Path(config.output.dir) / (config.output.name or "run")
    if run_dir.exists() and not resume and not config.output.overwrite:
        raise ContinueError(f"{run_dir} already exists: choose another output.name or set output.overwrite=true")

    replay = parent_buffer.items if parent_buffer and options.replay_share else None
    prepared, mixture, mixed = materialize(config, replay=replay, log=log)
    train_records = mixed if mixed is not None else _training_records(prepared)
    callbacks, loss_terms = [], []
    if options.ewc_lambda or options.store_fisher:
        callbacks.append(FisherAtEnd(prepared, run_dir, train_records, previous_fisher, prepared.output.name, log))
    if options.ewc_lambda:
        penalty = EwcPenalty(previous_fisher, options.ewc_lambda)
        loss_terms.append(_checked(penalty))
    if options.orthogonal_lambda:
        from tunesmith.methods.combine import OrthogonalPenalty

        loss_terms.append(OrthogonalPenalty(options.orthogonal_lambda, "default", _frozen_names(_parent_stack(parent))))
    init = _load_parent_weights(parent, options.progressive) if parent is not None else None
    summary = run_finetune(prepared, resume, log, init_model=init, extra_callbacks=callbacks,
                           loss_terms=loss_terms)
    if summary is None:  # not the main process
        return None
    if mixture:
        add_mixture_to_manifest(run_dir, mixture)
    if options.replay_size:
        _write_replay(prepared, run_dir, parent_buffer, train_records, log)
    if parent is not None and options.progressive:
        from tunesmith.atomic import write_json

        write_json(run_dir / STACK_FILE, {"adapters": [str(p) for p in _parent_stack(parent)]})
    if parent is not None:
        _record_lineage(prepared, run_dir, summary, parent, log)
    return summary


def _training_records(config: RunConfig) -> list[Conversation]:
    from tunesmith.data.formats import read_conversations

    return [c for path in config.data.train for c in read_conversations(path, config.data.format)]


def _checked(penalty):
    """Check the stored names against the model on the first call (the model exists only inside the recipe)."""
    state = {"checked": False}

    def term(model):
        if not state["checked"]:
            penalty.check(model)
            state["checked"] = True
        return penalty(model)

    return term


def _record_lineage(config: RunConfig, run_dir: Path, summary, parent: Parent, log) -> None:
    """continued_from in summary.json, and in the registry (re-registering updates the same version in place)."""
    summary.continued_from = parent.registry_ref or str(parent.run_dir)
    summary.write(run_dir)
    if not config.output.register_run:
        return
    if parent.registry_ref is None:
        log(f"notice: the parent {parent.ref} is not in the registry; lineage is kept in summary.json only")
        return
    from tunesmith.registry import register_run

    record = register_run(run_dir, url=config.output.registry_url, continued_from=parent.registry_ref)
    log(f"lineage: {record['ref']} continued from {parent.registry_ref}")


def needs_continual(config: RunConfig) -> bool:
    """Does this config need the continual recipe (vs plain finetune)?"""
    options, data = config.continual, config.data
    return bool(options.continue_from or options.replay_size or options.store_fisher or options.ewc_lambda
                or options.replay_share or options.progressive or data.datasets or data.general_share)
