"""GrowableLayer (in-place KV appends) against transformers' DynamicLayer (torch.cat per step), through the
engine's cache surgery (rows leaving via keep_rows, rows joining via merge)."""

import torch
from transformers import DynamicCache

from tunesmith.serve import kv
from tunesmith.serve.kv import GrowableLayer


def _pair(batch: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g)


def _layers(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def test_growable_equals_dynamic_through_appends_keep_rows_and_merge(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    ours, theirs = kv.new_cache(config), DynamicCache(config=config)
    assert all(isinstance(layer, GrowableLayer) for layer in ours.layers)
    n = len(ours.layers)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, :2] = 0
    for step, length in enumerate([5, 1, 1, 1]):  # prefill, then decode steps (several grow the buffer)
        for i in range(n):
            k, v = _pair(3, length, 100 * step + i)
            got, want = ours.update(k, v, i), theirs.update(k, v, i)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    mask = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], dim=1)
    keep = torch.tensor([0, 2])
    ours, m1 = kv.keep_rows(ours, mask, keep)
    theirs, m2 = kv.keep_rows(theirs, mask, keep)
    assert torch.equal(m1, m2)
    new_ours, new_theirs = kv.new_cache(config), DynamicCache(config=config)
    for i in range(n):
        k, v = _pair(2, 3, 7000 + i)
        new_ours.update(k, v, i)
        new_theirs.update(k, v, i)
    ours, m1 = kv.merge(ours, m1, new_ours, torch.ones(2, 3, dtype=torch.long))
    theirs, m2 = kv.merge(theirs, m2, new_theirs, torch.ones(2, 3, dtype=torch.long))
    assert torch.equal(m1, m2)
    for step in range(20):  # decode after the surgery, through several regrowths
        for i in range(n):
            k, v = _pair(4, 1, 9000 + 100 * step + i)
            got, want = ours.update(k, v, i), theirs.update(k, v, i)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ours.get_seq_length() == theirs.get_seq_length() == m1.shape[1] + 20
    for (ko, vo), (kt, vt) in zip(_layers(ours), _layers(theirs), strict=True):
        assert torch.equal(ko, kt) and torch.equal(vo, vt)
