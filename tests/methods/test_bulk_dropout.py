"""BulkDropout (methods/dropout.py) against its stated semantics and against torch's own dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.methods.dropout import BulkDropout, drop_positions, use_bulk_dropout


def test_drop_rate_scale_and_expectation_match_the_stated_semantics():
    torch.manual_seed(0)
    p = 0.05
    dropout = BulkDropout(p).train()
    n = 4_000_000
    out = dropout(torch.ones(n))
    kept = out != 0
    # every survivor is scaled by exactly 1 / (1 - p); nothing else appears
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    # drop fraction: binomial, 5 standard deviations (sd = sqrt(p (1 - p) / n) ~ 1.1e-4)
    sd = math.sqrt(p * (1 - p) / n)
    assert abs((~kept).float().mean().item() - p) < 5 * sd
    assert abs(out.mean().item() - 1.0) < 5 * sd / (1 - p)


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3, 0.9])
def test_positions_are_independent_bernoulli_draws(p):
    """The geometric gaps make each element an independent Bernoulli(p) draw: the same rate at the start, the middle
    and the end of the tensor (the running sum must not drift), the same rate right after a dropped element as
    anywhere (no correlation between neighbours), and every index in range, sorted and distinct."""
    torch.manual_seed(2)
    n = 2_000_000
    positions = drop_positions(n, p)
    assert positions.dtype == torch.int64 and int(positions[0]) >= 0 and int(positions[-1]) < n
    assert bool((positions[1:] > positions[:-1]).all())
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[positions] = True
    for part in dropped.view(4, -1):
        sd = math.sqrt(p * (1 - p) / part.numel())
        assert abs(part.float().mean().item() - p) < 5 * sd
    after_drop = dropped[1:][dropped[:-1]]
    sd = math.sqrt(p * (1 - p) / after_drop.numel())
    assert abs(after_drop.float().mean().item() - p) < 5 * sd
    gaps = (positions[1:] - positions[:-1] - 1).float()  # kept elements between drops: geometric, mean (1-p)/p
    mean = (1 - p) / p
    assert abs(gaps.mean().item() - mean) < 5 * math.sqrt((1 - p) / p**2 / gaps.numel())


def test_a_short_first_batch_of_draws_is_continued():
    # far more elements than one batch of draws covers when the rate is tiny relative to the margin: the loop draws
    # again and the positions continue after the last one
    import tunesmith.methods.dropout as dropout_module

    torch.manual_seed(5)
    original = dropout_module.MARGIN_SDS
    dropout_module.MARGIN_SDS = -20  # the first batch falls short of n
    try:
        positions = drop_positions(200_000, 0.2)
    finally:
        dropout_module.MARGIN_SDS = original
    assert bool((positions[1:] > positions[:-1]).all()) and int(positions[-1]) < 200_000
    assert abs(positions.numel() / 200_000 - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 200_000)
    assert int(positions[-1]) > 199_000  # covers the whole tensor, not just the first batch's reach


def test_masks_are_independent_between_calls_and_reproducible_under_a_seed():
    dropout = BulkDropout(0.5).train()
    x = torch.ones(10_000)
    torch.manual_seed(7)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first)
    agree = ((first == 0) == (second == 0)).float().mean().item()
    assert abs(agree - 0.5) < 0.03  # independent masks at p = 0.5 agree half of the time


def test_gradient_is_the_mask_times_the_scale_like_torch_dropout():
    torch.manual_seed(3)
    dropout = BulkDropout(0.2).train()
    x = torch.randn(64, 33, requires_grad=True)
    out = dropout(x)
    out.backward(torch.ones_like(out))
    noise = torch.where(out != 0, 1 / (1 - 0.2), 0.0)
    torch.testing.assert_close(out, x.detach() * noise)
    torch.testing.assert_close(x.grad, noise)


def test_eval_mode_and_zero_rate_pass_the_input_through():
    x = torch.randn(5, 7)
    assert torch.equal(BulkDropout(0.1).eval()(x), x)
    assert torch.equal(BulkDropout(0.0).train()(x), x)


def test_same_distribution_as_torch_dropout_on_a_linear_layer():
    # E[A(dropout(x))] = A x for both; compare the means of many draws of LoRA's A applied to the dropped input.
    torch.manual_seed(4)
    a = torch.randn(4, 16)
    x = torch.randn(20_000, 16)
    ours = (BulkDropout(0.1).train()(x) @ a.T).mean(0)
    theirs = (F.dropout(x, 0.1, True) @ a.T).mean(0)
    exact = (x @ a.T).mean(0)
    torch.testing.assert_close(ours, exact, atol=0.03, rtol=0)
    torch.testing.assert_close(theirs, exact, atol=0.03, rtol=0)


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_lora_methods_install_it_on_every_adapted_layer(tiny_model_dir, name):
    from transformers import AutoModelForCausalLM

    from tunesmith.config import MethodConfig
    from tunesmith.methods.registry import get_method
    from tunesmith.models.load import keep_4bit_kernels

    method = get_method(name)
    config = MethodConfig.model_validate({"name": name, "lora": {"r": 4, "dropout": 0.05}})
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, **method.base_load_kwargs(config))
    keep_4bit_kernels(base)
    model = method.apply(base, config)
    adapted = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert adapted
    assert all(type(m.lora_dropout["default"]) is BulkDropout for m in adapted)
    assert use_bulk_dropout(model) == 0  # idempotent: nothing left to replace


def test_activation_checkpointing_replays_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    dropout = BulkDropout(0.3).train()
    x = torch.randn(32, 16, requires_grad=True)

    def block(t):
        return lin(dropout(t)).tanh()

    torch.manual_seed(11)
    plain = block(x)
    plain.sum().backward()
    grad_plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(11)
    replayed = checkpoint(block, x, use_reentrant=False)
    replayed.sum().backward()
    torch.testing.assert_close(replayed, plain, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad_plain, rtol=0, atol=0)
