"""Checkpoints: trainable parameters, optimizer, scheduler and trainer state, written so that a kill never leaves
a checkpoint that looks complete but is not.

Layout: `checkpoints/step-<N>/` holds either
- `trainable.safetensors` (by name), `optimizer.pt`, `scheduler.pt`, `trainer_state.json` — one process or DDP
  (every process holds full replicas; the main process writes), or
- `sharded/` (a torch.distributed.checkpoint folder: trainable parameters and optimizer state, each process
  writing its own shards), `scheduler.pt`, `trainer_state.json` — FSDP.
Only frozen-free state is stored (the base model is re-read from its source on resume).

Atomicity: everything is written into `checkpoints/.step-<N>.*` and renamed to `step-<N>` in one `rename` once
every file (and, under FSDP, every process's shards) is complete; `--resume` only ever looks at `step-<N>`
names, so a process killed mid-write (SIGKILL, OOM killer, pre-emption) leaves a hidden partial folder that is
ignored and removed on the next start. A failed write (disk full, read-only output) raises CheckpointWriteError
naming the path; earlier checkpoints are untouched.

Resuming on another number of processes (same global batch = batch_size x gradient_accumulation_steps x
processes): what is identical and what is not.
- Data order: identical. Which sequences form optimizer step k depends only on (seed, global batch), not on how
  they are split over processes and micro-batches (loop.StepPlan).
- Parameters and optimizer state: identical (single-process and DDP checkpoints hold full tensors; an FSDP
  checkpoint is re-sharded by torch.distributed.checkpoint onto any number of processes, with or without FSDP).
  The one refused combination: a single-process/DDP checkpoint resumed under FSDP (its optimizer state is keyed
  by position, not by parameter name).
- Random state (dropout): NOT identical. Random state is not stored; every process reseeds from (seed, rank,
  step) at each optimizer step, so a resume on the SAME number of processes replays exactly what an uninterrupted
  run does, dropout included, while on another number of processes the dropout masks differ (rank r now sees
  other sequences). With dropout 0 the losses match an uninterrupted run to float-reduction tolerance
  (tests/train/test_kill_resume.py: 1e-5); with dropout they follow the same distribution but not the same values.
Optimizer/scheduler state is loaded with `weights_only=True` (no arbitrary pickles).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith.config import ConfigError
from tunesmith.methods.base import load_trainable_state, trainable_state
from tunesmith.train.callbacks import TrainState

_STEP_DIR = re.compile(r"^step-(\d+)$")
SHARDED = "sharded"
# Test-only: pause inside the write of this step's checkpoint (after its first file) so a test can SIGKILL there.
PAUSE_ENV = "TUNESMITH_TEST_PAUSE_IN_CHECKPOINT"


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (a ConfigError so the CLI prints it as a user-facing error)."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete hidden leftovers of interrupted writes (`.step-N.*`); returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    leftovers = sorted(root.glob(".step-*")) if root.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return leftovers


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, extra: dict[str, Any],
                    accelerator=None, sharded: bool = False) -> Path:
    """Write `checkpoints/step-<state.step>` atomically. Collective: every process calls it."""
    target = Path(run_dir) / "checkpoints" / f"step-{state.step}"
    partial = target.parent / f".{target.name}.partial"
    main = accelerator is None or accelerator.is_main_process
    error: Exception | None = None
    if main:
        try:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        except OSError as exc:
            error = exc
    _agree(accelerator, error is None, target, error)
    if sharded:
        _save_sharded(partial / SHARDED, model, optimizer, target)
    if main:
        try:
            if not sharded:
                save_file(trainable_state(model), str(partial / "trainable.safetensors"))
                _pause_for_tests(run_dir, state.step)
                torch.save(_raw(optimizer).state_dict(), partial / "optimizer.pt")
            else:
                _pause_for_tests(run_dir, state.step)
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
            payload = {**dataclasses.asdict(state), **extra}
            (partial / "trainer_state.json").write_text(json.dumps(payload, indent=2) + "\n")
            _replace_dir(partial, target)
        except Exception as exc:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError("unexpected pos")
            error = exc
            shutil.rmtree(partial, ignore_errors=True)
    _agree(accelerator, error is None, target, error)
    return target


def _save_sharded(path: Path, model, optimizer, target: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, _raw(optimizer), options=StateDictOptions(ignore_frozen_params=True))
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    except Exception as exc:  # DCP gathers every process's write errors into one CheckpointException
        raise CheckpointWriteError(f"could not write checkpoint {target}: {exc}") from exc


def _agree(accelerator, ok: bool, target: Path, error: Exception | None) -> None:
    """All processes learn whether the main process's part succeeded (a plain barrier would hang on failure)."""
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([1 if ok else 0], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        ok = bool(flag.item())
    if not ok:
        last = checkpoint_dirs(target.parent.parent)
        kept = f"the last complete checkpoint, {last[-1]}, is intact" if last else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {target}: {_reason(error, target)}; {kept}") from error


def _reason(error: Exception | None, target: Path) -> str:
    """What went wrong, in words, with the free space of the file system (torch.save hides ENOSPC)."""
    if error is None:
        return "another process failed to write its part"
    reason = error.strerror if isinstance(error, OSError) and error.strerror else f"{type(error).__name__}: {error}"
    if isinstance(error, OSError) and error.filename:
        reason += f" ({error.filename})"
    for folder in (target.parent, target.parent.parent):
        try:
            return f"{reason} [{shutil.disk_usage(folder).free:,} bytes free on that file system]"
        except OSError:
            continue
    return reason


def _replace_dir(source: Path, target: Path) -> None:
    old = None
    if target.exists():  # re-saving a step (after a resume): move the old one aside first
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pause_for_tests(run_dir: Path, step: int) -> None:
    if os.environ.get(PAUSE_ENV) == str(step):
        (Path(run_dir) / f".paused-in-checkpoint-{step}").write_text(str(os.getpid()))
        time.sleep(3600)


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def load_checkpoint(directory: Path, model, optimizer=None, scheduler=None, sharded_model: bool = False) -> dict[str, Any]:
    """Load a checkpoint of either layout into `model` (and optimizer/scheduler). Collective for `sharded/`."""
    directory = Path(directory)
    if (directory / SHARDED).is_dir():
        _load_sharded(directory / SHARDED, model, optimizer)
    elif sharded_model:
        raise ConfigError(f"{directory} was written without FSDP; resume it without sharding (train.sharding=none), "
                          "or start the sharded run afresh")
    else:
        load_trainable_state(model, load_file(str(directory / "trainable.safetensors")))
        if optimizer is not None:
            _raw(optimizer).load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    return json.loads((directory / "trainer_state.json").read_text())


def _load_sharded(path: Path, model, optimizer) -> None:
    """Re-shard onto this process layout (any number of processes, with or without FSDP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    # Setting: frozen (base) weights are not in the checkpoint, so not strict; a trainable weight missing from the
    # checkpoint still fails, in dcp.load, which is asked for every trainable key of this model.
    set_options = StateDictOptions(ignore_frozen_params=True, strict=False)
    if optimizer is None:
        state = {"model": get_model_state_dict(model, options=options)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"], options=set_options)
        return
    model_state, optim_state = get_state_dict(model, _raw(optimizer), options=options)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, _raw(optimizer), model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=set_options)


def restore_state(payload: dict[str, Any]) -> TrainState:
    fields = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in payload.items() if k in fields})


def prune_checkpoints(run_dir: Path, keep: int, protect: int | None) -> None:
    """Keep the `keep` most recent checkpoints and the one at step `protect` (the best)."""
    dirs = checkpoint_dirs(run_dir)
    recent = set(dirs[-keep:])
    for path in dirs:
        step = int(_STEP_DIR.match(path.name).group(1))
        if path not in recent and step != protect:
            shutil.rmtree(path, ignore_errors=True)
