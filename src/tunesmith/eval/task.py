"""Task evaluation: generate a reply for each held-out conversation and score it against the reference.

For a conversation [system?, user, assistant, ..., user, assistant]:
    prompt    = every turn before the last assistant turn (rendered with the generation prompt)
    reference = the last assistant turn's content
    source    = the last user turn's content (what the reply must be grounded in, for hallucination_rate)
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.formats import Conversation
from tunesmith.eval.generate import generate_batch
from tunesmith.eval.metrics import check_metric_names, score


def split_conversation(conversation: Conversation) -> tuple[list[dict[str, str]], str, str]:
    """(prompt turns, reference, source) of one conversation; raises ValueError naming it if it has no reply."""
    messages = conversation.messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    where = f"{conversation.source}:{conversation.line}" if conversation.source else "conversation"
    if last is None:
        raise ValueError(f"{where}: no assistant turn to use as the reference")
    prompt = [dict(m) for m in messages[:last]]
    users = [m["content"] for m in prompt if m["role"] == "user"]
    if not users:
        raise ValueError(f"{where}: no user turn before the last assistant turn")
    return prompt, messages[last]["content"], users[-1]


def evaluate_task(
    model,
    tokenizer,
    conversations: list[Conversation],
    metrics: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_examples: int | None = None,
    progress=None,
    **metric_options: Any,
) -> dict[str, Any]:
    """Generate (greedy, batched) and score. `max_examples` keeps the first N conversations, in file order.

    Returns {"n", "total", "metrics", "scored", "skipped", "examples": [{"index", "source_file", "line", "prompt",
    "reference", "prediction", "scores"}]}; n examples were evaluated out of `total` given.
    """
    check_metric_names(metrics)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    chosen = conversations[:max_examples] if max_examples is not None else list(conversations)
    split = [split_conversation(c) for c in chosen]
    prompts = [p for p, _, _ in split]
    references = [r for _, r, _ in split]
    sources = [s for _, _, s in split]
    predictions = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 progress=progress)
    scored = score(predictions, references, sources, metrics, **metric_options)
    examples = [
        {
            "index": i,
            "source_file": conversation.source,
            "line": conversation.line,
            "prompt": prompt,
            "reference": reference,
            "prediction": prediction,
            "scores": row,
        }
        for i, (conversation, prompt, reference, prediction, row) in enumerate(
            zip(chosen, prompts, references, predictions, scored["per_example"], strict=True)
        )
    ]
    return {
        "n": len(chosen),
        "total": len(conversations),
        "metrics": scored["metrics"],
        "scored": scored["scored"],
        "skipped": scored["skipped"],
        "examples": examples,
    }
