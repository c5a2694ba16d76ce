"""KV-cache surgery for continuous batching: rows join (left-padded to a common length) and leave between steps.

All rows of the running batch share one cache length L; a row's real tokens are the last `len` columns it owns and
its attention-mask row is 0 on the padding, so padded key/value columns get exactly zero attention weight.
Positions are passed per row (position_ids), so rotary embeddings match the row run alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowableLayer(DynamicLayer):
    """A full-attention cache layer that appends into spare capacity instead of concatenating.

    Why not transformers' DynamicLayer: it runs torch.cat over the whole cache on every decode step, so each step
    allocates and copies the entire KV cache of every layer (batch 32 x ~70 tokens on SmolLM2-135M: ~90 MB a step).
    Profiled on this machine, that cat cost 15-40% of a decode step and varied 3-10x between runs with the heap's
    state. Here a step writes its new columns in place and returns views; the buffer grows by half its length when
    full (amortised O(1) per token). StaticCache does not fit: continuous batching changes the batch rows every few
    steps (kv.merge / kv.keep_rows assign `keys` / `values`, which simply become the new buffers).
    """

    def __init__(self, **kwargs) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._klen = self._vlen = 0
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._klen]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._k, self._klen = tensor, (0 if tensor is None or tensor.dim() < 2 else tensor.shape[-2])

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._vlen]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._v, self._vlen = tensor, (0 if tensor is None or tensor.dim() < 2 else tensor.shape[-2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    @staticmethod
    def _append(buffer: torch.Tensor, length: int, new: torch.Tensor) -> torch.Tensor:
        need = length + new.shape[-2]
        if buffer.dim() != 4 or need > buffer.shape[-2] or buffer.shape[0] != new.shape[0]:
            grown = new.new_empty(*new.shape[:2], need + max(16, need // 2), new.shape[-1])
            grown[:, :, :length] = buffer[:, :, :length]
            buffer = grown
        buffer[:, :, length:need] = new
        return buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k = self._append(self._k, self._klen, key_states)
        self._v = self._append(self._v, self._vlen, value_states)
        self._klen += key_states.shape[-2]
        self._vlen += value_states.shape[-2]
        return self.keys, self.values


def new_cache(config) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers are GrowableLayer (see there for why)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowableLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


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
