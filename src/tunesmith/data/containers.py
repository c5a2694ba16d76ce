"""Containers: every kind of file (JSONL, JSON array, Parquet, CSV) and `datasets` source (a saved folder, a hub
id; see `hub`) read as `(source, line, item)` where `item` is a raw record or a `RecordError` for a line that could
not be read. Nothing here knows the record formats (that is `formats`), so both the strict training reader and the
lenient `data check` reader sit on top of it.

"line" means: the 1-based line of a JSONL file, the 1-based item of a JSON array, the CSV line where the row
starts, the 1-based row of a Parquet file or a `datasets` split.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.data import hub
from tunesmith.data.errors import RecordError


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) from a JSONL file or a JSON array file.

    Lines are read as bytes so invalid UTF-8 is reported per line rather than failing the whole file. A line that
    is not valid raises RecordError; callers that quarantine catch it per record.
    """
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(1024).lstrip()
    if head.startswith(b"["):
        try:
            items = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordError(str(path), getattr(exc, "lineno", None), None, f"not a valid JSON array: {exc}") from exc
        for index, item in enumerate(items):
            yield index + 1, item  # "line" of a JSON array = 1-based item index
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, RecordError(str(path), number, None, f"invalid UTF-8 at byte {exc.start}")
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, RecordError(str(path), number, None, f"not valid JSON: {exc.msg} (column {exc.colno})")


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
