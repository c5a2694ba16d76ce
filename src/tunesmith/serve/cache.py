"""Adapter cache: hot adapters live in slots of the stacked LoRA weights; cold ones stay on their safetensors file.

Memory: every hot adapter occupies one slot of every wrapped module's stacks, so a slot costs
    slot_bytes = sum over wrapped modules of r_max * (in + out) * bytes_per_element
and at most budget // slot_bytes adapters are hot. A miss starts a load on a background thread (file read and
checks); the engine thread installs the loaded tensors into a slot between steps (a few small copies), evicting the
least recently used adapter that no running request holds. Requests for other adapters keep decoding meanwhile.
Counters: hits, misses, loads, evictions, load_errors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from tunesmith.serve.adapters import AdapterError, AdapterSpec, read_weights
from tunesmith.serve.batched_lora import BatchContext, BatchedLoraLinear, wrap_module


def parse_bytes(text: str | int) -> int:
    """'512MB' -> 536870912; also KB/GB/B and plain integers (bytes)."""
    if isinstance(text, int):
        return text
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "B": 1}
    raw = str(text).strip().upper().replace(" ", "")
    for unit, factor in units.items():
        if raw.endswith(unit) and raw[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(raw[: -len(unit)]) * factor)
    if raw.isdigit():
        return int(raw)
    raise ValueError(f"cache budget {text!r}: expected a size like 512MB, 2GB or a number of bytes")


class AdapterCache:
    def __init__(self, model: nn.Module, context: BatchContext, budget_bytes: int) -> None:
        self.model = model
        self.context = context
        self.budget_bytes = budget_bytes
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.specs: dict[str, AdapterSpec] = {}
        self.hot: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.pins: dict[int, int] = {}  # slot -> running requests using it (a pinned slot is never reused)
        self.pinned = 0  # sum of pins, kept as one int so other threads can read it while the engine thread writes
        self._invalid: set[str] = set()  # names whose hot copy must go (unloaded or re-pointed), applied in poll()
        self.loading: dict[str, Future] = {}
        self.failed: dict[str, str] = {}  # name -> load error, reported to the requests waiting for it
        self.wrapped: dict[str, BatchedLoraLinear] = {}
        self.rank = 0
        self.capacity = 0
        self.counters = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0, "load_errors": 0}
        self._lock = threading.Lock()  # guards specs (the API thread registers while the engine thread reads)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")

    # ---------------------------------------------------------------- registration (any thread)
    def register(self, spec: AdapterSpec) -> None:
        need = self._slot_bytes(spec)
        if need > self.budget_bytes:
            raise AdapterError(
                f"{spec.path}: adapter '{spec.name}' needs {need} bytes per cache slot but --cache-budget is "
                f"{self.budget_bytes} bytes; raise --cache-budget"
            )
        with self._lock:
            old = self.specs.get(spec.name)
            self.specs[spec.name] = spec
            self.failed.pop(spec.name, None)
            if old is not None and old.path != spec.path:
                self._invalid.add(spec.name)

    def unregister(self, name: str) -> bool:
        with self._lock:
            found = self.specs.pop(name, None) is not None
            self._invalid.add(name)
        return found

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.specs)

    def spec(self, name: str) -> AdapterSpec | None:
        with self._lock:
            return self.specs.get(name)

    def is_hot(self, name: str) -> bool:
        return name in self.hot  # one dict lookup: safe to call while the engine thread edits `hot`

    # ---------------------------------------------------------------- engine thread
    def acquire(self, name: str, first_try: bool) -> int | None:
        """Slot for `name` pinned for one request, or None while it loads (a load is started on a miss)."""
        if name in self.hot:
            if first_try:
                self.counters["hits"] += 1
            self.hot.move_to_end(name)
            slot = self.hot[name]
            self.pins[slot] = self.pins.get(slot, 0) + 1
            self.pinned += 1
            return slot
        if first_try:
            self.counters["misses"] += 1
        if name not in self.loading:
            spec = self.spec(name)
            if spec is None:
                raise KeyError(name)
            self.loading[name] = self._loader.submit(read_weights, spec, self.dtype)
        return None

    def release(self, slot: int) -> None:
        self.pinned -= 1
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            del self.pins[slot]

    def poll(self) -> None:
        """Between steps: drop stale copies, install finished loads (evicting LRU unpinned adapters to make room)."""
        with self._lock:
            invalid, self._invalid = self._invalid, set()
        for name in invalid:
            self.hot.pop(name, None)  # its slot stays pinned (not reused) until its running requests finish
        for name, future in list(self.loading.items()):
            if not future.done():
                continue
            try:
                weights = future.result()
                spec = self.spec(name)
                if spec is None:
                    raise AdapterError(f"adapter '{name}' was unloaded while loading")
            except Exception as exc:  # reported to the waiting requests; the server stays up
                del self.loading[name]
                self.counters["load_errors"] += 1
                self.failed[name] = str(exc)
                continue
            slot = self._free_slot(spec)
            if slot is None:
                continue  # every slot is held by running requests: retry after the next step
            del self.loading[name]
            self._install(spec, weights, slot)
            self.hot[name] = slot
            self.counters["loads"] += 1

    def _slot_bytes(self, spec: AdapterSpec | None = None) -> int:
        rank = max(self.rank, spec.rank if spec else 0)
        wrapped = dict(self.wrapped)  # one C-level copy under the GIL: other threads (register, /metrics) read it
        modules = {n: (w.in_features, w.out_features) for n, w in wrapped.items()}
        if spec:
            modules.update({n: (i, o) for n, (_, i, o) in spec.modules.items()})
        return sum(rank * (i + o) for i, o in modules.values()) * torch.finfo(self.dtype).bits // 8

    def max_hot(self, spec: AdapterSpec | None = None) -> int:
        return max(1, self.budget_bytes // max(1, self._slot_bytes(spec)))

    def _free_slot(self, spec: AdapterSpec) -> int | None:
        limit = self.max_hot(spec)
        while len(self.hot) >= limit:
            victim = next((n for n, s in self.hot.items() if s not in self.pins), None)
            if victim is None:
                return None
            del self.hot[victim]  # cold again: its weights stay on their safetensors file
            self.counters["evictions"] += 1
        used = set(self.hot.values()) | set(self.pins)
        return next(s for s in range(len(used) + 1) if s not in used)

    def _install(self, spec: AdapterSpec, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], slot: int) -> None:
        for module in spec.modules:
            if module not in self.wrapped:
                self.wrapped[module] = wrap_module(self.model, module, self.context)
        self._grow(max(self.rank, spec.rank), max(self.capacity, slot + 1))
        with torch.no_grad():
            for module, layer in self.wrapped.items():
                layer.a_stack[slot].zero_()
                layer.b_stack[slot].zero_()
                if module in weights:
                    a, b = weights[module]
                    layer.a_stack[slot, : a.shape[0]].copy_(a)
                    layer.b_stack[slot, :, : b.shape[1]].copy_(b)

    def _grow(self, rank: int, capacity: int) -> None:
        """Reallocate stacks (zero-padded) when the max rank, the slot count or the wrapped set grows."""
        if capacity > self.capacity:
            capacity = max(capacity, min(2 * self.capacity, self.max_hot() + 1))
        for layer in self.wrapped.values():
            old_a, old_b = layer.a_stack, layer.b_stack
            if old_a is not None and old_a.shape[0] >= capacity and old_a.shape[1] == rank:
                continue
            # Stored slot-major in the layout bmm wants, (slots, in, r) and (slots, r, out), and exposed through
            # transposed views with the documented (slots, r, in) / (slots, out, r) shapes: gathering rows' weights
            # is then one index_select that is already contiguous (see batched_lora.gather).
            a = torch.zeros(capacity, layer.in_features, rank, dtype=self.dtype, device=self.device).transpose(1, 2)
            b = torch.zeros(capacity, rank, layer.out_features, dtype=self.dtype, device=self.device).transpose(1, 2)
            if old_a is not None:
                n, r = old_a.shape[0], old_a.shape[1]
                a[:n, :r] = old_a
                b[:n, :, :r] = old_b
            layer.a_stack, layer.b_stack = a, b
        self.rank, self.capacity = rank, max(capacity, self.capacity)

    def stats(self) -> dict:
        return {**self.counters, "hot": len(self.hot), "registered": len(self.specs), "loading": len(self.loading),
                "pinned": self.pinned, "slot_bytes": self._slot_bytes(), "budget_bytes": self.budget_bytes}

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
