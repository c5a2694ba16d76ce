"""The parts of a chat record beyond plain text: tool definitions, tool calls, content parts, per-message weights.

Canonical form (what `formats` parses every dialect into, and what `render` hands to a chat template):
- `tools`: a list of `{"type": "function", "function": {"name", "description"?, "parameters"?}}` (the OpenAI
  shape; a bare `{"name", ...}` as LLaMA-Factory's ShareGPT writes it is wrapped), or None.
- an assistant turn may carry `tool_calls`: `[{"type": "function", "function": {"name": str, "arguments": obj|str},
  "id"?: str}]` (arguments keep the form the data gave — an object, or the JSON string OpenAI writes — so a
  conversion writes back exactly what it read); its `content` may then be "".
- a `tool` turn holds one result: `content`, and `tool_call_id` / `name` where the data gives them.
- `weight`: 0 or 1 on a turn where the data gives `weight` (Axolotl's ShareGPT) or `loss_weight`. The loss mask is
  0/1 per token, so fractional weights are refused rather than rounded.
Content given as parts (`[{"type": "text", "text"|"value": ...}]`) is joined with "\\n" (as vLLM joins text
parts); a non-text part is an error naming its type, since every method here is text-only.
"""

from __future__ import annotations

import json
from typing import Any

from tunesmith.data.errors import RecordError

Where = tuple[str, int | None]


