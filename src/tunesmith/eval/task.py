"""Task evaluation: generate a reply for each held-out conversation and score it against the reference.

For a conversation [system?, user, assistant, ..., user, assistant]:
    prompt    = every turn before the last assistant turn (rendered with the generation prompt)
    reference = the last assistant turn's content
    source    = the last user turn's content (what the reply must be grounded in, for hallucination_rate)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.formats import Conversation, read_conversations
from tunesmith.errors import UsageError
from tunesmith.eval.generate import generate_batch
from tunesmith.eval.metrics import check_metric_names, score


def split_conversation(conversation: Conversation) -> tuple[list[dict[str, str]], str, str]:
    """(prompt turns, reference, source) of one conversation; raises ValueError naming it if it has no reply."""
    messages = conversation.messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    where = f"{conversation.source}:{conversation.line}" if conversation.source else "conversation"
    if last is None:
        raise UsageError(f"{where}: no assistant turn to use as the reference")
    prompt = [dict(m) for m in messages[:last]]
    users = [m["content"] for m in prompt if m["role"] == "user"]
    if not users:
        raise UsageError(f"{where}: no user turn before the last assistant turn")
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
        raise UsageError(f"max_examples must be >= 1, got {max_examples}")
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


def configured_splits(config) -> dict[str, list[str]]:
    """The evaluation splits a run config names: {"test": data.test} (when given) plus eval.splits."""
    splits = {"test": list(config.data.test)} if config.data.test else {}
    splits.update({name: list(paths) for name, paths in config.eval.splits.items()})
    return splits


def read_split(paths: list[str], fmt: str, system_prompt: str | None) -> list[Conversation]:
    """Every conversation of one split's files, with the run's system prompt added as in training."""
    from tunesmith.data.system_prompt import add_system_prompt

    conversations = []
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: evaluation data file not found (--data)")
        conversations.extend(read_conversations(path, fmt))
    return add_system_prompt(conversations, system_prompt)


def data_record_of(paths: list[str], conversations: list[Conversation], max_examples: int | None) -> dict[str, Any]:
    """What eval.json records of one split's data: resolved files, snapshot hash of the evaluated records, counts."""
    from tunesmith.data.formats import snapshot_hash

    n = min(len(conversations), max_examples or len(conversations))
    return {"files": [str(Path(p).resolve()) for p in paths], "hash": snapshot_hash(conversations[:n]),
            "n_total": len(conversations), "n_evaluated": n,
            "subset": "all" if n == len(conversations) else f"first {n} of {len(conversations)} (file order)"}


@dataclass(frozen=True)
class GenerationSettings:
    """How the task evaluation generates: greedy, `max_new_tokens` per reply, `batch_size` prompts at a time."""

    max_new_tokens: int = 128
    batch_size: int = 16
    max_examples: int | None = None  # the first N examples of each split, in file order
    decoding: str = "greedy"

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "max_examples": self.max_examples, "decoding": self.decoding}


def evaluate_splits(model, tokenizer, splits: dict[str, tuple[list[str], list[Conversation]]], metrics: list[str],
                    settings: GenerationSettings, label: str, log=print,
                    metric_options: dict[str, Any] | None = None, cache: bool | None = None) -> dict[str, dict[str, Any]]:
    """The one per-split evaluation loop (training's test evaluation and `tunesmith eval` share it).

    splits: {name: (files, conversations)}. Returns {name: evaluate_task result + "seconds" + "files"}.
    `cache` (default: for label "base") serves a repeated evaluation of the same weights, prompts and settings
    from disk (eval/cache.py); progress is logged after every generation batch.
    """
    from functools import partial

    from tunesmith.eval.cache import evaluate_task_cached, progress_printer

    evaluate = partial(evaluate_task_cached, log=log) if (label == "base" if cache is None else cache) else evaluate_task
    results = {}
    for split, (paths, conversations) in splits.items():
        started = time.perf_counter()
        n = min(len(conversations), settings.max_examples or len(conversations))
        log(f"evaluating the {label} model on {split} ({n} of {len(conversations)} examples)")
        model.eval()
        result = evaluate(model, tokenizer, conversations, metrics, max_new_tokens=settings.max_new_tokens,
                          batch_size=settings.batch_size, max_examples=settings.max_examples,
                          progress=progress_printer(log, f"{label} {split}", started), **(metric_options or {}))
        result["seconds"] = round(time.perf_counter() - started, 2)
        result["files"] = list(paths)
        results[split] = result
    return results
