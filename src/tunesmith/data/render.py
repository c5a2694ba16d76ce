"""Render conversations with the tokenizer's chat template and mask the loss to assistant tokens.

Semantics: for a conversation m_0..m_{n-1}, the model input is `apply_chat_template(m)` tokenized; the label of a
token is the token itself when it lies inside an assistant turn's content **or its end-of-turn marker** (e.g.
`<|im_end|>`), else -100. Masking the end-of-turn token by mistake (a known field bug) teaches the model never
to stop, and the training loss does not show it.

How the assistant spans are found, for any template: the text of assistant turn i spans from the end of
`render(m[:i], add_generation_prompt=True)` to the end of `render(m[:i+1])`; both must be prefixes of the full
rendering (checked). TRL's `assistant_only_loss` needs `{% generation %}` tags that most templates lack, so this
prefix method is written by hand. Each text segment is tokenized on its own and the pieces concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from tunesmith.data.formats import Conversation, RecordError

IGNORE_INDEX = -100


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

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "dropped_sources"} | {
            "dropped_examples": self.dropped_sources[:50]
        }


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans [start, end) of each assistant turn (content + end-of-turn)."""
    messages = conversation.messages
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
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
    for conversation in conversations:
        stats.examples_in += 1
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
    return examples, stats
