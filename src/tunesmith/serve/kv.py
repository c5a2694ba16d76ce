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
    state. Here `keys` / `values` stay plain tensors (as in DynamicLayer), each a prefix view of a buffer with spare
    capacity; a step writes its new columns into the buffer, which grows by half its length when full (amortised
    O(1) per token). StaticCache does not fit: continuous batching changes the batch rows every few steps, and
    kv.merge / kv.keep_rows (or DynamicLayer.crop) assign new `keys` / `values`; the next append sees that they are
    no longer a view of its buffer and starts a new one from them.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._buffers: dict[str, torch.Tensor] = {}  # "keys" / "values" -> the buffer their tensor is a prefix of

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]  # 4-D and empty (DynamicLayer: 1-D)
        self.is_initialized = True

    def _append(self, name: str, current: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """current (b, h, L, d) then new (b, h, n, d): a (b, h, L + n, d) prefix view of the buffer for `name`."""
        length, need = current.shape[-2], current.shape[-2] + new.shape[-2]
        buffer = self._buffers.get(name)
        if (buffer is None or current.data_ptr() != buffer.data_ptr() or current.shape[0] != buffer.shape[0]
                or need > buffer.shape[-2]):
            buffer = new.new_empty(*new.shape[:2], need + max(16, need // 2), new.shape[-1])
            buffer[:, :, :length] = current
            self._buffers[name] = buffer
        buffer[:, :, length:need] = new
        return buffer[:, :, :need]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._append("keys", self.keys, key_states)
        self.values = self._append("values", self.values, value_states)
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
