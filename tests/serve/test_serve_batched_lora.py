"""The batched multi-LoRA layer against its per-row reference (fp32, 1e-5), and the pure segment helpers."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.serve.batched_lora import (
    BatchContext,
    BatchedLoraLinear,
    lora_delta_bmm,
    lora_delta_reference,
    lora_delta_segments,
    wrap_module,
)
from tunesmith.serve.segments import BASE_SLOT, left_pad, route, segments


def test_route_and_segments_group_rows_and_skip_base():
    r = route([2, BASE_SLOT, 0, 2])
    assert r.rows.tolist() == [0, 2, 3] and r.slots.tolist() == [2, 0, 2] and not r.all_rows
    assert route([1, 0]).all_rows and route([BASE_SLOT, BASE_SLOT]).empty
    assert segments([2, BASE_SLOT, 0, 2]) == [(0, [2]), (2, [0, 3])]


def test_left_pad_positions_match_unpadded_rows():
    ids, mask, pos = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def _stacks(slots=4, rank=6, fan_in=24, fan_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(slots, rank, fan_in, generator=g)
    b = torch.randn(slots, fan_out, rank, generator=g)
    a[1, 3:] = 0  # slot 1 has rank 3, zero-padded to 6
    b[1, :, 3:] = 0
    return a, b


def test_fast_paths_equal_reference_fp32():
    a, b = _stacks()
    x = torch.randn(7, 5, 24, generator=torch.Generator().manual_seed(1))
    slots = [0, BASE_SLOT, 3, 1, 1, BASE_SLOT, 2]
    ref = lora_delta_reference(x, a, b, slots)
    assert ref[1].abs().max() == 0 and ref[5].abs().max() == 0 and ref[0].abs().max() > 1.0
    r = route(slots)
    fast = torch.zeros_like(ref).index_add(0, r.rows, lora_delta_bmm(x, a, b, r))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_delta_segments(x, a, b, slots), ref, rtol=1e-5, atol=1e-5)


def test_rank_padding_adds_exact_zeros():
    a, b = _stacks()
    x = torch.randn(2, 3, 24)
    padded = lora_delta_reference(x, a, b, [1, 1])
    unpadded = (x @ a[1, :3].T) @ b[1, :, :3].T
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)


def test_batched_lora_linear_module_equals_base_plus_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40))
    context = BatchContext()
    layer = wrap_module(model, "0", context)
    assert isinstance(model[0], BatchedLoraLinear) and wrap_module(model, "0", context) is layer
    layer.a_stack, layer.b_stack = _stacks()
    x = torch.randn(5, 4, 24)
    slots = [2, BASE_SLOT, 0, 2, 1]
    base = layer.base(x)
    assert torch.equal(model(x), base)  # no route set: plain base projection
    context.route = route(slots)
    torch.testing.assert_close(model(x), base + lora_delta_reference(x, layer.a_stack, layer.b_stack, slots),
                               rtol=1e-5, atol=1e-5)
    context.route = route([0, 1, 2, 3, 0])  # every row has an adapter: the no-index_add path
    torch.testing.assert_close(model(x), base + lora_delta_reference(x, layer.a_stack, layer.b_stack, [0, 1, 2, 3, 0]),
                               rtol=1e-5, atol=1e-5)
