"""One error family: every error tunesmith raises for a person to read derives from `TunesmithError`.

The command line catches this one type and prints `error: <message>` (plus `hint: <hint>` when the error knows
the fix), exiting with the error's `exit_status`: 2 for a usage or configuration problem (the user can fix the
command, the config or the input file), 1 for a failure of the work itself. Anything else is a bug and is
reported as such (traceback with `--debug` or TUNESMITH_DEBUG=1).

The specific errors live beside the code that raises them (ConfigError in config.py, RecordError in
data/formats.py, RegistryError in registry/errors.py, ...) and subclass one of the two classes here. This module
imports nothing from tunesmith, so every layer may use it.
"""

from __future__ import annotations

USAGE_EXIT_STATUS = 2
FAILURE_EXIT_STATUS = 1


class TunesmithError(Exception):
    """An error phrased for a person: what went wrong, where (file, line, key or flag) and, in `hint`, the fix."""

    exit_status = FAILURE_EXIT_STATUS

    def __init__(self, message: str = "", *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(TunesmithError, ValueError):
    """The command, its config or its input is wrong; fixing them fixes the run (exit status 2).

    A ValueError too, so that code written against the library's earlier plain ValueErrors keeps working.
    """

    exit_status = USAGE_EXIT_STATUS


class Failure(TunesmithError, RuntimeError):
    """The work itself failed after the input was accepted (exit status 1): a registration, a write, a load."""

    exit_status = FAILURE_EXIT_STATUS
