"""`tunesmith data convert FILE --to FORMAT`: rewrite every valid record in another format.

Conversions between ShareGPT and OpenAI messages are lossless, tool calls, tool results (with their call ids),
tool definitions and turn weights included: parsing the output gives back the same canonical conversation (tested
both ways on every fixture). Invalid records are not written; each one is returned (file, line, field, reason) so the CLI can report them, and
a conversation the target cannot hold (Alpaca holds one exchange) is reported the same way, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.data.formats import FORMATS, RecordError, to_format
from tunesmith.data.readers import load_records


def convert_file(path: str | Path, to: str, fmt: str = "auto", columns: dict[str, str] | None = None,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(converted records, problems). Each problem is a RecordError.as_dict()."""
    if to not in FORMATS:
        raise RecordError(str(path), None, None, f"--to {to!r}: expected one of {', '.join(FORMATS)}")
    loaded = load_records([path], fmt, columns)
    converted, problems = [], list(loaded.quarantine)
    for conversation in loaded.conversations:
        try:
            converted.append(to_format(conversation, to))
        except ValueError as exc:
            problems.append(RecordError(conversation.source, conversation.line, None, str(exc)).as_dict())
    problems.sort(key=lambda p: (p["file"], p["line"] or 0))
    return converted, problems


def to_jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
