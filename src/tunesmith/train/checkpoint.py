"""Checkpoints: the trainable parameters (safetensors, by name), optimizer, scheduler and trainer state.

Layout: `checkpoints/step-<N>/{trainable.safetensors, optimizer.pt, scheduler.pt, trainer_state.json}`, written
atomically. Random state is not stored: the trainer reseeds from (seed, rank, step) at every optimizer step, so
resuming at step N replays exactly what an uninterrupted run does (dropout included), on any number of ranks.
Optimizer/scheduler state is loaded with `weights_only=True` (no arbitrary pickles).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith.atomic import atomic_dir
from tunesmith.methods.base import load_trainable_state, trainable_state
from tunesmith.train.callbacks import TrainState

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Existing checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, extra: dict[str, Any]) -> Path:
    target = Path(run_dir) / "checkpoints" / f"step-{state.step}"
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        payload = {**dataclasses.asdict(state), **extra}
        payload.pop("log", None)
        (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=2) + "\n")
    return target


def load_checkpoint(directory: Path, model, optimizer=None, scheduler=None) -> dict[str, Any]:
    directory = Path(directory)
    load_trainable_state(model, load_file(str(directory / "trainable.safetensors")))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    return json.loads((directory / "trainer_state.json").read_text())


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
