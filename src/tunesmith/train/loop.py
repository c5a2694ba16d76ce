"""The training loop: a readable top-to-bottom loop over optimizer steps.

Per optimizer step (global batch = batch_size x gradient_accumulation_steps x processes sequences):
    N      = target tokens in the whole global batch (all-reduced over processes)
    loss   = sum over micro-batches and processes of CE_sum(micro-batch) / N
so the gradient is the token-weighted mean over the global batch, whatever the split into micro-batches and
processes (DDP, and FSDP's reduce-scatter, average gradients over processes — FSDP as SUM then / world_size on
every backend, see sharding.py — hence each process scales its CE_sum by world_size / N).
Schedule: linear warm-up over warmup_ratio of the steps, then cosine (or linear/constant) decay.

Extra loss terms (`LoopContext.loss_terms`, e.g. an EWC penalty): each is a function `term(model) -> (name, value)`
called once per optimizer step, on the last micro-batch; its value is added to the loss of every process, so the
gradient is d(mean token CE + sum of terms)/d(theta) (DDP averages the identical term gradients of all processes),
and the value is logged as `name` beside train_loss in metrics.jsonl. Refused under FSDP (terms would see shards).

Every process runs the same sequence of forwards and collectives (same number of micro-batches per step, same
number of evaluation batches), which FSDP needs: each forward all-gathers parameters from every process.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import get_scheduler

from tunesmith.atomic import write_text
from tunesmith.config import TrainConfig
from tunesmith.data.pack import Pack, collate, epoch_order
from tunesmith.data.render import IGNORE_INDEX
from tunesmith.methods.base import Method
from tunesmith.models.attention import SEGMENT_ATTENTION, model_config, segment_attention
from tunesmith.models.fused_ops import fused_norm_and_rotary
from tunesmith.models.hardware import autocast_dtype
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import sharding
from tunesmith.train.callbacks import TrainState, call
from tunesmith.train.head_loss import fused_head_applies, head_cross_entropy_sum, swapped_forward


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    logits: (batch, seq, vocab); labels: (batch, seq) with -100 where no loss is taken.
    Semantics: sum_t CE(logits[:, t], labels[:, t + 1]) over t with labels[:, t + 1] != -100.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    count = int((shift_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss, count


def count_targets(packs: list[Pack]) -> int:
    """Target tokens the loss will see: every labelled token except each example's first (see pack.collate)."""
    return sum(max(0, e.target_tokens - (e.labels[0] != IGNORE_INDEX)) for p in packs for e in p.examples)


@dataclass
class LoopContext:
    """Everything the loop needs besides the model."""

    config: TrainConfig
    run_dir: Path
    pad_token_id: int
    block_mask: bool  # use the 4-D block-diagonal mask (packing on a non-flash attention kernel)
    precision: str
    accelerator: Any
    method: Any
    tokenizer: Any
    callbacks: list[Any] = field(default_factory=list)
    log: Any = print
    # Packed rows through per-example attention instead of the block mask (models/attention.py; CPU + SDPA)
    segment_attention: bool = False
    # Extra loss terms: term(model) -> (name, scalar tensor), model = the unwrapped model (see the module docstring).
    loss_terms: list[Callable[[Any], tuple[str, torch.Tensor]]] = field(default_factory=list)
    # Validation packs per group (multi-task runs: per task, packed apart so no pack mixes tasks). With two or more
    # groups every evaluation logs eval_loss/<group> beside eval_loss, the token-weighted loss over all of them.
    val_groups: dict[str, list[Pack]] | None = None


def collate_batch(ctx: LoopContext, packs: list[Pack]) -> dict[str, Any]:
    """The packs as one batch, with the attention inputs the loop's mode needs (block mask or segment lengths)."""
    if ctx.segment_attention:
        return collate(packs, ctx.pad_token_id, block_mask=False, segments=True)
    return collate(packs, ctx.pad_token_id, block_mask=ctx.block_mask)


def output_head(model) -> torch.nn.Module | None:
    """The module that maps final hidden states to logits (lm_head), through DDP and peft wrappers; None if unknown."""
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


