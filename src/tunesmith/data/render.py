"""Render conversations with the tokenizer's chat template and mask the loss to assistant tokens.

Semantics: for a conversation m_0..m_{n-1}, the model input is `apply_chat_template(m)` tokenized; the label of a
token is the token itself when it lies inside an assistant turn's content **or its end-of-turn marker** (e.g.
`<|im_end|>`), else -100. Masking the end-of-turn token by mistake (a known field bug) teaches the model never
to stop, and the training loss does not show it.

How the assistant spans are found, for any template: the text of assistant turn i spans from the end of
`render(m[:i], add_generation_prompt=True)` to the end of `render(m[:i+1])`; both must be prefixes of the full
rendering (checked). TRL's `assistant_only_loss` needs `{% generation %}` tags that most templates lack, so this
prefix method is written by hand. Each text segment is tokenized on its own and the pieces concatenated.

Tool calling: an assistant turn that calls tools is an assistant turn like any other (its calls and end-of-turn
are labelled); tool results never are. The tool definitions go to `apply_chat_template(..., tools=...)` when the
template reads `tools` and `tool_calls`; otherwise the conversation is rewritten in Hermes text form
(`toolcalls.hermes_fallback`) and a notice with the count is logged once per `render_dataset` call. A turn with
weight 0 is not labelled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunesmith.data import toolcalls
from tunesmith.data.formats import Conversation, RecordError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str = ""
    line: int | None = None
    truncated_tokens: int = 0  # tokens cut by truncation (0 when it fit)

    @property
    def target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class RenderStats:
    examples_in: int = 0
    examples_out: int = 0
    truncated: int = 0  # examples cut to max_seq_len
    truncated_tokens: int = 0
    dropped_too_long: int = 0  # removed because truncation was "drop" or nothing trainable was left
    dropped_sources: list[str] = field(default_factory=list)
    total_tokens: int = 0
    target_tokens: int = 0
    tool_fallback: int = 0  # conversations with tools rendered in Hermes text form (the template has no tool support)
    notices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "dropped_sources"} | {
            "dropped_examples": self.dropped_sources[:50]
        }


def template_supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template reads the `tools` variable and renders `tool_calls` (parsed with jinja2's own
    analysis of undeclared variables, not a substring guess for `tools`)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    import jinja2
    from jinja2 import meta

    try:
        variables = meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in variables and "tool_calls" in template


def uses_tools(conversation: Conversation) -> bool:
    return bool(conversation.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in conversation.messages)


def template_input(tokenizer: PreTrainedTokenizerBase, conversation: Conversation,
                   ) -> tuple[list[dict[str, Any]], list[dict] | None, bool]:
    """(messages, tools, fell back): what goes to apply_chat_template for this conversation."""
    if not uses_tools(conversation):
        return conversation.messages, None, False
    if template_supports_tools(tokenizer):
        return conversation.messages, conversation.tools, False
    return toolcalls.hermes_fallback(conversation.messages, conversation.tools), None, True


def render_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool,
            tools: list[dict] | None = None) -> str:
    if not messages:
        return ""
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(toolcalls.template_messages(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **extra)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans [start, end) of each trained assistant turn (content, tool calls
    and end-of-turn; a turn with weight 0 is skipped)."""
    messages, tools, _ = template_input(tokenizer, conversation)
    full = render_text(tokenizer, messages, add_generation_prompt=False, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight") == 0:
            continue
        prompt = render_text(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = render_text(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not (full.startswith(prompt) and full.startswith(upto) and upto.startswith(prompt)):
            raise RecordError(conversation.source, conversation.line, f"messages[{i}]",
                              "the chat template does not render this conversation incrementally; "
                              "assistant tokens cannot be located for loss masking")
        spans.append((len(prompt), len(upto)))
    return full, spans


def render_example(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> Example:
    """Tokenize one conversation with assistant-only labels (no truncation here)."""
    full, spans = assistant_spans(tokenizer, conversation)
    cuts = sorted({0, len(full), *[c for span in spans for c in span]})
    in_span = {start for start, _ in spans}
    input_ids: list[int] = []
    labels: list[int] = []
    for start, end in zip(cuts, cuts[1:], strict=False):
        ids = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if start in in_span else [IGNORE_INDEX] * len(ids))
    return Example(input_ids, labels, conversation.source, conversation.line)


def render_dataset(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    max_seq_len: int,
    truncation: str = "truncate",
    stats: RenderStats | None = None,
) -> tuple[list[Example], RenderStats]:
    """Render and apply the length policy. Every example is accounted for in the returned stats.

    truncation: "truncate" cuts to max_seq_len (an example left with no target token is dropped and counted);
    "drop" removes over-long examples (counted); "error" raises naming the file and line.
    """
    stats = stats or RenderStats()
    examples = []
    fallback_before = stats.tool_fallback
    for conversation in conversations:
        stats.examples_in += 1
        if uses_tools(conversation) and not template_supports_tools(tokenizer):
            stats.tool_fallback += 1
        example = render_example(tokenizer, conversation)
        overflow = len(example.input_ids) - max_seq_len
        where = f"{conversation.source}:{conversation.line}"
        if overflow > 0:
            if truncation == "error":
                raise RecordError(conversation.source, conversation.line, None,
                                  f"{len(example.input_ids)} tokens exceed data.max_seq_len={max_seq_len} "
                                  "(raise it, or set data.truncation to truncate or drop)")
            if truncation == "drop":
                stats.dropped_too_long += 1
                stats.dropped_sources.append(where)
                continue
            example.input_ids = example.input_ids[:max_seq_len]
            example.labels = example.labels[:max_seq_len]
            example.truncated_tokens = overflow
            stats.truncated += 1
            stats.truncated_tokens += overflow
        if example.target_tokens == 0:
            stats.dropped_too_long += 1
            stats.dropped_sources.append(where)
            continue
        stats.examples_out += 1
        stats.total_tokens += len(example.input_ids)
        stats.target_tokens += example.target_tokens
        examples.append(example)
    if stats.tool_fallback > fallback_before:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        notice = (f"{stats.tool_fallback - fallback_before} conversation(s) use tools, but the chat template of "
                  f"{name} has no tool support (no `tools`/`tool_calls`); tunesmith rendered them in Hermes text form: "
                  "tool definitions in the system turn inside <tools></tools>, calls as <tool_call>{json}</tool_call> "
                  "in the assistant turn (trained), results as <tool_response> user turns (not trained)")
        stats.notices.append(notice)
        log.warning(notice)
    return examples, stats
