"""Record formats: Alpaca, ShareGPT, OpenAI messages and ChatML text, all parsed into one canonical form.

Canonical form: a `Conversation` — a list of turns `{"role": "system"|"user"|"assistant"|"tool", "content": str}`
with optional system turns first, then a user turn, then assistant turns answering users or tool results, ending
with an assistant turn — plus its tool definitions and where it came from (file, line). Assistant turns may carry
tool calls and any turn a 0/1 weight (see `toolcalls` for those parts). Both tool-calling dialects parse into it:
ShareGPT (`function_call` / `observation` turns, a `tools` JSON string, as LLaMA-Factory and Axolotl read it) and
OpenAI messages (`assistant.tool_calls`, `role: tool` with `tool_call_id`, a top-level `tools` list); `to_format`
writes it back in either, so a conversion between them is lossless. Parsing validates: a bad record raises
`RecordError` naming file, line and field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data import toolcalls
from tunesmith.data.columns import apply_columns, check_columns, parse_columns
from tunesmith.data.containers import iter_file_records, iter_json_records
from tunesmith.data.errors import RecordError

__all__ = ["FORMATS", "ROLES", "Conversation", "RecordError", "canonical_json", "detect_format", "iter_json_records",
           "parse_record", "read_conversations", "snapshot_hash", "to_format"]

FORMATS = ("alpaca", "sharegpt", "messages", "chatml")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "function_call": "function_call",
    "observation": "tool", "tool": "tool",
}
_TOOL_KEYS = ("tool_call_id", "name")  # optional keys of a tool result kept as given


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str = ""
    line: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None

    def text(self) -> str:
        return "\n".join(toolcalls.message_text(m) for m in self.messages)

    def canonical(self) -> dict[str, Any]:
        """What identifies the conversation (hashes, splits, round-trip tests): turns, plus tools when present."""
        return {"messages": self.messages, **({"tools": self.tools} if self.tools else {})}


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


def _check_order(messages: list[dict[str, Any]], where: tuple[str, int | None], field_name: str) -> None:
    """System turns first, then a user turn; an assistant answers a user or tool results; tool results follow an
    assistant tool call; a user follows an assistant answer; the conversation ends with an assistant turn."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    rest = messages[i:]
    if not rest:
        raise RecordError(*where, field_name, "no user or assistant turns")
    previous: dict[str, Any] | None = None
    for j, message in enumerate(rest):
        if previous is None:
            expected = ("user",)
        elif previous["role"] == "assistant":
            expected = ("tool",) if previous.get("tool_calls") else ("user",)
        elif previous["role"] == "tool":
            expected = ("tool", "assistant")
        else:
            expected = ("assistant",)
        if message["role"] not in expected:
            raise RecordError(*where, f"{field_name}[{i + j}].role",
                              f"turns out of order: expected {' or '.join(expected)}, got {message['role']}")
        previous = message
    if rest[-1]["role"] != "assistant":
        raise RecordError(*where, field_name, "conversation does not end with an assistant turn")
    for k, message in enumerate(messages):
        if message.get("weight") == 1 and message["role"] != "assistant":
            raise RecordError(*where, f"{field_name}[{k}].weight", f"weight 1 on a {message['role']} turn: only "
                              "assistant turns (tool calls included) are trained; tool results never are")


def parse_alpaca(record: dict, where: tuple[str, int | None]) -> list[dict[str, Any]]:
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


