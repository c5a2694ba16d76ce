"""What every record file shares: find it in its folder, parse it with a clear error, split known from extra keys."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any


def read_record_json(path: str | Path, file_name: str) -> dict[str, Any]:
    """The JSON object of a record file: `path` is the file itself or the folder holding `file_name`."""
    path = Path(path)
    if path.is_dir():
        path = path / file_name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        from tunesmith.errors import UsageError

        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields the dataclass `cls` declares, everything else) — unknown keys are kept in `extra`, never dropped."""
    known = {f.name for f in fields(cls)} - {"extra"}
    return ({k: v for k, v in data.items() if k in known}, {k: v for k, v in data.items() if k not in known})
