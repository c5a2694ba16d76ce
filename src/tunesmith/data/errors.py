"""Errors of the data tools that the CLI turns into `error: ...` lines (kept import-light for `tunesmith --help`)."""

from __future__ import annotations

from typing import Any

from tunesmith.errors import UsageError


class PrepareError(UsageError):
    """A bad option or option combination for `data check/prepare`, phrased with the flag to change."""


class RecordError(UsageError):
    """One bad record (or a bad file): where it is and what is wrong, phrased for a person."""

    def __init__(self, file: str, line: int | None, field: str | None, reason: str):
        self.file, self.line, self.field, self.reason = file, line, field, reason
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: field '{field}': {reason}" if field else f"{where}: {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason}