def _turn_list(turns: Any, where, field_name: str) -> list[dict]:
    if not isinstance(turns, list):
        raise RecordError(*where, field_name, f"expected a list of turns, got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(*where, f"{field_name}[{i}]", f"expected an object, got {type(turn).__name__}")
    return turns


def _weighted(message: dict[str, Any], turn: dict, where, path: str) -> dict[str, Any]:
    weight = toolcalls.parse_weight(turn, where, path)
    return message if weight is None else {**message, "weight": weight}


def parse_sharegpt(record: dict, where) -> list[dict[str, Any]]:
    """ShareGPT turns `{"from", "value"}`; `function_call` turns become assistant tool calls (merged into the `gpt`
    turn just before, if any: that is how an assistant text with calls is written), `observation` turns tool
    results; a top-level `system` string becomes the first turn."""
    if "conversations" not in record:
        raise RecordError(*where, "conversations", "missing")
    messages: list[dict[str, Any]] = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(_turn_list(record["conversations"], where, "conversations")):
        path = f"conversations[{i}]"
        role_raw = _require_str(turn, "from", where, f"{path}.from")
        role = SHAREGPT_ROLES.get(role_raw.lower())
        if role is None:
            raise RecordError(*where, f"{path}.from", f"unknown role {role_raw!r}")
        if "value" not in turn:
            raise RecordError(*where, f"{path}.value", "missing")
        if role == "function_call":
            calls = toolcalls.parse_sharegpt_calls(turn["value"], where, f"{path}.value")
            message = _weighted({"role": "assistant", "content": "", "tool_calls": calls}, turn, where, path)
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and not last.get("tool_calls") \
                    and last.get("weight") == message.get("weight"):
                last["tool_calls"] = calls
                continue
            messages.append(message)
            continue
        message = {"role": role, "content": toolcalls.parse_content(turn["value"], where, f"{path}.value")}
        if role == "tool":
            message.update({k: turn[k] for k in _TOOL_KEYS if isinstance(turn.get(k), str)})
        messages.append(_weighted(message, turn, where, path))
    return messages


def parse_messages(record: dict, where) -> list[dict[str, Any]]:
    """OpenAI chat messages, with `tool_calls` on assistant turns and `role: tool` results."""
    if "messages" not in record:
        raise RecordError(*where, "messages", "missing")
    messages = []
    for i, turn in enumerate(_turn_list(record["messages"], where, "messages")):
        path = f"messages[{i}]"
        role = _require_str(turn, "role", where, f"{path}.role")
        if role not in ROLES:
            raise RecordError(*where, f"{path}.role", f"unknown role {role!r}")
        calls = turn.get("tool_calls") or None  # exports often write [] or null on turns without calls
        if calls is not None and role != "assistant":
            raise RecordError(*where, f"{path}.tool_calls", f"only assistant turns call tools, not {role}")
        if "content" not in turn and not calls:
            raise RecordError(*where, f"{path}.content", "missing")
        message: dict[str, Any] = {"role": role, "content": toolcalls.parse_content(
            turn.get("content"), where, f"{path}.content", allow_empty=bool(calls))}
        if calls is not None:
            message["tool_calls"] = toolcalls.parse_openai_calls(calls, where, f"{path}.tool_calls")
        if role == "tool":
            message.update({k: turn[k] for k in _TOOL_KEYS if isinstance(turn.get(k), str)})
        messages.append(_weighted(message, turn, where, path))
    return messages


_CHATML_TURN = re.compile(r"<\|im_start\|>([^\n]*)\n(.*?)<\|im_end\|>", re.S)


def parse_chatml(record: dict, where) -> list[dict[str, Any]]:
    text = _require_str(record, "text", where)
    turns = [{"role": role.strip(), "content": content} for role, content in _CHATML_TURN.findall(text)]
    if not turns:
        raise RecordError(*where, "text", "no <|im_start|>role ... <|im_end|> turns found")
    leftover = _CHATML_TURN.sub("", text).strip()
    if leftover:
        raise RecordError(*where, "text", f"text outside turns: {leftover[:40]!r}")
    for i, turn in enumerate(turns):
        if turn["role"] not in ("system", "user", "assistant"):
            raise RecordError(*where, f"text[turn {i}].role", f"unknown role {turn['role']!r}")
        if not turn["content"].strip():
            raise RecordError(*where, f"text[turn {i}].content", "empty")
    return turns


PARSERS = {"alpaca": parse_alpaca, "sharegpt": parse_sharegpt, "messages": parse_messages, "chatml": parse_chatml}
_FIELD = {"alpaca": None, "sharegpt": "conversations", "messages": "messages", "chatml": "text"}


def parse_record(record: Any, fmt: str, file: str, line: int | None) -> Conversation:
    where = (file, line)
    if not isinstance(record, dict):
        raise RecordError(file, line, None, f"expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record) or ""
        if not fmt:
            raise RecordError(file, line, None,
                              f"unknown format: keys {sorted(record)[:6]} match none of {', '.join(FORMATS)}")
    messages = PARSERS[fmt](record, where)
    if _FIELD[fmt]:
        _check_order(messages, where, _FIELD[fmt])
        toolcalls.check_call_ids(messages, where, _FIELD[fmt])
    tools = toolcalls.parse_tools(record.get("tools"), where) if fmt in ("sharegpt", "messages") else None
    return Conversation(messages, source=file, line=line, tools=tools)


# ----------------------------------------------------------------------------------------- rendering
def _sharegpt_turns(message: dict[str, Any]) -> list[dict[str, Any]]:
    weight = {"weight": message["weight"]} if "weight" in message else {}
    role = message["role"]
    if role == "tool":
        return [{"from": "observation", "value": message["content"],
                 **{k: message[k] for k in _TOOL_KEYS if k in message}, **weight}]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": names[role], "value": message["content"], **weight}] if message["content"] or \
        not message.get("tool_calls") else []
    if message.get("tool_calls"):
        turns.append({"from": "function_call", "value": toolcalls.sharegpt_call_value(message["tool_calls"]),
                      **weight})
    return turns


def to_format(conversation: Conversation | list[dict[str, Any]], fmt: str) -> dict[str, Any]:
    """Write a conversation in a given format (the inverse of parse_record)."""
    if isinstance(conversation, Conversation):
        messages, tools = conversation.messages, conversation.tools
    else:
        messages, tools = conversation, None
    if fmt == "messages":
        return {"messages": [dict(m) for m in messages], **({"tools": tools} if tools else {})}
    if fmt == "sharegpt":
        turns = [turn for m in messages for turn in _sharegpt_turns(m)]
        return {"conversations": turns, **({"tools": toolcalls.sharegpt_tools_value(tools)} if tools else {})}
    extras = sorted({k for m in messages for k in m if k not in ("role", "content")} | ({"tools"} if tools else set()))
    if fmt in ("chatml", "alpaca") and extras:
        raise ValueError(f"{fmt} holds no {', '.join(extras)}; convert to messages or sharegpt instead")
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
def read_conversations(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None) -> list[Conversation]:
    """Strict reader for training: every record must parse; the first bad one raises RecordError. Any container
    or `datasets` source (see `containers`); `columns` maps non-standard field names (see `columns`)."""
    columns = parse_columns(columns, "data.columns")
    items = list(iter_file_records(path))
    check_columns(str(path), (item for _, _, item in items), columns)
    conversations = []
    for source, line, item in items:
        if isinstance(item, RecordError):
            raise item
        conversations.append(parse_record(apply_columns(item, columns, source, line), fmt, source, line))
    if not conversations:
        raise RecordError(str(path), None, None, "no records")
    return conversations


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, no insignificant whitespace, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def conversation_key(conversation: Conversation | list[dict[str, Any]]) -> str:
    """Canonical text of a conversation: its turns (as before tools existed, so plain data keeps its hashes and
    splits), plus its tool definitions when it has any."""
    if not isinstance(conversation, Conversation):
        return canonical_json(conversation)
    return canonical_json(conversation.canonical() if conversation.tools else conversation.messages)


def snapshot_hash(conversations: list[Conversation] | list[list[dict[str, Any]]]) -> str:
    """sha256 over the canonical records (stable under key order and whitespace of the source files)."""
    import hashlib

    digest = hashlib.sha256()
    for conversation in conversations:
        digest.update(conversation_key(conversation).encode("utf-8"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()
