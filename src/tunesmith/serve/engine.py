"""The serving engine: one base model, many LoRA adapters, continuous batching with a KV cache.

One background thread runs the loop:  poll the adapter cache → admit waiting requests whose adapter is hot
(prefilled together, left-padded, each row with its own adapter) → one decode step for every running row →
finished rows leave. New requests therefore join between decode steps, and a request whose adapter is still
loading waits without holding up the others. Each request has its own max_tokens, stop strings, temperature,
top-p and seed (its own torch.Generator), so its output does not depend on what else shares the batch.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tunesmith.serve import kv
from tunesmith.serve.adapters import AdapterSpec, inspect_adapter
from tunesmith.serve.batched_lora import BatchContext, linear_shapes
from tunesmith.serve.cache import AdapterCache
from tunesmith.serve.identity import BaseIdentity
from tunesmith.serve.segments import BASE_SLOT, left_pad, route

BASE = "base"
_ids = itertools.count()


@dataclass(frozen=True)
class GenResult:
    """What a finished request produced: the payload of its "done" event and what `Engine.generate` returns."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string), "length", or "cancelled" (see GenRequest.cancel)
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # submit to last token
    ttft_s: float  # submit to first token


@dataclass(frozen=True)
class GenError:
    """A request that failed: the payload of its "error" event. `status` is the HTTP status the API answers."""

    status: int
    message: str


@dataclass
class GenRequest:
    """One generation request. `on_event(kind, payload)` is called on the engine thread:
    ("token", text_delta) while generating, then ("done", GenResult) or ("error", GenError)."""

    prompt_ids: list[int]
    adapter: str | None = None  # None or "base" = the base model alone
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_event: Callable[[str, Any], None] = lambda kind, payload: None
    id: int = field(default_factory=lambda: next(_ids))
    # state, owned by the engine thread
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    slot: int = BASE_SLOT
    tried: bool = False
    cancelled: bool = False  # set through cancel(), from any thread; the engine drops the row at its next step
    cancel_reason: str = ""
    ignore_eos: bool = False  # benchmarks: always generate max_tokens (same work in every compared mode)
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def cancel(self, reason: str) -> None:
        """Stop generating (the client went away or stopped reading): the row and its adapter pin are freed at the
        engine's next step, and the request finishes with finish_reason "cancelled"."""
        self.cancel_reason = self.cancel_reason or reason
        self.cancelled = True


