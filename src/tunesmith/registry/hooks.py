"""Named points inside registry writes. They do nothing; tests replace `checkpoint` to kill or fail a write at
an exact stage (SIGKILL of a subprocess mid-registration), which is how atomicity is checked."""

from __future__ import annotations


def checkpoint(stage: str) -> None:
    """Stages: artifact-staged, artifact-renamed, artifacts-stored, in-transaction."""
    return None
