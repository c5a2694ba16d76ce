"""Column mappings: read files whose fields are not the standard ones (`--columns prompt=question,response=answer`,
or `data.columns: {prompt: question, response: answer}` in a run config).

The names on the left are those of Axolotl's and LLaMA-Factory's dataset descriptions, mapped to the fields the
parsers read: prompt/instruction -> instruction, query/input -> input, response/output -> output, system, tools,
text, messages, conversations; role and content rename the keys inside each turn (role/content for `messages`,
from/value for ShareGPT `conversations`). A mapping is applied to each raw record before its format is detected.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tunesmith.data.errors import PrepareError, RecordError

TOP_LEVEL = {"prompt": "instruction", "instruction": "instruction", "query": "input", "input": "input",
             "response": "output", "output": "output", "system": "system", "tools": "tools", "text": "text",
             "messages": "messages", "conversations": "conversations"}
TURN_LEVEL = ("role", "content")
NAMES = tuple(TOP_LEVEL) + TURN_LEVEL
_TURN_KEYS = {"messages": {"role": "role", "content": "content"}, "conversations": {"role": "from", "content": "value"}}


def parse_columns(spec: str | dict[str, str] | None, flag: str = "--columns") -> dict[str, str]:
    """"prompt=question,response=answer" (or a dict) -> {"prompt": "question", "response": "answer"}, validated."""
    if not spec:
        return {}
    if isinstance(spec, str):
        pairs = {}
        for item in (part.strip() for part in spec.split(",") if part.strip()):
            name, sep, column = item.partition("=")
            if not sep or not name.strip() or not column.strip():
                raise PrepareError(f"{flag} {spec!r}: expected NAME=COLUMN pairs separated by commas, "
                                   "e.g. prompt=question,response=answer")
            pairs[name.strip()] = column.strip()
        spec = pairs
    unknown = sorted(set(spec) - set(NAMES))
    if unknown:
        raise PrepareError(f"{flag}: unknown name(s) {unknown}; expected some of {', '.join(NAMES)}")
    return dict(spec)


def apply_columns(record: Any, columns: dict[str, str], file: str, line: int | None) -> Any:
    """The record with mapped columns renamed to the standard fields (records that are not objects pass through)."""
    if not columns or not isinstance(record, dict):
        return record
    out = dict(record)
    for name, column in columns.items():
        if name in TURN_LEVEL or column not in out:
            continue
        target = TOP_LEVEL[name]
        if target in out and target != column:
            raise RecordError(file, line, column, f"mapped to {target!r} by the column mapping, but the record also "
                              f"has a {target!r} field; map only one of them")
        out[target] = out.pop(column)
    for list_key, keys in _TURN_KEYS.items():
        turns = out.get(list_key)
        if isinstance(turns, list):
            out[list_key] = [_rename_turn(t, columns, keys) for t in turns]
    return out


def _rename_turn(turn: Any, columns: dict[str, str], keys: dict[str, str]) -> Any:
    if not isinstance(turn, dict):
        return turn
    out = dict(turn)
    for name in TURN_LEVEL:
        column = columns.get(name)
        if column and column in out and column != keys[name]:
            out[keys[name]] = out.pop(column)
    return out


def check_columns(file: str, records: Iterable[Any], columns: dict[str, str], sample: int = 100) -> None:
    """Fail, naming the file and the columns it has, when a mapped column appears in none of its first records."""
    if not columns:
        return
    top: set[str] = set()
    inner: set[str] = set()
    for count, record in enumerate(records):
        if count >= sample:
            break
        if not isinstance(record, dict):
            continue
        top |= set(record)
        for value in record.values():
            if isinstance(value, list):
                inner |= {k for turn in value if isinstance(turn, dict) for k in turn}
    for name, column in columns.items():
        present = inner if name in TURN_LEVEL else top
        if column not in present:
            where = "turn keys" if name in TURN_LEVEL else "columns"
            raise RecordError(file, None, None, f"column mapping {name}={column}: there is no {column!r} in this "
                              f"file; its {where} are: {', '.join(sorted(present)) or 'none'} (fix --columns or "
                              "data.columns)")