class Engine:
    def __init__(self, model, tokenizer, *, cache_budget_bytes: int = 512 << 20, max_batch_size: int = 32,
                 max_model_len: int | None = None, base_names: set[str] | None = None,
                 base: BaseIdentity | None = None, allow_base_mismatch: bool = False, on_step=None) -> None:
        self.model = model.eval()
        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers} - {DynamicLayer.__name__}
        if kinds:  # kv.merge/keep_rows edit full-attention layers; sliding or hybrid layers would need their own
            raise ValueError(f"{type(model).__name__} uses {sorted(kinds)} KV-cache layers; the serving engine "
                             "supports full-attention models (Llama, Qwen2, SmolLM2, ...) only")
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context = BatchContext()
        self.cache = AdapterCache(model, self.context, cache_budget_bytes)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len or int(getattr(model.config, "max_position_embeddings", 2048))
        if base is None:  # named only: its local folder (for the fingerprint) is the first name that is a model folder
            names = set(base_names or ()) | {str(getattr(model.config, "_name_or_path", "") or "")} - {""}
            base = BaseIdentity.of(*sorted(names, key=lambda n: not Path(n).is_dir())) if names else BaseIdentity(set())
        self.base = base
        self.allow_base_mismatch = allow_base_mismatch
        self.shapes = linear_shapes(model)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.on_step = on_step  # called with the batch size of every forward pass (metrics)
        self.pending: deque[GenRequest] = deque()
        self.rows: list[GenRequest] = []
        self.kv_cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.steps = 0
        self.cancelled = 0  # requests finished by cancel() (client gone or too slow)
        self._last_slots: list[int] = []
        self._route = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, path, tenant: str | None = None, source: str = "") -> AdapterSpec:
        """Check an adapter against the base (config, safetensors, shapes) and register it (cold until used)."""
        if name == BASE:
            raise ValueError("the adapter name 'base' is reserved for the base model")
        spec = inspect_adapter(name, path, self.shapes, self.base, self.allow_base_mismatch)
        spec.tenant, spec.source = tenant, source or str(path)
        self.cache.register(spec)
        return spec

    def remove_adapter(self, name: str) -> bool:
        return self.cache.unregister(name)

    def adapter_names(self) -> list[str]:
        return self.cache.names()

    def adapter_spec(self, name: str) -> AdapterSpec | None:
        return self.cache.spec(name)

    def is_hot(self, name: str) -> bool:
        """Whether the adapter currently sits in a cache slot (a snapshot: the engine thread may change it)."""
        return self.cache.is_hot(name)

    def stats(self) -> dict[str, int]:
        """Counters for /health and /metrics, readable from any thread: running rows, waiting requests, adapter
        pins held by running rows, requests cancelled so far, forward passes, plus the adapter cache's counters."""
        return {**self.cache.stats(), "running": len(self.rows), "pending": len(self.pending),
                "cancelled": self.cancelled, "steps": self.steps}

    # ------------------------------------------------------------------ requests
    def submit(self, request: GenRequest) -> GenRequest:
        if request.adapter == BASE:
            request.adapter = None
        if request.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(int(request.seed))
        elif request.temperature > 0:
            request.generator = torch.Generator(device=self.device).manual_seed(torch.seed() & 0xFFFFFFFF)
        with self._cond:
            self.pending.append(request)
            self._cond.notify()
        return request

    def generate(self, requests: list[GenRequest], timeout: float = 120.0) -> list[GenResult | GenError]:
        """Blocking helper (tests, benchmarks): submit all, wait for all; returns each request's GenResult/GenError."""
        results: list[Any] = [None] * len(requests)
        done = threading.Semaphore(0)

        def hook(i):
            def on_event(kind, payload):
                if kind in ("done", "error"):
                    results[i] = payload
                    done.release()
            return on_event

        for i, request in enumerate(requests):
            request.on_event = hook(i)
            self.submit(request)
        deadline = time.monotonic() + timeout
        for _ in requests:
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"generation did not finish within {timeout} s")
        return results

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)
        self.cache.close()

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.pending and not self.rows:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self.cache.poll()
                joiners = self._admit()
                with torch.inference_mode():
                    if joiners:
                        self._prefill(joiners)
                    if self.rows:
                        self._decode()
                if not joiners and not self.rows:
                    time.sleep(0.002)  # only requests whose adapter is loading: wait for the loader
            except Exception as exc:  # one bad step must not take the server down: fail its rows, keep serving
                for request in self.rows:
                    self._finish_error(request, 500, f"generation failed: {type(exc).__name__}: {exc}")
                self.rows, self.kv_cache, self.mask = [], None, None

    def _admit(self) -> list[GenRequest]:
        joiners: list[GenRequest] = []
        with self._cond:
            waiting = list(self.pending)
            self.pending.clear()
        keep: list[GenRequest] = []
        for request in waiting:
            if request.cancelled:  # gone before it started: never prefilled
                self._finish(request, "cancelled", "")
                continue
            if len(self.rows) + len(joiners) >= self.max_batch_size:
                keep.append(request)
                continue
            if request.adapter is None:
                joiners.append(request)
                continue
            failed = self.cache.failed.get(request.adapter)
            if failed is not None:
                self._finish_error(request, 503, f"adapter '{request.adapter}' could not be loaded: {failed}")
                continue
            try:
                slot = self.cache.acquire(request.adapter, first_try=not request.tried)
            except KeyError:
                self._finish_error(request, 404, f"model '{request.adapter}' does not exist")
                continue
            request.tried = True
            if slot is None:
                keep.append(request)
            else:
                request.slot = slot
                joiners.append(request)
        with self._cond:
            self.pending.extendleft(reversed(keep))
        return joiners

    def _forward(self, requests: list[GenRequest], ids, mask, positions, cache: DynamicCache) -> torch.Tensor:
        # Same slots and no slot rewritten since the last step: keep the route object, so layers reuse their gathers.
        slots = [*(r.slot for r in requests), -2 - self.cache.counters["loads"]]
        if slots != self._last_slots:
            self._last_slots, self._route = slots, route(slots[:-1], self.device)
        self.context.route = self._route
        try:
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=positions.to(self.device), cache=cache, use_cache=True,
                             logits_to_keep=1)
        finally:
            self.context.route = None
        self.steps += 1
        if self.on_step:
            self.on_step(len(requests))
        return out.logits[:, -1, :].float()

    def _prefill(self, joiners: list[GenRequest]) -> None:
        """Run the joiners' prompts together (left-padded, mixed adapters), sample their first token, merge caches."""
        ids, mask, positions = left_pad([r.prompt_ids for r in joiners], self.pad_id)
        cache = kv.new_cache(self.model.config)
        logits = self._forward(joiners, ids, mask, positions, cache)
        finished = self._advance(joiners, logits)
        keep = torch.tensor([i for i in range(len(joiners)) if i not in finished], dtype=torch.long)
        mask = mask.to(self.device)
        if keep.numel() < len(joiners):
            cache, mask = kv.keep_rows(cache, mask, keep.to(self.device))
        if keep.numel():
            self.kv_cache, self.mask = kv.merge(self.kv_cache, self.mask, cache, mask)
            self.rows.extend(joiners[i] for i in keep.tolist())

    def _decode(self) -> None:
        rows = self.rows
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long)
        positions = torch.tensor([[len(r.prompt_ids) + len(r.generated) - 1] for r in rows], dtype=torch.long)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(rows, ids, self.mask, positions, self.kv_cache)
        finished = self._advance(rows, logits)
        if finished:
            keep = torch.tensor([i for i in range(len(rows)) if i not in finished], dtype=torch.long, device=self.device)
            self.kv_cache, self.mask = kv.keep_rows(self.kv_cache, self.mask, keep)
            self.rows = [rows[i] for i in keep.tolist()]
            if not self.rows:
                self.kv_cache, self.mask = None, None

    # ------------------------------------------------------------------ tokens
    def _advance(self, requests: list[GenRequest], logits: torch.Tensor) -> set[int]:
        """Sample one token per row, stream it, and return the indices of rows that finished."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, request in enumerate(requests):
            if request.temperature > 0:
                tokens[i] = sample(logits[i], request.temperature, request.top_p, request.generator)
        finished = set()
        now = time.perf_counter()
        for i, (request, token) in enumerate(zip(requests, tokens, strict=True)):
            request.first_token = request.first_token or now
            if request.cancelled:
                self._finish(request, "cancelled", "")
                finished.add(i)
                continue
            if token in self.eos_ids and not request.ignore_eos:
                self._finish(request, "stop")
                finished.add(i)
                continue
            request.generated.append(token)
            text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
            hit = min((text.find(s) for s in request.stop if s and s in text), default=-1)
            if hit >= 0:
                self._emit(request, text[:hit], final=True)
                self._finish(request, "stop", text[:hit])
                finished.add(i)
                continue
            length_done = len(request.generated) >= request.max_tokens
            context_done = len(request.prompt_ids) + len(request.generated) >= self.max_model_len
            self._emit(request, text, final=length_done or context_done)
            if length_done or context_done:
                self._finish(request, "length", text)
                finished.add(i)
        return finished

    def _emit(self, request: GenRequest, text: str, final: bool) -> None:
        """Stream new text, holding back what could still become a stop string or half a UTF-8 character."""
        safe = len(text)
        if not final:
            hold = max((len(s) - 1 for s in request.stop if s), default=0)
            safe = max(request.emitted, len(text) - hold)
            while safe > request.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > request.emitted:
            request.on_event("token", text[request.emitted:safe])
            request.emitted = safe

    def _finish(self, request: GenRequest, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
            self._emit(request, text, final=True)
        self._unpin(request)
        if reason == "cancelled":
            self.cancelled += 1
        now = time.perf_counter()
        request.on_event("done", GenResult(
            text=text, token_ids=list(request.generated), finish_reason=reason,
            prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.generated),
            latency_s=now - request.submitted, ttft_s=(request.first_token or now) - request.submitted,
        ))

    def _finish_error(self, request: GenRequest, status: int, message: str) -> None:
        self._unpin(request)
        request.on_event("error", GenError(status, message))

    def _unpin(self, request: GenRequest) -> None:
        if request.slot != BASE_SLOT:
            self.cache.release(request.slot)
            request.slot = BASE_SLOT


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Nucleus sampling (Holtzman et al. 2020): softmax(logits / T), keep the smallest top set with mass >= top_p."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already reaches top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
