"""One training process per run directory: an advisory lock that a killed process cannot leave behind.

The lock is `fcntl.flock` on `<output.dir>/.<name>.lock`, a file beside the run directory (inside it, an
`output.overwrite` would delete the lock file of the run it replaces). The kernel drops a flock when the
process holding it exits for any reason, SIGKILL and the OOM killer included, so there is no stale lock to clean
up; the pid written into the file serves only the error message. Advisory: it stops a second `tunesmith train`,
not an unrelated program writing into the folder. On file systems without flock support (some network mounts)
`flock` raises and we say so rather than train unprotected.

Held for the life of the process (the training process exits when the run ends); a second acquisition of the
same path by the process that holds it is a no-op, so a library caller may run the same directory twice in turn.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from tunesmith.config import ConfigError


class RunInUseError(ConfigError):
    """Another process is training into this run directory (a ConfigError so the CLI prints it plainly)."""


_held: dict[Path, int] = {}  # lock path -> open file descriptor (closing it would release the lock)


def lock_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def acquire_run_lock(run_dir: Path) -> Path:
    """Take the run directory's lock or raise RunInUseError naming the holder; returns the lock file's path."""
    path = lock_path(run_dir).resolve()
    if path in _held:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write to the output folder {path.parent}: {exc.strerror} "
                          "(check output.dir: it must be writable)") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunInUseError(f"{run_dir} is in use by another tunesmith process (pid {holder}); wait for it to "
                                f"finish or stop it, or choose another output.name") from exc
        raise ConfigError(f"cannot lock {path}: {exc.strerror} (file locks unsupported on this file system?)") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = fd
    return path


def release_run_lock(run_dir: Path) -> None:
    fd = _held.pop(lock_path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock
