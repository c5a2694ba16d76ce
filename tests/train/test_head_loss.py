"""The chunked head + cross-entropy (train/head_loss.py) against the module path: F.linear then F.cross_entropy in
fp32 (loss and the gradients of the hidden states, the head weight and its bias), and forward_loss on tiny models
with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.models.head import chunk_rows, config_returns_head_output, fused_head_bytes
from tunesmith.train.head_loss import fused_head_applies, head_cross_entropy_sum


def _reference(hidden, head, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _grads(loss_fn, hidden, head, targets):
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss = loss_fn(hidden, head, targets)
    (loss * 0.37).backward()  # a scale other than 1: the backward must apply it
    grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if head.bias is not None else [])
    return loss.detach(), [g.clone() for g in grads]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_fp32_loss_and_gradients_match_the_module_path(bias, rows):
    torch.manual_seed(0)
    n, d, vocab = 45, 16, 301
    head = torch.nn.Linear(d, vocab, bias=bias)
    hidden, targets = torch.randn(n, d) * 3, torch.randint(0, vocab, (n,))
    ref_loss, ref_grads = _grads(_reference, hidden, head, targets)
    loss, grads = _grads(lambda h, m, t: head_cross_entropy_sum(h, m, t, rows=rows), hidden, head, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_frozen_head_and_no_grad():
    """A frozen head gets no gradient (LoRA); under no_grad (evaluation) only the loss is computed."""
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(20, 8, requires_grad=True), torch.randint(0, 50, (20,))
    head_cross_entropy_sum(hidden, head, targets, rows=6).backward()
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(_reference(hidden, head, targets), hidden)[0])
    assert head.weight.grad is None
    with torch.no_grad():
        loss = head_cross_entropy_sum(hidden, head, targets, rows=6)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(hidden, head, targets).detach())


def test_bf16_autocast_matches_autocast_module_path():
    """Under CPU bf16 autocast both matmuls run in bf16 and the softmax in fp32, as autocast's linear + .float()."""
    torch.manual_seed(2)
    head = torch.nn.Linear(32, 400, bias=False)
    hidden, targets = torch.randn(50, 32), torch.randint(0, 400, (50,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _grads(_reference, hidden, head, targets)
        loss, grads = _grads(lambda h, m, t: head_cross_entropy_sum(h, m, t, rows=16), hidden, head, targets)
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=1e-2)
    # bf16 rounding: the module path rounds the weight gradient's whole sum to bf16, the chunks add up in fp32
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_second_backward_is_refused():
    head = torch.nn.Linear(4, 10)
    loss = head_cross_entropy_sum(torch.randn(3, 4, requires_grad=True), head, torch.tensor([1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("name", ["lora", "full"])
def test_forward_loss_takes_the_fused_path_with_the_same_gradients(tiny_arch, name, monkeypatch):
    """forward_loss on a tiny model (tied embeddings: under full fine-tuning the head's gradient and the
    embedding's add up) with the chunked head loss and with it switched off: same loss, same gradients."""
    import tunesmith.train.loop as loop
    from tunesmith.config import MethodConfig
    from tunesmith.data.formats import Conversation
    from tunesmith.data.pack import pack_examples
    from tunesmith.data.render import render_dataset
    from tunesmith.methods.registry import get_method
    from tunesmith.models.tiny import build_tiny_model

    torch.manual_seed(0)
    base, tokenizer = build_tiny_model(tiny_arch)
    method = get_method(name)
    model = method.apply(base, MethodConfig.model_validate({"name": name, "lora": {"dropout": 0.0, "init": "gaussian"}}))
    model.train()
    conversations = [Conversation([{"role": "user", "content": "q " * k}, {"role": "assistant", "content": "a b " * k}])
                     for k in (2, 5, 9, 3)]
    examples, _ = render_dataset(tokenizer, conversations, 256)
    batch = loop.collate(pack_examples(examples, 128), tokenizer.pad_token_id, block_mask=True)
    head = loop.output_head(model)
    assert fused_head_applies(model, head)
    used = []
    monkeypatch.setattr(loop, "head_cross_entropy_sum", lambda *a: used.append(1) or head_cross_entropy_sum(*a))

    def run():
        model.zero_grad(set_to_none=True)
        loss, n = loop.forward_loss(model, method, batch, "fp32", torch.device("cpu"))
        (loss / n).backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    fused_loss, fused_grads = run()
    assert used == [1]
    monkeypatch.setattr(loop, "fused_head_applies", lambda model, head: False)
    ref_loss, ref_grads = run()
    assert used == [1]
    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == ref_grads.keys() and fused_grads
    for key, grad in ref_grads.items():
        assert (fused_grads[key] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-8, key


def test_a_model_that_caps_its_logits_keeps_the_module_path():
    """Gemma 2 soft-caps the head's output in its forward: the probe sees that and forward_loss computes the loss
    from the capped logits (the chunked loss would miss the cap)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import tunesmith.train.loop as loop
    from tunesmith.data.pack import Pack, collate
    from tunesmith.data.render import Example
    from tunesmith.methods.registry import get_method

    config = AutoConfig.for_model("gemma2", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, num_hidden_layers=2, vocab_size=120,
                                  final_logit_softcapping=2.0)
    assert not config_returns_head_output(config.to_dict())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # logits far beyond the cap, so the cap matters
    assert not fused_head_applies(model, loop.output_head(model))
    ids = torch.randint(0, 120, (12,)).tolist()
    batch = collate([Pack([Example(ids, [-100] * 4 + ids[4:])])], 0, block_mask=False)
    loss, n = loop.forward_loss(model, get_method("full"), batch, "fp32", torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert logits.abs().max() <= 2.0
    ref, ref_n = loop.causal_lm_loss_sum(logits, batch["labels"])
    assert n == ref_n
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)


def test_the_planner_rules():
    assert chunk_rows(49_152) == 512
    assert chunk_rows(262_144) == 256  # (256, 262,144) fp32 = 256 MiB
    assert chunk_rows(10**8) == 64
    assert config_returns_head_output({"model_type": "llama"})
    assert config_returns_head_output({"logit_scale": None, "logits_scaling": 1.0})
    assert not config_returns_head_output({"logit_scale": 0.0625})
    assert not config_returns_head_output({"text_config": {"final_logit_softcapping": 30.0}})
    # gradient of 1,000 hidden states (fp32) + one chunk's logits and log-probabilities (fp32), + bf16 logits
    assert fused_head_bytes(1000, 576, 49_152, 4) == 1000 * 576 * 4 + 512 * 49_152 * 8
    assert fused_head_bytes(1000, 576, 49_152, 2) == 1000 * 576 * 4 + 512 * 49_152 * 10
    assert fused_head_bytes(10, 576, 49_152, 4) == 10 * 576 * 4 + 10 * 49_152 * 8
