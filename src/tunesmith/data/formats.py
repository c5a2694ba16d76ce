"""Record formats: Alpaca, ShareGPT, OpenAI messages and ChatML text, all parsed into one canonical form.

Canonical form: a `Conversation` — a list of `{"role": "system"|"user"|"assistant", "content": str}` turns with
optional system turns first, alternating user/assistant after, ending with an assistant turn — plus where it
came from (file, line). Parsing validates: a bad record raises `RecordError` naming file, line and field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import UsageError

FORMATS = ("alpaca", "sharegpt", "messages", "chatml")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bot": "assistant", "model": "assistant",
}


class RecordError(UsageError):
    """One bad record: where it is and what is wrong, phrased for a person."""

    def __init__(self, file: str, line: int | None, field: str | None, reason: str):
        self.file, self.line, self.field, self.reason = file, line, field, reason
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: field '{field}': {reason}" if field else f"{where}: {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason}


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    source: str = ""
    line: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)


# ----------------------------------------------------------------------------------------- detection
def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record and isinstance(record["text"], str) and "<|im_start|>" in record["text"]:
        return "chatml"
    return None


# ------------------------------------------------------------------------------------------- parsing
def _require_str(record: dict, key: str, where: tuple[str, int | None], path: str | None = None,
                 allow_empty: bool = False) -> str:
    name = path or key
    if key not in record:
        raise RecordError(*where, name, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(*where, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(*where, name, "empty")
    return value


def _check_order(messages: list[dict[str, str]], where: tuple[str, int | None], field_name: str) -> None:
    """System turns first, then user/assistant alternating starting with user, ending with assistant."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    rest = messages[i:]
    if not rest:
        raise RecordError(*where, field_name, "no user or assistant turns")
    for j, message in enumerate(rest):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RecordError(*where, f"{field_name}[{i + j}].role",
                              f"turns out of order: expected {expected}, got {message['role']}")
    if rest[-1]["role"] != "assistant":
        raise RecordError(*where, field_name, "conversation does not end with an assistant turn")


def parse_alpaca(record: dict, where: tuple[str, int | None]) -> list[dict[str, str]]:
    instruction = _require_str(record, "instruction", where)
    extra = record.get("input", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise RecordError(*where, "input", f"expected a string, got {type(extra).__name__}")
    output = _require_str(record, "output", where)
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _require_str(record, "system", where)})
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _parse_turns(turns: Any, where, field_name: str, role_key: str, content_key: str,
                 role_map: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise RecordError(*where, field_name, f"expected a list of turns, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        path = f"{field_name}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(*where, path, f"expected an object, got {type(turn).__name__}")
        role_raw = _require_str(turn, role_key, where, f"{path}.{role_key}")
        role = role_map.get(role_raw.lower())
        if role is None:
            raise RecordError(*where, f"{path}.{role_key}", f"unknown role {role_raw!r}")
        content = _require_str(turn, content_key, where, f"{path}.{content_key}")
        messages.append({"role": role, "content": content})
    _check_order(messages, where, field_name)
    return messages


def parse_sharegpt(record: dict, where) -> list[dict[str, str]]:
    if "conversations" not in record:
        raise RecordError(*where, "conversations", "missing")
    return _parse_turns(record["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)


def parse_messages(record: dict, where) -> list[dict[str, str]]:
    if "messages" not in record:
        raise RecordError(*where, "messages", "missing")
    return _parse_turns(record["messages"], where, "messages", "role", "content", {r: r for r in ROLES})


_CHATML_TURN = re.compile(r"<\|im_start\|>([^\n]*)\n(.*?)<\|im_end\|>", re.S)


def parse_chatml(record: dict, where) -> list[dict[str, str]]:
    text = _require_str(record, "text", where)
    turns = [{"role": role.strip(), "content": content} for role, content in _CHATML_TURN.findall(text)]
    if not turns:
        raise RecordError(*where, "text", "no <|im_start|>role ... <|im_end|> turns found")
    leftover = _CHATML_TURN.sub("", text).strip()
    if leftover:
        raise RecordError(*where, "text", f"text outside turns: {leftover[:40]!r}")
    for i, turn in enumerate(turns):
        if turn["role"] not in ROLES:
            raise RecordError(*where, f"text[turn {i}].role", f"unknown role {turn['role']!r}")
        if not turn["content"].strip():
            raise RecordError(*where, f"text[turn {i}].content", "empty")
    _check_order(turns, where, "text")
    return turns


PARSERS = {"alpaca": parse_alpaca, "sharegpt": parse_sharegpt, "messages": parse_messages, "chatml": parse_chatml}


def parse_record(record: Any, fmt: str, file: str, line: int | None) -> Conversation:
    where = (file, line)
    if not isinstance(record, dict):
        raise RecordError(file, line, None, f"expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record) or ""
        if not fmt:
            raise RecordError(file, line, None,
                              f"unknown format: keys {sorted(record)[:6]} match none of {', '.join(FORMATS)}")
    return Conversation(PARSERS[fmt](record, where), source=file, line=line)


# ----------------------------------------------------------------------------------------- rendering
def to_format(conversation: Conversation | list[dict[str, str]], fmt: str) -> dict[str, Any]:
    """Write a conversation in a given format (the inverse of parse_record)."""
    messages = conversation.messages if isinstance(conversation, Conversation) else conversation
    if fmt == "messages":
        return {"messages": [dict(m) for m in messages]}
    if fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    if fmt == "chatml":
        return {"text": "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)}
    if fmt == "alpaca":
        system = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        if len(rest) != 2:
            raise ValueError(f"alpaca holds one user/assistant exchange; this conversation has {len(rest) // 2}")
        out = {"instruction": rest[0]["content"], "input": "", "output": rest[1]["content"]}
        if system:
            out["system"] = system[0]["content"]
        return out
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


# ------------------------------------------------------------------------------------------- reading
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


def read_conversations(path: str | Path, fmt: str = "auto") -> list[Conversation]:
    """Strict reader for training: every record must parse; the first bad one raises RecordError."""
    conversations = []
    for line, item in iter_json_records(path):
        if isinstance(item, RecordError):
            raise item
        conversations.append(parse_record(item, fmt, str(path), line))
    if not conversations:
        raise RecordError(str(path), None, None, "no records")
    return conversations


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, no insignificant whitespace, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def snapshot_hash(conversations: list[Conversation] | list[list[dict[str, str]]]) -> str:
    """sha256 over the canonical records (stable under key order and whitespace of the source files)."""
    import hashlib

    digest = hashlib.sha256()
    for conversation in conversations:
        messages = conversation.messages if isinstance(conversation, Conversation) else conversation
        digest.update(canonical_json(messages).encode("utf-8"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()
