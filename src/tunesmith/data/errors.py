"""Errors of the data tools that the CLI turns into `error: ...` lines (kept import-light for `tunesmith --help`)."""

from tunesmith.errors import UsageError


class PrepareError(UsageError):
    """A bad option or option combination for `data check/prepare`, phrased with the flag to change."""
