"""metrics.jsonl: one JSON object per optimizer step (step, train_loss, eval_loss, lr, epoch, tokens, grad_norm...).

Parsed in one place for the loss-curve plots (eval/plots.py), the diagnosis, the dashboard (ui/sources.py) and the
benches."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tunesmith.errors import UsageError


def parse_metrics_lines(lines: Iterable[str], path: str | Path) -> list[dict[str, Any]]:
    """Records in file order, blank lines skipped; a bad line raises UsageError naming file and line."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{number}: expected a JSON object per line")
        records.append(record)
    return records


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of metrics.jsonl in file order; a bad line raises UsageError naming file and line."""
    with open(path, encoding="utf-8") as handle:
        return parse_metrics_lines(handle, path)
