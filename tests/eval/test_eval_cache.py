"""The evaluation cache (eval/cache.py): a repeated base evaluation is served from disk, and any change to the
weights, the prompts or the generation settings is a different key (so a stale result is never served)."""

from __future__ import annotations

import json

import pytest
import torch

import tunesmith.eval.task as task_module
from tunesmith.data.formats import Conversation
from tunesmith.eval import cache
from tunesmith.models.tiny import build_tiny_model


def conversations(n=3, reference='{"a": 1}'):
    return [Conversation(messages=[{"role": "user", "content": f"give json {i}"},
                                   {"role": "assistant", "content": reference}], source="t.jsonl", line=i + 1)
            for i in range(n)]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TUNESMITH_EVAL_CACHE", raising=False)
    return build_tiny_model()


@pytest.fixture
def calls(monkeypatch):
    counted = []
    real = task_module.evaluate_task

    def counting(*a, **k):
        counted.append(1)
        return real(*a, **k)

    monkeypatch.setattr(task_module, "evaluate_task", counting)
    return counted


def run(model, tokenizer, convs, **kw):
    options = {"metrics": ["json_valid", "exact_match"], "max_new_tokens": 4, "batch_size": 2, "log": lambda *_: None}
    options.update(kw)
    return cache.evaluate_task_cached(model, tokenizer, convs, **options)


def test_second_evaluation_is_a_hit_with_the_same_result(tiny, calls):
    model, tokenizer = tiny
    seen = []
    first = run(model, tokenizer, conversations(), progress=lambda *a: seen.append(a))
    assert first["cache"]["hit"] is False
    # a call per decoding step (token 1..4 of each batch), then one per finished batch
    assert [a for a in seen if a[2] is None] == [(2, 3, None, 4), (3, 3, None, 4)]
    assert (0, 3, 1, 4) in seen and (2, 3, 1, 4) in seen and all(a[2] <= 4 for a in seen if a[2] is not None)
    second = run(model, tokenizer, conversations(), batch_size=3)  # batch size is not part of the key
    assert second["cache"]["hit"] is True and len(calls) == 1
    assert second["cache"]["key"] == first["cache"]["key"]
    strip = lambda r: {k: v for k, v in r.items() if k != "cache"}  # noqa: E731
    assert strip(second) == json.loads(json.dumps(strip(first)))
    entry = json.loads(open(first["cache"]["path"]).read())
    assert set(entry["parts"]) == {"model", "data", "settings"}


def test_any_change_of_weights_data_or_settings_is_a_new_key(tiny):
    model, tokenizer = tiny
    convs = conversations()

    def key(m=model, c=convs, metrics=("json_valid",), max_new_tokens=4, max_examples=None, options=None):
        return cache.evaluation_key(m, tokenizer, c, list(metrics), max_new_tokens, max_examples, options or {})[0]

    base = key()
    assert key() == base  # deterministic
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6  # one weight, slightly
    changed_weight = key()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] -= 1e-6
    assert changed_weight != base
    assert key(c=conversations(reference='{"a": 2}')) != base  # one reference
    assert key(c=conversations(n=4)) != base and key(c=conversations(n=4), max_examples=3) == base
    assert key(max_new_tokens=5) != base
    assert key(metrics=("json_valid", "exact_match")) != base
    assert key(options={"closed_fields": ["x"]}) != base
    other, _ = build_tiny_model(seed=1)
    assert key(m=other) != base
    assert key(m=model.to(torch.float64)) != base  # same values, other dtype: another model as loaded


def test_corrupt_entry_is_recomputed_and_disabled_cache_writes_nothing(tiny, calls, monkeypatch, tmp_path):
    model, tokenizer = tiny
    first = run(model, tokenizer, conversations())
    open(first["cache"]["path"], "w").write("{ truncated")
    again = run(model, tokenizer, conversations())
    assert again["cache"]["hit"] is False and len(calls) == 2
    assert run(model, tokenizer, conversations())["cache"]["hit"] is True
    monkeypatch.setenv("TUNESMITH_EVAL_CACHE", "0")
    off = run(model, tokenizer, conversations(n=2))
    assert off["cache"] == {"hit": False, "key": None, "path": None} and len(calls) == 3
    assert len(list((tmp_path / "cache" / "evals").glob("*.json"))) == 1


def test_progress_printer_throttles_and_reports_the_end(monkeypatch):
    lines = []
    clock = iter([1.0, 12.0, 13.0, 30.0, 31.0])
    monkeypatch.setattr(cache.time, "perf_counter", lambda: next(clock))
    report = cache.progress_printer(lines.append, "base test", 0.0)  # started at 0
    report(0, 4, 1, 96)   # 1 s: too soon
    report(0, 4, 50, 96)  # 12 s: printed
    report(2, 4, None, 96)  # 13 s: too soon
    report(2, 4, 10, 96)  # 30 s: printed
    report(4, 4, None, 96)  # the end: printed
    assert lines == ["  base test: 0/4 examples done, current batch at token 50/96, 12 s",
                     "  base test: 2/4 examples done, current batch at token 10/96, 30 s",
                     "  base test: 4/4 examples done, 31 s"]
