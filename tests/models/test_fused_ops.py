"""The fewer-pass norm and rotary Functions (models/fused_ops.py) against transformers' own code: outputs and
gradients (fp32: within 2e-6 relative; float64 gradcheck), the tensors kept for the backward pass (the same bytes,
so the planner's terms stand), which models are patched, and that everything is restored after the block."""

import pytest
import torch

from tunesmith.models.fused_ops import FrozenRMSNorm, Rotary, fused_norm_and_rotary, same_formula

VOCAB = 97


def _model(arch: str = "llama", seed: int = 0, layers: int = 2):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, num_hidden_layers=layers, vocab_size=VOCAB,
                                  attn_implementation="sdpa")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_functions_match_their_gradients_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.rand(16, dtype=torch.float64, generator=g) + 0.5
    assert torch.autograd.gradcheck(lambda t: FrozenRMSNorm.apply(t, weight, 1e-5), (x,))
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()  # strided, as SDPA's
    angles = torch.randn(2, 1, 5, 4, dtype=torch.float64, generator=g)  # broadcast over heads, like cos.unsqueeze(1)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    assert torch.autograd.gradcheck(lambda t: Rotary.apply(t, cos.transpose(1, 2), sin.transpose(1, 2)), (q,))


def test_functions_equal_transformers_in_fp32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(48, eps=1e-6).requires_grad_(False)
    norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
    x = (torch.randn(2, 7, 48, generator=g) * 3).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    grad = torch.randn(2, 7, 48, generator=g)
    eager, fused = norm(x), FrozenRMSNorm.apply(x2, norm.weight, 1e-6)
    eager.backward(grad)
    fused.backward(grad)
    assert torch.allclose(fused, eager, rtol=2e-6, atol=2e-6)
    assert torch.allclose(x2.grad, x.grad, rtol=2e-6, atol=2e-6)

    q = torch.randn(2, 7, 4 * 8, generator=g).view(2, 7, 4, 8).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 7, 2 * 8, generator=g).view(2, 7, 2, 8).transpose(1, 2).requires_grad_()
    angles = torch.randn(2, 7, 4, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q2, k2 = (t.detach().clone().requires_grad_() for t in (q, k))
    eager = apply_rotary_pos_emb(q, k, cos, sin)
    fused = (Rotary.apply(q2, cos.unsqueeze(1), sin.unsqueeze(1)), Rotary.apply(k2, cos.unsqueeze(1), sin.unsqueeze(1)))
    grads = [torch.randn(t.shape, generator=g) for t in eager]
    torch.autograd.backward(eager, grads)
    torch.autograd.backward(fused, grads)
    for a, b in zip((*fused, q2.grad, k2.grad), (*eager, q.grad, k.grad), strict=True):
        assert torch.allclose(a, b, rtol=2e-6, atol=2e-6)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def _loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _saved_bytes(model, ids) -> int:
    """Bytes of the unique storages autograd keeps for the backward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, ids)
    return sum(seen.values())


@pytest.mark.parametrize(("arch", "autocast"), [("llama", False), ("qwen2", False), ("llama", True)])
def test_model_under_the_block_equals_the_model_outside_it(arch, autocast):
    """A LoRA model (frozen norms): the same loss and LoRA gradients (fp32: 1e-5 relative), the same saved bytes; under
    bf16 autocast both fall back to transformers' code (no Function runs: identical results); the norms' forwards and
    transformers' rotary function are the originals after the block."""
    import contextlib
    import sys

    model = _lora(_model(arch)).train()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    files = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    original_rotary = {f: f.apply_rotary_pos_emb for f in files}
    mixed = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def run():
        model.zero_grad(set_to_none=True)
        with mixed:
            loss = _loss(model, ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def saved():
        with mixed:
            return _saved_bytes(model, ids)

    eager_loss, eager_grads = run()
    eager_saved = saved()
    calls = []
    applies = {f: f.apply for f in (FrozenRMSNorm, Rotary)}
    for function, apply in applies.items():
        function.apply = lambda *a, _apply=apply: calls.append(1) or _apply(*a)
    try:
        with fused_norm_and_rotary(model):
            assert all(f.apply_rotary_pos_emb is not original_rotary[f] for f in files)
            assert sum("forward" in vars(m) for m in model.modules()) == 2 * 2 + 1  # two per layer + the final norm
            fused_loss, fused_grads = run()
            fused_saved = saved()
    finally:
        for function, apply in applies.items():
            function.apply = apply
    assert fused_saved == eager_saved
    if autocast:
        assert not calls
        assert torch.equal(fused_loss, eager_loss)
        for name, grad in eager_grads.items():
            assert torch.equal(fused_grads[name], grad), name
    else:
        assert len(calls) == 2 * ((2 * 2 + 1) + 2 * 2)  # two forward passes (run, saved): 5 norms, 2 layers x (q, k)
        assert torch.allclose(fused_loss, eager_loss, rtol=1e-6)
        for name, grad in eager_grads.items():
            assert torch.allclose(fused_grads[name], grad, rtol=1e-5, atol=1e-7), name
    assert all(f.apply_rotary_pos_emb is original_rotary[f] for f in files)
    assert not any("forward" in vars(m) for m in model.modules())


def test_trained_norm_weights_keep_transformers_forward():
    """Full fine-tuning trains the norm weights: the Function is not used (their gradient needs x * rstd)."""
    model = _model().train()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    calls = []
    apply = FrozenRMSNorm.apply
    FrozenRMSNorm.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        with fused_norm_and_rotary(model):
            _loss(model, ids).backward()
        assert not calls
        model.requires_grad_(False)
        with fused_norm_and_rotary(model):
            _loss(model, ids)
        assert len(calls) == 2 * 2 + 1
    finally:
        FrozenRMSNorm.apply = apply


def test_only_llamas_formula_is_replaced():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    assert same_formula(Qwen2RMSNorm.forward, llama.LlamaRMSNorm.forward)
    assert not same_formula(GemmaRMSNorm.forward, llama.LlamaRMSNorm.forward)  # scales by (1 + w)
    model = _model("gemma").requires_grad_(False)
    with fused_norm_and_rotary(model):
        assert not any("forward" in vars(m) for m in model.modules())
