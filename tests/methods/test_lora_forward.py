"""The fused LoRA forward (methods/lora_forward.py) against peft's own forward: the same outputs and gradients in
fp32, with and without dropout (the same seed draws the same mask), and peft's forward wherever the plain case
does not hold."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config import MethodConfig
from tunesmith.methods.lora_forward import fused_lora_forward, use_fused_lora_forward
from tunesmith.methods.registry import get_method


def _lora_model(dropout: float, seed: int = 0):
    from tunesmith.models.tiny import build_tiny_model

    torch.manual_seed(seed)
    base, _ = build_tiny_model("llama")
    model = get_method("lora").apply(base, MethodConfig.model_validate(
        {"name": "lora", "lora": {"r": 4, "alpha": 12, "dropout": dropout, "init": "gaussian",
                                  "target_modules": "all-linear"}}))
    with torch.no_grad():  # B away from zero, so the update and every gradient are not trivially zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def _peft_forward(model):
    """The same model with every fused forward removed (peft's class forward again)."""
    for module in model.modules():
        if "forward" in module.__dict__ and module.__dict__["forward"].__func__ is fused_lora_forward:
            del module.forward
    return model


def _run(model, ids, seed):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(input_ids=ids, use_cache=False).logits
    (logits.float().pow(2).mean()).backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_forward_matches_peft(dropout):
    fused = _lora_model(dropout)
    assert sum("forward" in m.__dict__ for m in fused.modules()) == 7 * fused.config.num_hidden_layers
    reference = _peft_forward(_lora_model(dropout))
    ids = torch.randint(0, fused.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    logits, grads = _run(fused, ids, seed=5)
    ref_logits, ref_grads = _run(reference, ids, seed=5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * fused.config.num_hidden_layers
    # fp32 rounding: the scaling is applied to other tensors (measured up to 1.1e-5 of a tensor's largest entry);
    # a lost dropout mask or scaling would be off by O(1)
    for key, grad in ref_grads.items():
        assert (grads[key] - grad).abs().max() <= 1e-4 * grad.abs().max(), key


def test_bf16_autocast_is_as_close_to_fp32_as_peft():
    """Under CPU bf16 autocast (tunesmith train on CPUs with native bf16) B is cast as autocast casts lora_B. Both
    paths round differently in bf16 (peft rounds B's output, its scaled copy and the sum; addmm_ once), so each is
    held against the fp32 result: the fused path's error is at most peft's (x1.5), on outputs and gradients."""
    fused = _lora_model(0.1)
    reference = _peft_forward(_lora_model(0.1))
    ids = torch.randint(0, fused.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    exact_logits, exact_grads = _run(reference, ids, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = _run(fused, ids, seed=5)
        ref_logits, ref_grads = _run(reference, ids, seed=5)
    assert logits.dtype == ref_logits.dtype == torch.bfloat16

    def error(got, want):
        return float((got.float() - want).abs().max())

    assert error(logits, exact_logits) <= 1.5 * error(ref_logits, exact_logits)
    fused_worst = max(error(grads[k], g) / float(g.abs().max()) for k, g in exact_grads.items())
    peft_worst = max(error(ref_grads[k], g) / float(g.abs().max()) for k, g in exact_grads.items())
    assert fused_worst <= 1.5 * peft_worst


def test_peft_forward_where_the_plain_case_does_not_hold(monkeypatch):
    """Disabled adapters and extra arguments go through peft's forward (counted with a spy)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = _lora_model(0.0)
    layer = next(m for m in model.modules() if type(m) is LoraLinear)
    calls = []
    original = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    x = torch.randn(3, layer.in_features)
    fused = layer(x)
    assert calls == []
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert calls == [1]
    layer(x, adapter_names=["default"] * 3)  # peft's mixed-batch argument
    assert calls == [1, 1]
    torch.testing.assert_close(original(layer, x), fused, rtol=1e-6, atol=1e-6)


def test_quantized_and_progressive_layers_are_left_to_peft():
    """use_fused_lora_forward replaces exactly peft's lora.Linear; a second call changes nothing new."""
    model = _lora_model(0.0)
    count = use_fused_lora_forward(model)
    assert count == 7 * model.config.num_hidden_layers  # idempotent: the same layers again


def test_update_keeps_the_input_once_and_the_dropped_positions():
    """With dropout the fused update (LoraUpdate) keeps, per layer, each input its targets read once (q/k/v share the
    attention norm output, gate/up the MLP norm output) and one int32 tensor of dropped positions per target: no fp32
    noise, no mask over the whole input and no dropped copy of the input (peft keeps both per target). Counted with
    saved_tensors_hooks on the tiny llama."""
    model = _lora_model(0.1)
    model.train()
    tokens = 2 * 24
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    hidden = model.config.hidden_size
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    layers = model.config.num_hidden_layers
    positions = [t for t in saved.values() if t.dtype == torch.int32 and t.dim() == 1]
    assert len(positions) == 7 * layers  # q, k, v, o, gate, up, down
    inputs = model.config.hidden_size * 6 + model.config.intermediate_size
    dropped = sum(t.numel() for t in positions) / (tokens * inputs * layers)
    assert 0.05 < dropped < 0.15  # about p = 0.1 of the input elements, each kept as one int32
    assert all(bool((t[1:] > t[:-1]).all()) for t in positions if t.numel() > 1)  # sorted, distinct
    assert not [t for t in saved.values() if t.dtype == torch.bool and t.shape[0] == tokens]  # no whole-input mask
    fp32_noise = [t for t in saved.values() if t.dtype == torch.float32 and t.dim() == 2 and t.shape[0] == tokens
                  and t.shape[1] == hidden and bool(((t == 0) | (t > 1.0)).all())]
    assert fp32_noise == []  # no 0 / (1/(1-p)) tensors
    peft = _peft_forward(_lora_model(0.1))
    peft.train()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peft(input_ids=ids, use_cache=False)
    peft_bytes = sum(t.untyped_storage().nbytes() for t in saved.values())
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    fused_bytes = sum(t.untyped_storage().nbytes() for t in saved.values())
    assert fused_bytes < 0.8 * peft_bytes


def test_checkpointing_replays_the_same_mask():
    """Activation checkpointing recomputes each layer in the backward pass: the fused update must draw the same
    dropped positions again (the CPU generator's state is restored), so the gradients equal those of the run without
    checkpointing."""
    plain = _lora_model(0.1)
    ckpt = _lora_model(0.1)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.enable_input_require_grads()
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    logits, grads = _run(plain, ids, seed=7)
    ckpt_logits, ckpt_grads = _run(ckpt, ids, seed=7)
    torch.testing.assert_close(ckpt_logits, logits)
    for key, grad in grads.items():
        assert (ckpt_grads[key] - grad).abs().max() <= 1e-5 * grad.abs().max(), key


def test_other_dropout_modules_keep_autograds_path():
    """A plain nn.Dropout (not the CPU bulk draw) goes through autograd's own ops, with its own mask and scaling:
    the same result as peft's forward from the same seed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = _lora_model(0.1)
    model.train()
    layer = next(m for m in model.modules() if type(m) is LoraLinear)
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    x = torch.randn(5, layer.in_features)
    torch.manual_seed(11)
    fused = layer(x)
    torch.manual_seed(11)
    reference = type(layer).forward(layer, x)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
