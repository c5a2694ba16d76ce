"""Token lengths: count with the run's tokenizer (chat template applied) or, without one, a labelled estimate.

Without a tokenizer the count is whitespace-separated words — an *estimate*, usually 1.3–2x below real subword
token counts — and every report says so. A byte-level tokenizer would be exact for itself but meaningless for the
model a user trains, so it is never the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tunesmith.data.formats import Conversation
from tunesmith.data.toolcalls import message_text

WORD_ESTIMATE = "whitespace words (estimate; pass --tokenizer MODEL for exact token counts)"


def _conversation(item: Conversation | list[dict[str, Any]]) -> Conversation:
    return item if isinstance(item, Conversation) else Conversation(item)


def length_function(tokenizer: Any | None = None) -> tuple[Callable[[Sequence[Any]], list[int]], str]:
    """(lengths of a batch of conversations or message lists, unit label). Tool calls count as text; with a
    tokenizer, tools are rendered as training renders them (the template's tool support or the Hermes fallback)."""
    if tokenizer is None:
        return (lambda batch: [sum(len(message_text(m).split()) for m in _conversation(c).messages)
                               for c in batch]), WORD_ESTIMATE

    def count(batch: Sequence[Any]) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            from tunesmith.data.render import render_text, template_input

            texts = []
            for item in batch:
                messages, tools, _ = template_input(tokenizer, _conversation(item))
                texts.append(render_text(tokenizer, messages, add_generation_prompt=False, tools=tools))
        else:
            texts = ["\n".join(message_text(m) for m in _conversation(c).messages) for c in batch]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return count, f"tokens ({name}, chat template applied)"


def token_lengths(conversations: Sequence[Any], tokenizer: Any | None = None,
                  batch_size: int = 256) -> tuple[list[int], str]:
    count, unit = length_function(tokenizer)
    lengths: list[int] = []
    for start in range(0, len(conversations), batch_size):
        lengths += count(conversations[start:start + batch_size])
    return lengths, unit


def trim_limit(lengths: list[int], percentile: float | None, max_tokens: int | None) -> float | None:
    """Longest length kept: min(the `percentile`-th percentile (linear interpolation), max_tokens); None = no trim."""
    limits = []
    if percentile is not None and lengths and percentile < 100:
        limits.append(float(np.percentile(lengths, percentile)))
    if max_tokens is not None:
        limits.append(float(max_tokens))
    return min(limits) if limits else None


def length_summary(lengths: list[int], seq_len: int | None = None, bins: int = 30) -> dict[str, Any]:
    """min/mean/percentiles/max, a histogram (edges, counts), and how many exceed the training sequence length."""
    if not lengths:
        return {"count": 0}
    values = np.asarray(lengths)
    counts, edges = np.histogram(values, bins=min(bins, max(1, len(set(lengths)))))
    summary = {
        "count": len(lengths), "min": int(values.min()), "mean": round(float(values.mean()), 2),
        "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)), "max": int(values.max()),
        "histogram": {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist()},
    }
    if seq_len is not None:
        summary["seq_len"] = seq_len
        summary["over_seq_len"] = int((values > seq_len).sum())
    return summary