def parse_content(value: Any, where: Where, path: str, allow_empty: bool = False) -> str:
    """A turn's content: a string, or a list of text parts joined with newlines."""
    if value is None and allow_empty:
        return ""
    if isinstance(value, list):
        texts = []
        for k, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise RecordError(*where, f"{path}[{k}]", f"expected a content part object, got {type(part).__name__}")
            kind = part.get("type", "text")
            if kind != "text":
                raise RecordError(*where, f"{path}[{k}].type", f"content part of type {kind!r}: tunesmith trains "
                                  "text-only models; remove the part or the record")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise RecordError(*where, f"{path}[{k}]", "text part without a string 'text' or 'value'")
            texts.append(text)
        value = "\n".join(texts)
    if not isinstance(value, str):
        raise RecordError(*where, path, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(*where, path, "empty")
    return value


def parse_weight(turn: dict, where: Where, path: str) -> int | None:
    """`weight` or `loss_weight` of a turn as 0/1, None when absent."""
    keys = [k for k in ("weight", "loss_weight") if k in turn and turn[k] is not None]
    if not keys:
        return None
    value = turn[keys[0]]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    raise RecordError(*where, f"{path}.{keys[0]}", f"weight not 0 or 1: got {value!r} (the loss mask is 0/1 per "
                      "token; fractional weights are not supported)")


def _json_value(value: Any, where: Where, path: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(*where, path, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    return value


def parse_tools(value: Any, where: Where, path: str = "tools") -> list[dict] | None:
    """Tool definitions given as a list or a JSON string of one (LLaMA-Factory); empty = None."""
    if value is None or value == "":
        return None
    value = _json_value(value, where, path)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(*where, path, f"expected a list of tool definitions, got {type(value).__name__}")
    tools = []
    for k, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise RecordError(*where, f"{path}[{k}]", f"expected an object, got {type(tool).__name__}")
        function = tool.get("function") if tool.get("type") == "function" else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(*where, f"{path}[{k}]", "a tool definition needs a 'name' (or type 'function' with "
                              "function.name)")
        tools.append({"type": "function", "function": function})
    return tools or None


def _call(raw: Any, where: Where, path: str, nested: bool) -> dict:
    """One call: OpenAI `{"id", "type", "function": {"name", "arguments"}}` (nested) or `{"name", "arguments"}`."""
    if not isinstance(raw, dict):
        raise RecordError(*where, path, f"expected a tool call object, got {type(raw).__name__}")
    function = raw.get("function") if nested else raw
    if not isinstance(function, dict):
        raise RecordError(*where, f"{path}.function", "missing")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RecordError(*where, f"{path}{'.function' if nested else ''}.name", "missing")
    arguments = function.get("arguments", {})
    decoded = _json_value(arguments, where, f"{path}{'.function' if nested else ''}.arguments")
    if not isinstance(decoded, dict):
        raise RecordError(*where, f"{path}.arguments", f"expected an object, got {type(decoded).__name__}")
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if raw.get("id") is not None:
        call["id"] = str(raw["id"])
    return call


def parse_openai_calls(value: Any, where: Where, path: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RecordError(*where, path, "expected a non-empty list of tool calls")
    return [_call(raw, where, f"{path}[{k}]", nested=True) for k, raw in enumerate(value)]


def parse_sharegpt_calls(value: Any, where: Where, path: str) -> list[dict]:
    """A ShareGPT `function_call` value: a JSON string (or object) of one call or a list of parallel calls."""
    decoded = _json_value(value, where, path)
    calls = decoded if isinstance(decoded, list) else [decoded]
    if not calls:
        raise RecordError(*where, path, "empty list of calls")
    return [_call(raw, where, path, nested=False) for raw in calls]


def sharegpt_call_value(calls: list[dict]) -> str:
    """The inverse of parse_sharegpt_calls: a JSON string of one call, or of a list for parallel calls."""
    flat = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"],
             **({"id": c["id"]} if "id" in c else {})} for c in calls]
    return json.dumps(flat[0] if len(flat) == 1 else flat, ensure_ascii=False)


def sharegpt_tools_value(tools: list[dict]) -> str:
    """Tools as LLaMA-Factory writes them: a JSON string of the bare function definitions."""
    return json.dumps([t["function"] for t in tools], ensure_ascii=False)


def check_call_ids(messages: list[dict], where: Where, field_name: str) -> None:
    """A tool result's `tool_call_id` must name a call of the assistant turn it answers."""
    ids: set[str] = set()
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            ids = {c["id"] for c in message.get("tool_calls", []) if "id" in c}
        elif message["role"] == "tool" and "tool_call_id" in message and ids and message["tool_call_id"] not in ids:
            raise RecordError(*where, f"{field_name}[{i}].tool_call_id", f"{message['tool_call_id']!r} matches no "
                              f"call of the assistant turn before it (ids {sorted(ids)})")


# ------------------------------------------------------------------------------------------ for templates
def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers chat templates expect them: arguments as objects, no tunesmith-only keys."""
    out = []
    for message in messages:
        m = {k: v for k, v in message.items() if k != "weight"}
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _decoded(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def _decoded(arguments: Any) -> Any:
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def call_text(call: dict) -> str:
    """One call as the JSON a Hermes-style template writes inside <tool_call> tags."""
    return json.dumps({"name": call["function"]["name"], "arguments": _decoded(call["function"]["arguments"])},
                      ensure_ascii=False)


def hermes_fallback(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """For a chat template with no tool support: the same conversation in plain system/user/assistant turns, written
    the way Hermes/Qwen2.5 templates write tools (so the text is one a model family was actually trained on):
    - the tool definitions go into the system turn (one added if there is none) inside <tools></tools>;
    - an assistant tool call becomes `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` after its text;
    - tool results become one user turn of `<tool_response>\\n...\\n</tool_response>` blocks.
    Weights stay on their turns, so the loss still covers exactly the assistant turns (tool calls included)."""
    out: list[dict] = []
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        preamble = ("You may call one or more functions to assist with the user query.\n\nYou are provided with "
                    f"function signatures within <tools></tools> XML tags:\n<tools>\n{listing}\n</tools>\n\nFor each "
                    "function call, return a json object with function name and arguments within <tool_call>"
                    "</tool_call> XML tags.")
        if messages and messages[0]["role"] == "system":
            out.append({**messages[0], "content": f"{messages[0]['content']}\n\n{preamble}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": preamble})
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("_tool_block"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_block": True})
            continue
        m = {k: v for k, v in message.items() if k != "tool_calls"}
        if message.get("tool_calls"):
            calls = "\n".join(f"<tool_call>\n{call_text(c)}\n</tool_call>" for c in message["tool_calls"])
            m["content"] = f"{message['content']}\n{calls}" if message["content"] else calls
        out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool_block"} for m in out]


def message_text(message: dict) -> str:
    """All text of a turn (content and tool calls), for dedup, lengths and screening."""
    calls = [call_text(c) for c in message.get("tool_calls", [])]
    return "\n".join([message["content"], *calls]) if calls else message["content"]
