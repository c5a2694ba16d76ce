"""forward_loss computes logits only at labelled positions (a pre-hook on the output head): its loss and its
gradients must equal the plain full-logits computation, for every method, and the hook must not outlive the call."""

import pytest
import torch

from tests.train.test_render_pack import conv
from tunesmith.config import MethodConfig
from tunesmith.data.pack import collate, pack_examples, single_packs
from tunesmith.data.render import render_dataset
from tunesmith.methods.registry import get_method
from tunesmith.train.loop import causal_lm_loss_sum, forward_loss, output_head


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("name", ["lora", "full", "adapters", "prompt", "prefix"])
def test_labelled_position_loss_equals_full_logits_loss(tiny_arch, name):
    from tunesmith.models.tiny import build_tiny_model

    torch.manual_seed(0)
    base, tokenizer = build_tiny_model(tiny_arch)
    method = get_method(name)
    model = method.apply(base, MethodConfig(name=name))
    model.eval()  # no dropout: both computations see the same function
    conversations = [conv(f"question {i} " * (i + 1), f"answer {i} " * (i % 3 + 1)) for i in range(5)]
    examples, _ = render_dataset(tokenizer, conversations, 256)
    if method.supports_packing:
        batch = collate(pack_examples(examples, 128), tokenizer.pad_token_id, block_mask=True)
    else:  # prompt learning prepends virtual tokens: one example per row, right-padded
        batch = collate(single_packs(examples), tokenizer.pad_token_id, block_mask=False)
    cpu = torch.device("cpu")

    if name != "prompt":  # the labelled-position path is taken (prompt tuning keeps full logits, see forward_loss)
        assert output_head(model) is not None
    loss, n = forward_loss(model, method, batch, "fp32", cpu)
    loss.backward()
    fast = _grads(model)
    model.zero_grad(set_to_none=True)

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = method.align_logits(model(**inputs).logits, batch["input_ids"])
    assert logits.shape[:2] == batch["input_ids"].shape  # the hook is gone: full logits again
    ref, ref_n = causal_lm_loss_sum(logits, batch["labels"])
    ref.backward()
    slow = _grads(model)

    assert n == ref_n > 0
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    assert fast.keys() == slow.keys() and fast
    for key in fast:
        assert torch.allclose(fast[key], slow[key], rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize("name", ["lora", "prefix"])
def test_training_forward_builds_no_kv_cache(tiny_arch, name, monkeypatch):
    """transformers 5 builds a DynamicCache from config.use_cache on every forward, training included (a copy of
    every layer's keys and values); forward_loss asks for none. Prefix tuning still gets its prefix (peft hands the
    model a cache of prefix key/values, which is not a new one)."""
    import transformers.cache_utils as cache_utils

    from tunesmith.models.tiny import build_tiny_model

    torch.manual_seed(0)
    base, tokenizer = build_tiny_model(tiny_arch)
    assert base.config.use_cache  # the default that made every training forward build a cache
    method = get_method(name)
    model = method.apply(base, MethodConfig(name=name))
    model.train()
    examples, _ = render_dataset(tokenizer, [conv("question " * 3, "answer " * 2)], 256)
    batch = collate(single_packs(examples), tokenizer.pad_token_id, block_mask=method.supports_packing)
    built = []
    original = cache_utils.DynamicCache.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    forward_loss(model, method, batch, "fp32", torch.device("cpu"))  # the first call probes the head (head_loss.py)
    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", counting_init)
    with torch.no_grad():
        model(**{k: batch[k] for k in ("input_ids", "attention_mask") if k in batch})
    plain = len(built)
    built.clear()
    loss, n = forward_loss(model, method, batch, "fp32", torch.device("cpu"))
    assert n > 0 and torch.isfinite(loss)
    if name == "prefix":  # peft's get_prompt builds the prefix's cache, and the model uses it: no second one
        assert plain == len(built) == 1
    else:
        assert plain == 1  # the check can fail: a plain forward does build one
        assert built == []
