"""The lenient reader: every record of every source (see `containers`), parsed and validated, bad ones quarantined.

The strict training reader (`formats.read_conversations`) stops at the first bad record; this one never stops, so
`data check` / `data prepare` can quarantine each bad record and keep every good one. A column mapping renames
non-standard fields first (see `columns`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.columns import apply_columns, check_columns
from tunesmith.data.containers import CONTAINERS, container_of, iter_file_records
from tunesmith.data.formats import Conversation, RecordError, detect_format, parse_record
from tunesmith.data.toolcalls import message_text

__all__ = ["CONTAINERS", "LoadResult", "container_of", "file_format", "iter_file_records", "load_records"]

@dataclass
class LoadResult:
    conversations: list[Conversation] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)  # RecordError.as_dict() per rejected record
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected (or forced) format

    @property
    def input(self) -> int:
        return len(self.conversations) + len(self.quarantine)


def file_format(path: str | Path, fmt: str = "auto", sample: int = 20, columns: dict[str, str] | None = None) -> str:
    """The format of a file: forced, or the one most of its first `sample` readable records match."""
    if fmt != "auto":
        return fmt
    votes: dict[str, int] = {}
    for source, line, item in iter_file_records(path):
        if isinstance(item, RecordError):
            continue
        try:
            item = apply_columns(item, columns or {}, source, line)
        except RecordError:
            continue
        detected = detect_format(item)
        if detected:
            votes[detected] = votes.get(detected, 0) + 1
        if sum(votes.values()) >= sample:
            break
    return max(votes, key=lambda k: votes[k]) if votes else "auto"


def load_records(files: list[str | Path], fmt: str = "auto", columns: dict[str, str] | None = None) -> LoadResult:
    """Read and validate every record of every file; bad records go to `quarantine`, never raise.

    The format is detected once per file (majority of the first records), so one odd record in a ShareGPT file is
    reported against the ShareGPT schema ("conversations missing") rather than as "unknown format". A column mapping
    naming a column that a file lacks is an error for the whole file (raised, naming the file and its columns).
    """
    result = LoadResult()
    columns = columns or {}
    for path in files:
        if columns:
            check_columns(str(path), (item for _, _, item in iter_file_records(path)), columns)
        file_fmt = file_format(path, fmt, columns=columns)
        result.formats[str(path)] = file_fmt
        for source, line, item in iter_file_records(path):
            if isinstance(item, RecordError):
                result.quarantine.append(item.as_dict())
                continue
            try:
                item = apply_columns(item, columns, source, line)
                conversation = parse_record(item, file_fmt, source, line)
                _check_encodable(conversation)
            except RecordError as exc:
                result.quarantine.append(exc.as_dict())
                continue
            except Exception as exc:  # noqa: BLE001 - a parser bug must not stop the run; the record is quarantined
                result.quarantine.append(RecordError(source, line, None, f"could not parse: {exc!r}").as_dict())
                continue
            result.conversations.append(conversation)
    return result


def _check_encodable(conversation: Conversation) -> None:
    """JSON may escape lone surrogates (\\ud800); such text cannot be written as UTF-8, so it is rejected here."""
    for i, message in enumerate(conversation.messages):
        try:
            message_text(message).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RecordError(conversation.source, conversation.line, f"turn[{i}].content",
                              f"invalid UTF-8 (lone surrogate at character {exc.start})") from None
