"""Batched generation equals one-at-a-time generation token for token (fp32, greedy), for plain and peft models."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.data.formats import Conversation
from tunesmith.eval.generate import generate_batch, generate_token_ids, render_prompts
from tunesmith.eval.plots import plot_loss_curves
from tunesmith.eval.task import evaluate_task, split_conversation
from tunesmith.models.tiny import build_tiny_model
from tunesmith.models.tokens import stop_token_ids


def _spread_model(seed: int = 1):
    """A tiny model with large random weights: near-uniform logits would make every reply the same token."""
    model, tokenizer = build_tiny_model("llama")
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.5)
    return model, tokenizer


PROMPTS = [[{"role": "user", "content": "abc" * n}] for n in (1, 7, 3, 11, 5)]


@pytest.fixture(scope="module")
def spread_model():
    return _spread_model()


def test_batched_equals_one_at_a_time(spread_model):
    model, tokenizer = spread_model
    ids = render_prompts(tokenizer, PROMPTS)
    batched = generate_token_ids(model, tokenizer, ids, max_new_tokens=10, batch_size=3)
    single = [generate_token_ids(model, tokenizer, [p], max_new_tokens=10, batch_size=1)[0] for p in ids]
    assert batched == single
    assert len({tuple(x) for x in batched}) == len(PROMPTS)  # replies differ, so order restoration is checked
    stops = set(stop_token_ids(model, tokenizer))
    assert all(not stops.intersection(x) and len(x) <= 10 for x in batched)
    texts = generate_batch(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2)
    assert texts == [tokenizer.decode(x, skip_special_tokens=True).strip() for x in single]


def test_peft_model_generates_like_its_base(spread_model):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _spread_model()
    expected = generate_batch(model, tokenizer, PROMPTS[:3], max_new_tokens=6)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # B=0: same function
    assert generate_batch(peft_model, tokenizer, PROMPTS[:3], max_new_tokens=6, batch_size=2) == expected


def test_prompt_ending_with_assistant_is_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        render_prompts(tiny_tokenizer, [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])


def test_split_and_evaluate_task(spread_model):
    model, tokenizer = spread_model
    conversations = [
        Conversation([{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": "a"}, {"role": "user", "content": f"src {i}"},
                      {"role": "assistant", "content": f"ref {i}"}], source="t.jsonl", line=i + 1)
        for i in range(3)
    ]
    prompt, reference, source = split_conversation(conversations[0])
    assert [t["role"] for t in prompt] == ["system", "user", "assistant", "user"]
    assert (reference, source) == ("ref 0", "src 0")
    result = evaluate_task(model, tokenizer, conversations, ["exact_match", "token_f1"], max_new_tokens=4,
                           batch_size=2, max_examples=2)
    assert (result["n"], result["total"]) == (2, 3)
    assert [e["line"] for e in result["examples"]] == [1, 2]
    assert result["metrics"]["exact_match"] == 0.0  # a random model does not answer "ref 0"
    assert result["examples"][0]["prediction"] == generate_batch(model, tokenizer, [prompt], max_new_tokens=4)[0]


def test_plot_loss_curves(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train_loss": 3 - 0.1 * s} for s in range(1, 11)]
    rows += [{"step": s, "eval_loss": v} for s, v in [(5, 2.5), (10, 2.7)]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = plot_loss_curves(path, tmp_path / "loss_curves.png", diagnosis={"diagnosis": "overfitting", "spikes": [],
                                                                        "advice": ["stop early"]})
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
