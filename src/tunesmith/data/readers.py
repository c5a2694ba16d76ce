"""Lenient readers: every container (JSONL, JSON array, Parquet, CSV, a saved Hugging Face `datasets` folder)
yields `(line, item)` pairs where `item` is a raw record or a `RecordError` for a line that could not be read.

The strict training reader (`formats.read_conversations`) stops at the first bad record; these readers never stop,
so `data check` / `data prepare` can quarantine each bad record and keep every good one. "line" means: the
1-based line of a JSONL file, the 1-based item of a JSON array, the CSV line where the row starts, the 1-based row
of a Parquet file or a `datasets` split. A source may also be a Hugging Face dataset (`hf:ORG/NAME[:SPLIT][@REV]`, or a
saved folder with an optional `:SPLIT`; see `hub`), and a column mapping renames non-standard fields (see `columns`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data import hub
from tunesmith.data.columns import apply_columns, check_columns
from tunesmith.data.formats import Conversation, RecordError, detect_format, iter_json_records, parse_record
from tunesmith.data.toolcalls import message_text

CONTAINERS = ("jsonl", "json", "parquet", "csv", "hf")
# CSV cells are strings; these columns hold nested turns and are parsed as JSON when they look like JSON.
_JSON_COLUMNS = ("messages", "conversations")


def container_of(path: str | Path) -> str:
    """Which container a path is: a folder saved by `datasets.save_to_disk` is "hf"; otherwise by extension."""
    path = Path(path)
    if path.is_dir():
        if hub.is_saved_dataset(path):
            return "hf"
        raise RecordError(str(path), None, None, "a folder, but not one saved by datasets.save_to_disk "
                          "(no dataset_info.json / dataset_dict.json); pass its files instead")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "json"  # .jsonl, .json and anything else: iter_json_records tells JSON arrays from JSON lines


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file; all mean "unreadable"
        yield 1, RecordError(str(path), None, None, f"not a readable Parquet file: {exc}")
        return
    for index, row in enumerate(table.to_pylist(), start=1):
        yield index, _drop_nulls(row)


def _drop_nulls(row: dict[str, Any]) -> dict[str, Any]:
    """Columnar files fill absent fields with null; a null field is treated as a missing one."""
    return {key: value for key, value in row.items() if value is not None}


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    # surrogateescape keeps undecodable bytes as lone surrogates so that one bad row, not the file, is rejected.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    start = 2
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            yield line, _csv_record(path, line, row)
    except csv.Error as exc:
        yield start, RecordError(str(path), start, None, f"not valid CSV: {exc}")


def _csv_record(path: Path, line: int, row: dict[str | None, Any]) -> Any:
    if None in row:
        return RecordError(str(path), line, None, f"{len(row[None])} more cells than header columns")
    record: dict[str, Any] = {}
    for key, value in row.items():
        if value is None:  # short row: the column is absent for this record
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return RecordError(str(path), line, key, "invalid UTF-8")
        if key in _JSON_COLUMNS and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                return RecordError(str(path), line, key, f"cell is not valid JSON: {exc.msg}")
        if value == "" and key not in ("instruction", "output", "text"):
            continue  # an empty optional cell (e.g. alpaca "input") is an absent field
        record[key] = value
    return record


def _iter_json_fallback(path: Path) -> Iterator[tuple[int, Any]]:
    """A file that starts with "[" but is not one valid JSON array: JSON lines whose first line is an array, or a
    damaged array, whose items are read one by one up to the damage (the rest cannot be located reliably)."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    lines = text.splitlines()
    try:
        json.loads(lines[0])
        is_jsonl = sum(1 for line in lines if line.strip()) > 1
    except json.JSONDecodeError:
        is_jsonl = False
    if is_jsonl:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield number, _parse_line(path, number, line)
        return
    decoder, position, index = json.JSONDecoder(), text.index("[") + 1, 0
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position < len(text) and text[position] == "]":
            return
        index += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            yield index, RecordError(str(path), index, None, f"not valid JSON (array item {index}, line {exc.lineno} "
                                     f"column {exc.colno}): {exc.msg}; the rest of the array cannot be read")
            return
        yield index, item


def _parse_line(path: Path, number: int, line: str) -> Any:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:
        return RecordError(str(path), number, None, f"invalid UTF-8 at character {exc.start}")
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return RecordError(str(path), number, None, f"not valid JSON: {exc.msg} (column {exc.colno})")


def iter_file_records(path: str | Path) -> Iterator[tuple[str, int | None, Any]]:
    """Yield (source, line, raw record or RecordError) for every record of a file, never raising on bad data."""
    source = hub.parse_source(str(path))
    if source is not None:
        yield from hub.iter_dataset_rows(source)
        return
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; check the path")
    kind = container_of(path)
    iterator = _iter_parquet(path) if kind == "parquet" else _iter_csv(path) if kind == "csv" else None
    if iterator is None:
        records = iter_json_records(path)
        try:  # a JSON array is parsed (and can fail) before its first item; JSON lines fail per line
            iterator = itertools.chain([next(records)], records)
        except StopIteration:
            iterator = iter(())
        except RecordError:  # starts with "[" but is not one valid JSON array
            iterator = _iter_json_fallback(path)
    for line, item in iterator:
        yield str(path), line, item


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
