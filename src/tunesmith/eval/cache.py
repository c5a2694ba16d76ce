"""A cache of task evaluations, keyed by what decides their outcome: the model's weights, the prompts, the settings.

Users evaluate the same base model on the same test set again and again (every `tunesmith train` with
`eval.compare_base`, every demo run); its greedy generations cannot change unless one of these does:
  model     sha256 over the model's class, config and every parameter and buffer as loaded (so a 4-bit QLoRA base
            and an fp32 one differ, and so does a re-converted checkpoint with one changed weight);
  data      sha256 over the rendered prompt token ids (tokenizer and chat template included), the references and
            the sources of the evaluated examples, in order (so max_examples and the system prompt are included);
  settings  max_new_tokens, greedy decoding, the stop token ids, the metrics and their options, and the versions
            of tunesmith, torch and transformers (a new kernel may change a greedy tie).
The batch size is not part of the key: batched greedy generation equals one-by-one generation token for token
(eval/generate.py's contract, tested there).

Entries are JSON files under $TUNESMITH_CACHE/evals (default ~/.cache/tunesmith/evals), written atomically; a
corrupt entry is ignored and recomputed. TUNESMITH_EVAL_CACHE=0 turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


def cache_dir() -> Path:
    from tunesmith.models.reference import cache_root

    return cache_root() / "evals"


def enabled() -> bool:
    return os.environ.get("TUNESMITH_EVAL_CACHE", "1").lower() not in ("0", "false", "no", "off")


def model_hash(model) -> str:
    """sha256 of the model's class, config and every named parameter and buffer (name, dtype, shape, bytes).

    Hashing ~540 MB (SmolLM2-135M in fp32) takes about a second; the evaluation it saves takes minutes."""
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        data = tensor.detach()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        if data.numel():
            flat = data.to("cpu").contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.dtype != torch.uint8 else flat.numpy().tobytes())
    return digest.hexdigest()


def data_hash(prompt_ids: list[list[int]], references: list[str], sources: list[str]) -> str:
    payload = json.dumps({"prompts": prompt_ids, "references": references, "sources": sources}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def settings(model, tokenizer, metrics: list[str], max_new_tokens: int, metric_options: dict[str, Any]) -> dict:
    import transformers

    import tunesmith
    from tunesmith.eval.generate import stop_token_ids

    return {"format": FORMAT, "max_new_tokens": max_new_tokens, "greedy": True,
            "stop_token_ids": stop_token_ids(model, tokenizer), "metrics": list(metrics),
            "metric_options": metric_options, "tunesmith": tunesmith.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def evaluation_key(model, tokenizer, conversations, metrics: list[str], max_new_tokens: int,
                   max_examples: int | None, metric_options: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(key, its parts) of evaluating `model` on `conversations` with these settings."""
    from tunesmith.eval.generate import render_prompts
    from tunesmith.eval.task import split_conversation

    chosen = conversations[:max_examples] if max_examples is not None else list(conversations)
    split = [split_conversation(c) for c in chosen]
    prompt_ids = render_prompts(tokenizer, [p for p, _, _ in split])
    parts = {
        "model": model_hash(model),
        "data": data_hash(prompt_ids, [r for _, r, _ in split], [s for _, _, s in split]),
        "settings": hashlib.sha256(json.dumps(settings(model, tokenizer, metrics, max_new_tokens, metric_options),
                                              sort_keys=True, default=str).encode()).hexdigest(),
    }
    key = hashlib.sha256("|".join(parts[k] for k in ("model", "data", "settings")).encode()).hexdigest()
    return key, parts


def load_entry(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or corrupt (e.g. a disk-full write): recompute
    return entry.get("result") if entry.get("key") == key else None


def store_entry(key: str, parts: dict[str, str], result: dict[str, Any]) -> Path:
    from tunesmith.atomic import write_json

    path = cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "parts": parts, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "result": result})
    return path


def evaluate_task_cached(model, tokenizer, conversations, metrics: list[str], max_new_tokens: int = 128,
                         batch_size: int = 16, max_examples: int | None = None, log: Callable[[str], None] = print,
                         progress: Callable[[int, int], None] | None = None, **metric_options: Any) -> dict[str, Any]:
    """`evaluate_task` through the cache; the result carries "cache": {"hit", "key", "path"}."""
    from tunesmith.eval.task import evaluate_task

    if not enabled():
        result = evaluate_task(model, tokenizer, conversations, metrics, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, max_examples=max_examples, progress=progress, **metric_options)
        result["cache"] = {"hit": False, "key": None, "path": None}
        return result
    key, parts = evaluation_key(model, tokenizer, conversations, metrics, max_new_tokens, max_examples, metric_options)
    path = cache_dir() / f"{key}.json"
    cached = load_entry(key)
    if cached is not None:
        log(f"  reusing the cached evaluation {path} (same model weights, prompts and settings)")
        cached["cache"] = {"hit": True, "key": key, "path": str(path)}
        return cached
    result = evaluate_task(model, tokenizer, conversations, metrics, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, max_examples=max_examples, progress=progress, **metric_options)
    store_entry(key, parts, result)
    result["cache"] = {"hit": False, "key": key, "path": str(path)}
    return result


def progress_printer(log: Callable[[str], None], label: str, started: float,
                     every: float = 10.0) -> Callable[..., None]:
    """A `progress(done, total, token=None, max_new_tokens=None)` that logs at most one line per `every` seconds
    (and the last): '<label>: done/total examples, batch at token t/T, N s'. Evaluations take minutes on a CPU."""
    last = [started]

    def report(done: int, total: int, token: int | None = None, max_new_tokens: int | None = None) -> None:
        now = time.perf_counter()
        if done < total and now - last[0] < every:
            return
        if done == total and token is not None:
            return  # the final per-batch call (token None) reports the end once
        last[0] = now
        where = f", current batch at token {token}/{max_new_tokens}" if token is not None else ""
        log(f"  {label}: {done}/{total} examples done{where}, {now - started:.0f} s")

    return report
