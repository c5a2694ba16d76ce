"""Helpers for tests that run `tunesmith train` as real processes (torchrun for several), kill them and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tunesmith.serve.testing import free_port

# CPU processes (gloo) even on a machine with GPUs: the CPU path is what these tests check (and on a GPU machine it
# is the setting of PyTorch issue 132471: fully_shard with a gloo group must not build a CUDA mesh).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}


def cpu_only(monkeypatch) -> None:
    """The in-process baseline runs on CPU too (same numerics as the CPU processes it is compared with)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


def write_config(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def train_command(config_path: Path, nproc: int = 1, resume: bool = False) -> list[str]:
    if nproc == 1:
        command = [sys.executable, "-m", "tunesmith.cli", "train", str(config_path)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(free_port()), "-m", "tunesmith.cli", "train", str(config_path)]
    return command + (["--resume"] if resume else [])


def run_train(config_path: Path, nproc: int = 1, resume: bool = False, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(config_path, nproc, resume), env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def start_train(config_path: Path, nproc: int = 1, resume: bool = False, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_command(config_path, nproc, resume), env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process ended (rc {process.returncode}) before {what}:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps, default=0)


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (via /proc), e.g. torchrun's workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank."""
    for pid in descendants(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output
