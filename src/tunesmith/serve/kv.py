"""KV-cache surgery for continuous batching: rows join (left-padded to a common length) and leave between steps.

All rows of the running batch share one cache length L; a row's real tokens are the last `len` columns it owns and
its attention-mask row is 0 on the padding, so padded key/value columns get exactly zero attention weight.
Positions are passed per row (position_ids), so rotary embeddings match the row run alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _pad_left(t: torch.Tensor, extra: int) -> torch.Tensor:
    """Pad dim -2 (sequence) of a (b, heads, seq, dim) tensor on the left with zeros."""
    return F.pad(t, (0, 0, extra, 0)) if extra > 0 else t


def merge(run_cache: DynamicCache | None, run_mask: torch.Tensor | None, new_cache: DynamicCache, new_mask: torch.Tensor):
    """Concatenate two caches along the batch (rows of `new` after rows of `run`), left-padding the shorter one.

    Masks are (b, L) with 1 on real tokens. Returns (cache, mask) with L = max(L_run, L_new).
    """
    if run_cache is None or run_mask is None or run_mask.shape[0] == 0:
        return new_cache, new_mask
    run_len, new_len = run_mask.shape[1], new_mask.shape[1]
    length = max(run_len, new_len)
    for run_layer, new_layer in zip(run_cache.layers, new_cache.layers, strict=True):
        run_layer.keys = torch.cat([_pad_left(run_layer.keys, length - run_len), _pad_left(new_layer.keys, length - new_len)])
        run_layer.values = torch.cat(
            [_pad_left(run_layer.values, length - run_len), _pad_left(new_layer.values, length - new_len)]
        )
    mask = torch.cat([F.pad(run_mask, (length - run_len, 0)), F.pad(new_mask, (length - new_len, 0))])
    return run_cache, mask


def keep_rows(cache: DynamicCache, mask: torch.Tensor, keep: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only rows `keep`, then drop leading columns that are padding in every remaining row."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, keep)
        layer.values = layer.values.index_select(0, keep)
    mask = mask.index_select(0, keep)
    if mask.shape[0] == 0:
        return cache, mask
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1]
    if first > 0:
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        mask = mask[:, first:]
    return cache, mask
