"""Atomic writes of files and folders: write beside the target, then rename over it.

A reader (or a crash) sees the old content or the new one, never half of either. Used for checkpoints,
adapters, run summaries, reports, plots and registry artifacts: every writer in tunesmith goes through here.

Modes: written files get FILE_MODE (0644) and folders DIR_MODE (0755) by an explicit chmod of the temporary,
because mkstemp/mkdtemp create 0600/0700 and a run directory is meant to be readable by the people sharing it.
The process umask is never read or changed here: os.umask can only be read by setting it, which races with the
serving and registry threads creating files at the same moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644
DIR_MODE = 0o755


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename.

    os.replace cannot replace a non-empty folder, so an existing target is first renamed aside and removed
    after the new one is in place; a crash between the two renames leaves the old folder under `.old-*`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (matplotlib, torch.save, ...);
    on success the file is fsynced, given FILE_MODE and renamed over `path`; on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
