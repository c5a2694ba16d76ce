"""Rendering with assistant-only labels (end-of-turn included) and packing without cross-example attention."""

import pytest
import torch

from tunesmith.data.formats import Conversation
from tunesmith.data.pack import collate, pack_examples, single_packs
from tunesmith.data.render import IGNORE_INDEX, render_dataset, render_example
from tunesmith.train.loop import causal_lm_loss_sum, forward_loss


def conv(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return Conversation(messages, source="mem.jsonl", line=1)


def labelled_text(tokenizer, example):
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX])


def test_labels_cover_assistant_content_and_end_of_turn_only(tiny_tokenizer):
    example = render_example(tiny_tokenizer, conv("hi there", "hello!", "and?", "done.", system="be brief"))
    assert labelled_text(tiny_tokenizer, example) == "hello!<|im_end|>\ndone.<|im_end|>\n"
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    labelled_eot = [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == eot]
    assert len(labelled_eot) == 2  # each assistant turn's end-of-turn token carries loss: the model learns to stop
    # the user turns' end-of-turn tokens do not
    assert example.input_ids.count(eot) == 5


def test_rendering_matches_the_chat_template_tokens(tiny_tokenizer):
    c = conv("What is 2+2?", "4")
    example = render_example(tiny_tokenizer, c)
    expected = tiny_tokenizer.apply_chat_template(c.messages, tokenize=False)
    assert tiny_tokenizer.decode(example.input_ids) == expected


def test_truncation_is_counted_not_silent(tiny_tokenizer):
    long = conv("x" * 200, "y" * 50)
    short = conv("a", "b")
    examples, stats = render_dataset(tiny_tokenizer, [long, short], max_seq_len=64, truncation="truncate")
    assert stats.examples_in == 2 and stats.truncated == 1 and stats.truncated_tokens > 0
    # the long example's assistant text was entirely cut: it is dropped and counted, not kept with no loss
    assert stats.dropped_too_long == 1 and stats.examples_out == 1 and len(examples) == 1
    assert stats.examples_in == stats.examples_out + stats.dropped_too_long
    with pytest.raises(ValueError, match=r"mem.jsonl:1.*max_seq_len=64"):
        render_dataset(tiny_tokenizer, [long], max_seq_len=64, truncation="error")


def test_packing_fits_and_keeps_every_example(tiny_tokenizer):
    examples, _ = render_dataset(tiny_tokenizer, [conv("q" * n, "a" * (n % 7 + 1)) for n in range(1, 40)], 128)
    packs = pack_examples(examples, 128)
    assert all(p.length <= 128 for p in packs)
    assert sorted(id(e) for p in packs for e in p.examples) == sorted(id(e) for e in examples)
    assert len(packs) < len(examples)


def test_packed_loss_equals_unpacked_token_weighted_loss(tiny_arch, tiny_tokenizer):
    """Packed batch loss == token-weighted loss of the same examples run one per row, within 1e-4 (fp32)."""
    from tunesmith.methods.base import Method
    from tunesmith.models.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(tiny_arch)
    model.eval()
    conversations = [conv(f"question {i} " * (i + 1), f"answer {i}" * (i % 3 + 1)) for i in range(6)]
    examples, _ = render_dataset(tokenizer, conversations, 256)
    packs = pack_examples(examples, 256)
    assert any(len(p.examples) > 1 for p in packs)
    method, cpu = Method(), torch.device("cpu")
    packed = collate(packs, tokenizer.pad_token_id, block_mask=True)
    packed_sum, packed_n = forward_loss(model, method, packed, "fp32", cpu)
    single = collate(single_packs(examples), tokenizer.pad_token_id, block_mask=False)
    single_sum, single_n = forward_loss(model, method, single, "fp32", cpu)
    assert packed_n == single_n > 0
    assert abs(packed_sum.item() / packed_n - single_sum.item() / single_n) < 1e-4
    # and each example alone, no padding at all
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor([e.labels])
        labels[0, 0] = IGNORE_INDEX
        s, n = causal_lm_loss_sum(model(ids).logits, labels)
        total, count = total + s.item(), count + n
    assert count == packed_n and abs(total / count - packed_sum.item() / packed_n) < 1e-4


def test_without_the_block_mask_packing_would_leak(tiny_tokenizer):
    """The mask matters: a plain causal mask over a packed row gives a different loss (guards the test above)."""
    from tunesmith.methods.base import Method
    from tunesmith.models.tiny import build_tiny_model

    model, tokenizer = build_tiny_model("llama")
    examples, _ = render_dataset(tokenizer, [conv("first " * 5, "one"), conv("second " * 5, "two")], 256)
    packs = pack_examples(examples, 256)
    assert len(packs) == 1
    good = collate(packs, tokenizer.pad_token_id, block_mask=True)
    leaky = collate(packs, tokenizer.pad_token_id, block_mask=False)
    a, n = forward_loss(model, Method(), good, "fp32", torch.device("cpu"))
    b, _ = forward_loss(model, Method(), leaky, "fp32", torch.device("cpu"))
    assert abs(a.item() - b.item()) / n > 1e-4
