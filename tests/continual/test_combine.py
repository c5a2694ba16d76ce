"""Stacking and merging LoRA adapters (methods/combine.py) against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tunesmith.methods.base import MethodError
from tunesmith.methods.combine import (
    EXACT,
    activate,
    add_progressive_adapter,
    load_stack,
    logit_drift,
    merge_adapters,
    probe_logits,
    save_adapter,
)
from tunesmith.models.tiny import build_tiny_model

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _random_adapter(model, name: str, r: int, seed: int):
    """Add a LoRA adapter with random (non-zero) A and B so its delta is visible."""
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
    if not hasattr(model, "peft_config"):
        model = get_peft_model(model, config, adapter_name=name)
    else:
        model.add_adapter(name, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if f".{name}." in pname and ".lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return model


@pytest.fixture
def two_adapter_dirs(tmp_path):
    model, tokenizer = build_tiny_model("llama", seed=0)
    model = _random_adapter(model, "t1", 2, 1)
    model = _random_adapter(model, "t2", 3, 2)
    save_adapter(model, "t1", tmp_path / "t1", base_model="tiny")
    save_adapter(model, "t2", tmp_path / "t2", base_model="tiny")
    return tmp_path / "t1", tmp_path / "t2", tokenizer


def test_stacked_adapters_reproduce_the_sum_of_their_deltas(two_adapter_dirs):
    """Independent reference: a plain copy of the base with W += s1 B1 A1 + s2 B2 A2 in every targeted Linear."""
    t1, t2, tokenizer = two_adapter_dirs
    base, _ = build_tiny_model("llama", seed=0)
    reference = copy.deepcopy(base)
    stacked = load_stack(base, {"t1": t1, "t2": t2})
    assert sorted(stacked.active_adapters) == ["t1", "t2"]
    assert not any(p.requires_grad for p in stacked.parameters())
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in stacked.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "t1" in module.lora_A:
                delta = sum(module.scaling[a] * module.lora_B[a].weight @ module.lora_A[a].weight for a in ("t1", "t2"))
                modules[name].weight += delta
    assert len([n for n in modules if n.endswith(tuple(TARGETS))]) > 0
    expected = probe_logits(reference, tokenizer)
    got = probe_logits(stacked, tokenizer)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and the stack differs from either adapter alone (the test would catch a stack that drops one)
    activate(stacked, ["t1"])
    assert logit_drift(expected, probe_logits(stacked, tokenizer))["max_abs_logit_diff"] > 1e-3


def test_cat_merge_matches_stacked_logits_and_others_report_drift(two_adapter_dirs, tmp_path):
    t1, t2, tokenizer = two_adapter_dirs
    base, _ = build_tiny_model("llama", seed=0)
    model = load_stack(base, {"t1": t1, "t2": t2})
    stacked = probe_logits(model, tokenizer)
    report = merge_adapters(model, ["t1", "t2"], "merged", "cat")
    assert report["exact"] and report["rank"] == 5 and "cat" in EXACT
    assert model.active_adapters == ["merged"]
    torch.testing.assert_close(probe_logits(model, tokenizer), stacked, rtol=0, atol=1e-5)
    # the merged adapter saves as one flat PEFT folder and reloads to the same logits
    save_adapter(model, "merged", tmp_path / "merged", extra={"merged_from": ["t1", "t2"]})
    again = load_stack(build_tiny_model("llama", seed=0)[0], {"m": tmp_path / "merged"})
    torch.testing.assert_close(probe_logits(again, tokenizer), stacked, rtol=0, atol=1e-5)
    assert (tmp_path / "merged" / "tunesmith_combine.json").exists()
    drifts = {}
    for combination in ("svd", "ties_svd", "dare_linear_svd"):
        activate(model, ["t1", "t2"])
        merge_adapters(model, ["t1", "t2"], f"m_{combination}", combination)
        drifts[combination] = logit_drift(stacked, probe_logits(model, tokenizer))
    # approximate merges move the logits (reported, not hidden); svd of a rank-5 sum to rank 3 is lossy
    assert all(d["max_abs_logit_diff"] > 1e-4 for d in drifts.values()), drifts
    for combination in ("linear", "ties", "dare_ties"):
        with pytest.raises(MethodError, match="equal ranks"):
            merge_adapters(model, ["t1", "t2"], "lin", combination)
    with pytest.raises(MethodError, match="unknown combination"):
        merge_adapters(model, ["t1", "t2"], "x", "average")


def test_progressive_adapter_trains_only_the_new_one(two_adapter_dirs):
    t1, _, tokenizer = two_adapter_dirs
    base, _ = build_tiny_model("llama", seed=0)
    model = load_stack(base, {"t1": t1})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".t1." in n}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights="gaussian")
    add_progressive_adapter(model, "t2", config, frozen=["t1"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".t2." in n for n in trainable)
    assert sorted(model.active_adapters) == ["t1", "t2"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = tokenizer("some text to fit", return_tensors="pt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    for name, value in before.items():
        assert torch.equal(dict(model.named_parameters())[name], value)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with pytest.raises(MethodError, match="already loaded"):
        add_progressive_adapter(model, "t1", config, frozen=[])


def test_orthogonal_penalty_by_hand_zero_when_orthogonal_and_gradcheck(two_adapter_dirs):
    """O-LoRA's term lam * sum_layers ||A_old A_new^T||_F^2: equal to a loop over the layers by hand, 0 when the new
    A rows are orthogonal to the frozen ones, no gradient into the frozen adapter, and a correct gradient
    (torch.autograd.gradcheck in float64 on one layer's pair)."""
    from tunesmith.methods.combine import OrthogonalPenalty

    t1, _, _ = two_adapter_dirs
    base, _ = build_tiny_model("llama", seed=0)
    model = load_stack(base, {"t1": t1})
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights="gaussian")
    add_progressive_adapter(model, "t2", config, frozen=["t1"])
    penalty = OrthogonalPenalty(0.5, "t2", ["t1"])
    name, value = penalty(model)
    by_hand = 0.0
    for module_name, module in model.named_modules():
        if module_name.endswith(tuple(TARGETS)) and hasattr(module, "lora_A"):
            old, new = module.lora_A["t1"].weight.detach(), module.lora_A["t2"].weight.detach()
            by_hand += float(sum((old[i] * new[j]).sum() ** 2 for i in range(old.shape[0]) for j in range(new.shape[0])))
    assert name == "orthogonal_penalty" and by_hand > 0
    assert float(value) == pytest.approx(0.5 * by_hand, rel=1e-5)
    value.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".t1." in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A.t2." in n)
    # new rows orthogonal to the frozen rows (project them out): the penalty is 0
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "t2" in getattr(module, "lora_A", {}):
                old, new = module.lora_A["t1"].weight, module.lora_A["t2"].weight
                q, _ = torch.linalg.qr(old.T)  # orthonormal basis of the frozen rows' span
                new.copy_(new - (new @ q) @ q.T)
    assert float(penalty(model)[1]) == pytest.approx(0.0, abs=1e-8)
    old = torch.randn(2, 6, dtype=torch.float64)
    new = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: (old @ a.T).pow(2).sum(), (new,))
    with pytest.raises(MethodError, match="frozen adapter"):
        OrthogonalPenalty(1.0, "t2", [])
    with pytest.raises(MethodError, match="no LoRA layer"):
        OrthogonalPenalty(1.0, "nope", ["t1"]).pairs(model)