def forward_loss(model, method, batch: dict[str, torch.Tensor], precision: str, device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions of a batch, and their count.

    Logits are computed for labelled positions only: a forward pre-hook on the output head keeps just the hidden
    states whose next token is a target, so neither the vocabulary projection (576 x 49,152 on the reference model)
    nor the fp32 cross-entropy runs over prompt tokens and padding. The model's own forward still runs end to end
    (so logit soft-capping or scaling that a model applies after its head still applies). Methods that prepend
    virtual positions (prompt tuning: `align_logits`) take the full-logits path.

    Where the head is a plain linear layer whose output the model returns unchanged (train/head_loss.py
    `fused_head_applies`), the head and the loss run as one chunked pass over those positions instead
    (`head_cross_entropy_sum`: no logits-sized buffers; the same loss and gradients).
    """
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "segment_lengths" in batch:  # per-example attention: the 2-D mask alone would let examples see each other
        implementation = model_config(model)._attn_implementation
        if implementation != SEGMENT_ATTENTION:
            raise RuntimeError(f"a batch with segment lengths needs attention {SEGMENT_ATTENTION!r}, the model runs "
                               f"{implementation!r} (train/loop.py: train() switches it with segment_attention)")
        inputs["segment_lengths"] = batch["segment_lengths"]
    labels = batch["labels"].to(device)
    keep = labels[:, 1:] != IGNORE_INDEX  # hidden state t predicts token t + 1
    targets = labels[:, 1:][keep]
    head = output_head(model)
    selective = head is not None and type(method).align_logits is Method.align_logits
    fused: dict[str, torch.Tensor] = {}
    dtype = autocast_dtype(precision)
    with _head_hook(model, head if selective else None, labels, keep, targets, fused), \
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        # use_cache=False: transformers 5 builds a KV cache whenever config.use_cache is on, training included
        # (a copy of every layer's keys and values, held to the end of the forward pass).
        logits = model(**inputs, use_cache=False).logits  # selective: (1, labelled positions, vocab)
    if fused:
        if logits is not fused["stub"]:
            raise RuntimeError("the model changed its head's output, which the fused head loss cannot see "
                               "(train/head_loss.py fused_head_applies probes for this)")
        return fused["loss"], int(targets.numel())
    if not selective:
        return causal_lm_loss_sum(method.align_logits(logits, inputs["input_ids"]), labels)
    loss = F.cross_entropy(logits[0].float(), targets, reduction="sum")
    return loss, int(targets.numel())


def _head_hook(model, head, labels, keep, targets, fused: dict):
    """What the head runs inside forward_loss: nothing changed (head None: the full-logits path); the chunked head
    loss (its forward replaced: the loss goes into `fused`, a stub comes out as the logits); or the head on the
    labelled positions' hidden states (a forward pre-hook)."""

    def selected(hidden: torch.Tensor) -> torch.Tensor:  # (batch, seq, d) -> (labelled positions, d)
        if hidden.shape[:2] != labels.shape:
            raise RuntimeError(f"output head got hidden states {tuple(hidden.shape)} for labels {tuple(labels.shape)}")
        return hidden[:, :-1][keep]

    def select(_module, args, kwargs):
        chosen = selected(args[0] if args else kwargs["input"]).unsqueeze(0)
        if args:
            return (chosen, *args[1:]), kwargs
        return args, {**kwargs, "input": chosen}

    def fused_head(hidden):
        fused["loss"] = head_cross_entropy_sum(selected(hidden), head, targets)
        fused["stub"] = hidden.new_zeros(1, targets.numel(), 0)
        return fused["stub"]

    if head is None:
        return contextlib.nullcontext()
    if fused_head_applies(model, head):
        return swapped_forward(head, fused_head)
    return _pre_hook(head, select)


@contextlib.contextmanager
def _pre_hook(module: torch.nn.Module, hook):
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (biases and norm weights are not decayed)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2)}
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if config.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, **kwargs)


