"""Named points inside registry writes, where tests stop a write to prove it atomic.

`checkpoint(stage)` does nothing in normal use. Tests either replace it (to raise at a stage), or run a real
`tunesmith runs ...` process with TUNESMITH_TEST_PAUSE_AT=STAGE=FLAG_FILE in its environment: on reaching STAGE the
process writes FLAG_FILE and sleeps, and the test SIGKILLs it there (the OOM killer or a pre-empted machine, at
the worst moment). The variable is read at each checkpoint; it is for tests only and has no other effect.

Stages, in order:
  register: artifact-staged, artifact-renamed (per artifact), artifacts-stored, in-transaction, registered
  promote / rollback: alias-locked, alias-moved, alias-in-transaction, alias-committed
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "TUNESMITH_TEST_PAUSE_AT"


def checkpoint(stage: str) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    name, _, flag = wanted.partition("=")
    if name == stage:
        Path(flag).write_text(stage)
        time.sleep(3600)  # the test kills the process here
