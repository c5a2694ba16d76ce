"""Registry exceptions, importable without SQLAlchemy (cli.main turns them into `error: ...` lines)."""

from __future__ import annotations

from tunesmith.errors import UsageError


class RegistryError(UsageError, RuntimeError):
    """A registry problem phrased for a person: which run, alias or URL, and what to do about it."""


class ArtifactError(RegistryError):
    """An artifact is missing from the store or no longer matches its digest."""