def make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    warmup = int(math.ceil(config.warmup_ratio * total_steps))
    if config.lr_scheduler == "cosine" and config.min_lr_ratio > 0:
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs={"min_lr_rate": config.min_lr_ratio})
    name = {"constant": "constant_with_warmup"}.get(config.lr_scheduler, config.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class StepPlan:
    """Which packs each process sees at each micro-step: a seeded order per epoch, split across processes.

    The epoch's order is extended by wrapping around so that every optimizer step sees a full global batch
    (every process the same number of sequences, every step the same batch whatever its split into micro-batches
    and processes); the few repeats are counted in `repeated_packs`.
    """

    def __init__(self, n_packs: int, batch_size: int, accumulation: int, world: int, seed: int):
        self.n, self.batch, self.accum, self.world, self.seed = n_packs, batch_size, accumulation, world, seed
        global_micro = batch_size * world
        self.steps_per_epoch = max(1, math.ceil(n_packs / (global_micro * accumulation)))
        self.micro_per_epoch = self.steps_per_epoch * accumulation
        self.repeated_packs = self.micro_per_epoch * global_micro - n_packs

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Pack indices for `rank` in each micro-batch of optimizer step `step` (0-based)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.n, self.seed, epoch)
        global_micro = self.batch * self.world
        order = (order * (1 + self.micro_per_epoch * global_micro // max(1, self.n)))[: self.micro_per_epoch * global_micro]
        first = in_epoch * self.accum
        out = []
        for micro in range(first, first + self.accum):
            chunk = order[micro * global_micro: (micro + 1) * global_micro]
            out.append(chunk[rank * self.batch: (rank + 1) * self.batch])
        return out


def all_reduce_sum(accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def evaluate_loss(model, ctx: LoopContext, packs: list[Pack]) -> float:
    """Token-weighted mean loss over `packs` (see evaluate_loss_sum)."""
    total, count = evaluate_loss_sum(model, ctx, packs)
    return total / max(count, 1)


def evaluate_loss_sum(model, ctx: LoopContext, packs: list[Pack]) -> tuple[float, float]:
    """Summed loss and target-token count over `packs`, sharded over processes.

    Every process runs the same number of forwards (a process with fewer packs repeats its first batch and drops
    the result): under FSDP each forward is a collective (parameter all-gathers), so uneven counts would hang.
    """
    acc, size = ctx.accelerator, ctx.config.batch_size
    mine = packs[acc.process_index:: acc.num_processes]
    n_batches = math.ceil(math.ceil(len(packs) / acc.num_processes) / size)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for index in range(n_batches):
            chunk = mine[index * size: (index + 1) * size]
            batch = collate_batch(ctx, chunk or packs[:1])
            loss_sum, n = forward_loss(model, ctx.method, batch, ctx.precision, acc.device)
            if chunk:
                total += float(loss_sum)
                count += n
    model.train()
    total, count = all_reduce_sum(acc, [total, float(count)])
    return total, count


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, forget records logged after the checkpoint (they will be logged again), and a last line cut
    short by a kill mid-write."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


@dataclass
class _Run:
    """The loop's working set for one call of `train`."""

    model: Any  # as prepared by accelerate (DDP wrapper, or the same object sharded in place by FSDP)
    unwrapped: Any  # the model callbacks, checkpoints and loss terms see
    optimizer: Any
    scheduler: Any
    plan: StepPlan
    state: TrainState
    total_steps: int
    eval_every: int
    save_every: int
    metrics_path: Path
    sharded: bool


def train(model, ctx: LoopContext, train_packs: list[Pack], val_packs: list[Pack], resume: bool = False) -> TrainState:
    """Run the optimisation; returns the final state (best checkpoint loaded when configured). With
    `ctx.segment_attention` the model runs on per-example attention while it trains (models/attention.py); in fp32
    on a CPU its Llama-formula norms and rotary embedding run in fewer memory passes (models/fused_ops.py)."""
    cpu = ctx.accelerator.device.type == "cpu"
    with segment_attention(model) if ctx.segment_attention else contextlib.nullcontext(), \
            fused_norm_and_rotary(model) if cpu else contextlib.nullcontext():
        return _train(model, ctx, train_packs, val_packs, resume)


def _train(model, ctx: LoopContext, train_packs: list[Pack], val_packs: list[Pack], resume: bool) -> TrainState:
    run = _setup(model, ctx, len(train_packs), resume)
    state, acc = run.state, ctx.accelerator
    if state.step == 0:
        call(ctx.callbacks, "on_train_begin", state, run.unwrapped, ctx.tokenizer)
    run.model.train()
    progress = _Progress(run.total_steps, state.step, enabled=ctx.config.show_progress and acc.is_main_process)
    window = _Window()
    while state.step < run.total_steps and not state.should_stop:
        record, train_loss, lr = _optimizer_step(run, ctx, train_packs, window)
        if val_packs and (state.step % run.eval_every == 0 or state.step == run.total_steps):
            _evaluate(run.model, run.unwrapped, ctx, val_packs, state, record)
        if acc.is_main_process and len(record) > 1:
            append_metrics(run.metrics_path, record)
        if state.step % run.save_every == 0 or state.step == run.total_steps or state.should_stop:
            _save(run, ctx)
        progress.update(state.step, train_loss, lr, record)
    progress.close()
    _load_best(run, ctx)
    call(ctx.callbacks, "on_train_end", state, run.unwrapped, ctx.tokenizer)
    return state


def _setup(model, ctx: LoopContext, n_packs: int, resume: bool) -> _Run:
    """Optimizer, schedule, accelerate's `prepare` (DDP or FSDP2) and, with `resume`, the last checkpoint."""
    cfg, acc = ctx.config, ctx.accelerator
    sharded = sharding.is_sharded(acc)
    sharding.check_supported(acc, ctx.method, model, ctx.loss_terms)
    plan = StepPlan(n_packs, cfg.batch_size, cfg.gradient_accumulation_steps, acc.num_processes, cfg.seed)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
    eval_every = cfg.eval_steps or plan.steps_per_epoch
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    run = _Run(model, model, optimizer, scheduler, plan, TrainState(max_steps=total_steps), total_steps, eval_every,
               cfg.save_steps or eval_every, ctx.run_dir / "metrics.jsonl", sharded)
    if acc.is_main_process and (leftovers := ckpt.remove_partial(ctx.run_dir)):
        ctx.log(f"removed {len(leftovers)} partial checkpoint(s) left by an interrupted write: "
                f"{', '.join(p.name for p in leftovers)}")
    if not sharded:  # DDP wraps the model: load into the plain model first (sharded states load after sharding)
        _resume(run, ctx, resume)
    sharding.set_mixed_precision(acc, ctx.precision)
    run.model, run.optimizer = acc.prepare(model, optimizer)
    if sharded:
        sharding.after_prepare(run.model)
        ctx.log(sharding.describe(run.model, acc))
        _resume(run, ctx, resume)
    if plan.repeated_packs and acc.is_main_process:
        ctx.log(f"notice: {plan.repeated_packs} sequence(s) repeat per epoch to fill the last global batch")
    return run


def _resume(run: _Run, ctx: LoopContext, resume: bool) -> None:
    if not resume:
        return
    dirs = ckpt.checkpoint_dirs(ctx.run_dir)
    if not dirs:
        ctx.log("notice: --resume given but no complete checkpoint found; starting from step 0")
        if ctx.accelerator.is_main_process:
            truncate_metrics(run.metrics_path, 0)
        return
    payload = ckpt.load_checkpoint(dirs[-1], run.unwrapped, run.optimizer, run.scheduler, sharded_model=run.sharded)
    run.state = ckpt.restore_state(payload)
    run.state.max_steps = run.total_steps
    if ctx.accelerator.is_main_process:
        truncate_metrics(run.metrics_path, run.state.step)
    ctx.log(f"resumed from {dirs[-1]} (step {run.state.step} of {run.total_steps})")


class _Window:
    """Tokens and time since the last logged step (for tokens_per_second)."""

    def __init__(self):
        self.tokens, self.start = 0, time.perf_counter()

    def take(self) -> float:
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.tokens, self.start = 0, time.perf_counter()
        return rate


def _optimizer_step(run: _Run, ctx: LoopContext, train_packs: list[Pack], window: _Window):
    """One optimizer step over the global batch; returns (metrics record, train loss, learning rate used)."""
    cfg, acc, state = ctx.config, ctx.accelerator, run.state
    torch.manual_seed(cfg.seed * 1_000_003 + acc.process_index * 7919 + state.step)  # see checkpoint.py
    micro_packs = [[train_packs[i] for i in indices] for indices in run.plan.micro_batches(state.step, acc.process_index)]
    local_targets = sum(count_targets(p) for p in micro_packs)
    (global_targets,) = all_reduce_sum(acc, [float(local_targets)])
    loss_total, real_tokens, terms = accumulate_gradients(run.model, ctx, micro_packs, global_targets, run.unwrapped)
    grad_norm = None
    if cfg.max_grad_norm is not None:
        trainable = [p for p in run.model.parameters() if p.requires_grad]
        grad_norm = sharding.as_float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_total, real_tokens_all, targets_all = all_reduce_sum(acc, [loss_total, float(real_tokens), float(local_targets)])
    state.step += 1
    state.epoch = state.step / run.plan.steps_per_epoch
    state.tokens_seen += int(real_tokens_all)
    state.target_tokens_seen += int(targets_all)
    window.tokens += int(real_tokens_all)
    train_loss = loss_total / max(global_targets, 1.0)
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"training loss is {train_loss} at step {state.step}; lower train.learning_rate")
    record: dict[str, Any] = {"step": state.step}
    if state.step % cfg.logging_steps == 0 or state.step == run.total_steps:
        record.update(train_loss=round(train_loss, 6), lr=lr, epoch=round(state.epoch, 4), tokens=state.tokens_seen,
                      tokens_per_second=round(window.take(), 2))
        if grad_norm is not None:
            record["grad_norm"] = round(grad_norm, 6)
        record.update({name: round(value, 6) for name, value in terms.items()})
    return record, train_loss, lr


def _save(run: _Run, ctx: LoopContext) -> None:
    extra = {"total_steps": run.total_steps, "steps_per_epoch": run.plan.steps_per_epoch}
    ckpt.save_checkpoint(ctx.run_dir, run.unwrapped, run.optimizer, run.scheduler, run.state, extra,
                         accelerator=ctx.accelerator, sharded=run.sharded)
    if ctx.accelerator.is_main_process:
        ckpt.prune_checkpoints(ctx.run_dir, ctx.config.save_total_limit, run.state.best_step)
    ctx.accelerator.wait_for_everyone()


def _load_best(run: _Run, ctx: LoopContext) -> None:
    state = run.state
    if not (ctx.config.load_best_at_end and state.best_step is not None and state.best_step != state.step):
        return
    best = ctx.run_dir / "checkpoints" / f"step-{state.best_step}"
    if best.is_dir():
        ckpt.load_checkpoint(best, run.unwrapped, sharded_model=run.sharded)
        ctx.log(f"loaded the best checkpoint: step {state.best_step} (eval loss {state.best_eval_loss:.4f})")


def accumulate_gradients(model, ctx: LoopContext, micro_packs: list[list[Pack]], global_targets: float,
                         unwrapped=None) -> tuple[float, int, dict[str, float]]:
    """Backward over this process's micro-batches of one optimizer step; gradients are token-weighted.

    Returns (sum of token losses here, non-padding tokens here, extra loss terms by name). Gradient sync across
    processes happens on the last micro-batch, which also carries the extra loss terms (once per step).
    """
    acc = ctx.accelerator
    loss_total, real_tokens, terms = 0.0, 0, {}
    for index, packs in enumerate(micro_packs):
        batch = collate_batch(ctx, packs)
        real_tokens += int(batch["real_tokens"])
        sync = index == len(micro_packs) - 1
        context = acc.no_sync(model) if not sync and acc.num_processes > 1 else contextlib.nullcontext()
        with context:
            loss_sum, _ = forward_loss(model, ctx.method, batch, ctx.precision, acc.device)
            loss = loss_sum * acc.num_processes / max(global_targets, 1.0)
            if sync:
                for term in ctx.loss_terms:
                    name, value = term(unwrapped if unwrapped is not None else model)
                    loss = loss + value
                    terms[name] = float(value.detach())
            acc.backward(loss)
        loss_total += float(loss_sum.detach())
    return loss_total, real_tokens, terms


def _evaluate(model, unwrapped, ctx: LoopContext, val_packs, state: TrainState, record: dict[str, Any]) -> None:
    cfg = ctx.config
    if ctx.val_groups and len(ctx.val_groups) > 1:
        sums = {task: evaluate_loss_sum(model, ctx, packs) for task, packs in ctx.val_groups.items()}
        for task, (total, count) in sums.items():
            record[f"eval_loss/{task}"] = round(total / max(count, 1), 6)
        eval_loss = sum(t for t, _ in sums.values()) / max(sum(c for _, c in sums.values()), 1)
    else:
        eval_loss = evaluate_loss(model, ctx, val_packs)
    record["eval_loss"] = round(eval_loss, 6)
    improved = state.best_eval_loss is None or eval_loss < state.best_eval_loss - cfg.early_stopping_threshold
    if improved:
        state.best_eval_loss, state.best_step, state.evals_without_improvement = eval_loss, state.step, 0
    else:
        state.evals_without_improvement += 1
        if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
            state.should_stop = True
            state.stop_reason = (f"early stopping: no eval-loss improvement in {cfg.early_stopping_patience} "
                                 f"evaluations (best {state.best_eval_loss:.4f} at step {state.best_step})")
    unwrapped.eval()
    record.update(call(ctx.callbacks, "on_evaluate", state, unwrapped, ctx.tokenizer))
    unwrapped.train()


class _Progress:
    """A rich progress bar: step, loss, lr, tokens/s and ETA (only on the main process)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.last_tps = 0.0
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def update(self, step, loss, lr, record) -> None:
        if not self.enabled:
            return
        self.last_tps = record.get("tokens_per_second", self.last_tps)
        info = f"loss {loss:.4f}  lr {lr:.2e}  {self.last_tps:.0f} tok/s"
        if "eval_loss" in record:
            info += f"  eval {record['eval_loss']:.4f}"
        self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
