"""OpenAI-compatible HTTP API over the engine (FastAPI): completions, chat completions (both with SSE streaming),
models, health, Prometheus metrics, user feedback, and admin endpoints for adapters and A/B aliases.

Errors are OpenAI-style JSON bodies {"error": {"message", "type", "param", "code"}}: 401 bad key, 404 unknown model
(also for a model that exists but belongs to another tenant: the same answer, so names do not leak across tenants),
413 body too large, 422 bad parameters, 400 prompt + max_tokens over the context, 503 an adapter that failed to
load. A client that disconnects, or a streaming client that stops reading, has its generation cancelled (its batch
row and adapter pin freed; counted in tunesmith_cancelled_requests_total); the answer it no longer reads is 499.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.adapters import AdapterError
from tunesmith.serve.engine import BASE, Engine, GenRequest, GenResult
from tunesmith.serve.metrics import ServeMetrics
from tunesmith.serve.router import OPEN, ABRouter, Tenants


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_body(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


# ---------------------------------------------------------------------------------------- bodies
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1, le=1 << 16)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = Field(None, max_length=256)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(422, "stop: at most 4 stop sequences", param="stop", code="invalid_value")
        return stops


class CompletionBody(_Sampling):
    prompt: str | list[int] = Field(..., min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 16)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=128)
    path: str
    tenant: str | None = None


class WeightsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, float]
    tenant: str | None = None


class VariantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    score: float = Field(..., ge=-1.0, le=1.0)
    comment: str | None = Field(None, max_length=2000)


# ---------------------------------------------------------------------------------------- state
@dataclass
class ServerState:
    engine: Engine
    tenants: Tenants
    ab: ABRouter
    metrics: ServeMetrics
    admin_key: str | None = None
    model_name: str = "base"
    max_body_bytes: int = 1 << 20
    max_stream_backlog: int = 256  # a streaming client this many chunks behind is cut off (see _relay)
    served: OrderedDict | None = None  # response id -> (tenant, alias, variant), for feedback

    def __post_init__(self) -> None:
        self.served = OrderedDict()

    def remember(self, response_id: str, tenant: str, alias: str | None, variant: str | None) -> None:
        self.served[response_id] = (tenant, alias, variant)
        while len(self.served) > 100_000:
            self.served.popitem(last=False)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def _tenant(state: ServerState, request: Request) -> str:
    tenant = state.tenants.tenant_for(_bearer(request))
    if tenant is None:
        raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", "authentication_error",
                       "invalid_api_key")
    return tenant


def _admin(state: ServerState, request: Request) -> None:
    import hmac

    if state.admin_key is None:
        raise APIError(403, "admin endpoints are off; start the server with --admin-key-file", "permission_error")
    if not hmac.compare_digest((_bearer(request) or "").encode(), state.admin_key.encode()):
        raise APIError(401, "invalid admin key", "authentication_error", "invalid_api_key")


def _no_such_model(model: str) -> APIError:
    return APIError(404, f"model '{model}' does not exist; GET /v1/models lists the ones you may use",
                    code="model_not_found", param="model")


def _resolve(state: ServerState, tenant: str, model: str, user: str | None) -> tuple[str | None, str | None, str]:
    """model field -> (adapter name or None for base, alias or None, variant or None).

    A model this tenant may not use gets exactly the answer of a model that does not exist (404, same body with
    the requested name), so one tenant cannot learn which adapter or alias names another tenant has.
    """
    if not state.tenants.may_use(tenant, model):
        raise _no_such_model(model)
    alias, variant = None, None
    if model in state.ab.weights:
        alias, variant = model, state.ab.choose(model, user)
        model = variant
    if model == BASE:
        return None, alias, variant or BASE
    if state.engine.adapter_spec(model) is None:
        raise _no_such_model(model)
    return model, alias, variant or model


def _visible_models(state: ServerState, tenant: str) -> list[dict]:
    names = [BASE, *state.engine.adapter_names(), *sorted(state.ab.weights)]
    return [{"id": n, "object": "model", "created": 0, "owned_by": state.tenants.owner(n) or "shared"}
            for n in names if state.tenants.may_use(tenant, n)]


# ---------------------------------------------------------------------------------------- generation
def _check_prompt(state: ServerState, prompt_ids: list[int], max_tokens: int) -> None:
    vocab = int(getattr(state.engine.model.config, "vocab_size", 0) or 0)
    if not prompt_ids:
        raise APIError(422, "the prompt is empty after tokenization", code="invalid_value", param="prompt")
    if vocab and any(not 0 <= t < vocab for t in prompt_ids):  # would fail the whole batch's forward pass
        raise APIError(422, f"prompt token ids must be in [0, {vocab})", code="invalid_value", param="prompt")
    limit = state.engine.max_model_len
    if len(prompt_ids) + max_tokens > limit:
        raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                       f"context of {limit} tokens; shorten the prompt or lower max_tokens",
                       code="context_length_exceeded", param="max_tokens")


def _relay(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, gen: GenRequest, backlog: int | None):
    """The request's on_event: engine thread -> event loop queue.

    A streaming client that stops reading leaves its socket full, so the response stops pulling from `queue` and
    the queue grows; past `backlog` unread events the request is cancelled, which frees its batch row and adapter
    pin at the engine's next step instead of when max_tokens is reached (and bounds what the queue holds). "Full"
    means the kernel's send buffer (autotuned up to 4 MiB on Linux; capped by `send_buffer_bytes`) plus uvicorn's
    64 KiB write buffer: an answer smaller than that is simply generated to the end, and its row freed then.
    """

    def on_event(kind: str, payload) -> None:
        if backlog is not None and kind == "token" and queue.qsize() > backlog:
            gen.cancel(f"the client left {backlog} chunks unread")
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            gen.cancel("server shutting down")

    return on_event


async def _cancel_on_disconnect(request: Request, gen: GenRequest) -> None:
    """Cancel `gen` when the client disconnects (the ASGI server sends http.disconnect). The request body has been
    read by then, so the next message on `receive` is the disconnect (or the end of the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gen.cancel("the client disconnected")


async def _run(state: ServerState, request: Request, body: _Sampling, prompt_ids: list[int], chat: bool):
    tenant = _tenant(state, request)
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or 16
    _check_prompt(state, prompt_ids, max_tokens)
    adapter, alias, variant = _resolve(state, tenant, body.model, body.user)
    queue: asyncio.Queue = asyncio.Queue()
    gen = GenRequest(prompt_ids=prompt_ids, adapter=adapter, max_tokens=max_tokens, temperature=body.temperature,
                     top_p=body.top_p, seed=body.seed, stop=body.stops())
    gen.on_event = _relay(asyncio.get_running_loop(), queue, gen, state.max_stream_backlog if body.stream else None)
    state.engine.submit(gen)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    state.remember(rid, tenant, alias, variant)
    meta = {"id": rid, "created": int(time.time()), "model": body.model, "variant": variant, "alias": alias,
            "label": adapter or BASE}
    watcher = asyncio.create_task(_cancel_on_disconnect(request, gen))
    if body.stream:
        return _stream(state, gen, queue, meta, chat, watcher)
    try:
        while (event := await queue.get())[0] == "token":
            pass
    finally:
        watcher.cancel()
    kind, payload = event
    if kind == "error":
        _record(state, meta, payload.status, None)
        raise APIError(payload.status, payload.message, "server_error" if payload.status >= 500 else
                       "invalid_request_error")
    _record(state, meta, 499 if payload.finish_reason == "cancelled" else 200, payload)
    return _final_body(meta, payload, chat)


def _record(state: ServerState, meta: dict, status: int, result: GenResult | None) -> None:
    m, label, variant = state.metrics, meta["label"], meta["variant"] or ""
    m.requests.labels(label, variant, str(status)).inc()
    if result is None or status != 200:
        m.errors.labels(label, variant, str(status)).inc()
        return
    m.prompt_tokens.labels(label).inc(result.prompt_tokens)
    m.completion_tokens.labels(label).inc(result.completion_tokens)
    m.latency.labels(label, variant).observe(result.latency_s)
    m.ttft.labels(label).observe(result.ttft_s)


def _final_body(meta: dict, result: GenResult, chat: bool) -> JSONResponse:
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
             "total_tokens": result.prompt_tokens + result.completion_tokens}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": result.finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
    body = {"id": meta["id"], "object": "chat.completion" if chat else "text_completion", "created": meta["created"],
            "model": meta["model"], "choices": [choice], "usage": usage, "tunesmith_variant": meta["variant"]}
    return JSONResponse(body, headers={"x-tunesmith-variant": meta["variant"] or ""})


def _stream(state: ServerState, gen: GenRequest, queue: asyncio.Queue, meta: dict, chat: bool,
            watcher: asyncio.Task) -> StreamingResponse:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
        body = {"id": meta["id"], "object": obj, "created": meta["created"], "model": meta["model"],
                "choices": [choice], "tunesmith_variant": meta["variant"]}
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        try:
            if chat:
                yield chunk(None, None, first=True)
            while (event := await queue.get())[0] == "token":
                yield chunk(event[1], None)
            kind, payload = event
            if kind == "done" and payload.finish_reason != "cancelled":
                _record(state, meta, 200, payload)
                yield chunk(None, payload.finish_reason)
            else:
                status, message = ((payload.status, payload.message) if kind == "error"
                                   else (499, f"stream cancelled: {gen.cancel_reason}"))
                _record(state, meta, status, None)
                err = {"error": {"message": message, "type": "server_error", "param": None, "code": status}}
                yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel("the client went away")  # a client that went away stops costing decode steps
            watcher.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"x-tunesmith-variant": meta["variant"] or "", "cache-control": "no-cache"})


# ---------------------------------------------------------------------------------------- app
class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_body(413, f"request body over {self.limit} bytes", "invalid_request_error", "body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooBig()
            return message

        try:
            return await self.app(scope, counted, send)
        except _TooBig:
            return await too_big(scope, receive, send)


class _TooBig(Exception):
    pass


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tunesmith serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.add_middleware(BodyLimit, limit=state.max_body_bytes)
    _error_handlers(app)
    _generation_routes(app, state)
    _info_routes(app, state)
    _adapter_admin_routes(app, state)
    _alias_admin_routes(app, state)
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_body(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()]
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        return error_body(422, "; ".join(parts), "invalid_request_error", "invalid_value",
                          ".".join(str(p) for p in first if p != "body") or None)


def _generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        _tenant(state, request)
        ids = body.prompt if isinstance(body.prompt, list) else state.engine.tokenizer(body.prompt)["input_ids"]
        return await _run(state, request, body, list(ids), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        _tenant(state, request)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        ids = state.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return await _run(state, request, body, list(ids), chat=True)


def _info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": _visible_models(state, _tenant(state, request))}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody, request: Request):
        tenant = _tenant(state, request)
        served = state.served.get(body.id)
        if served is None or (served[0] != tenant and tenant != OPEN):
            raise APIError(404, f"no response with id '{body.id}' (feedback is kept for recent responses)",
                           code="response_not_found", param="id")
        _, alias, variant = served
        kind = "positive" if body.score > 0 else "negative" if body.score < 0 else "neutral"
        state.metrics.feedback.labels(alias or "", variant or "", kind).inc()
        state.metrics.feedback_score.labels(alias or "", variant or "").inc(body.score)
        return {"id": body.id, "alias": alias, "variant": variant, "recorded": True}

    @app.get("/health")
    async def health():
        stats = state.engine.stats()
        model = None if state.tenants.enabled else state.model_name  # unauthenticated: no paths when keyed
        return {"status": "ok", "model": model, "running": stats["running"], "pending": stats["pending"],
                "steps": stats["steps"], "auth": "api-keys" if state.tenants.enabled else "open-loopback"}

    @app.get("/metrics")
    async def metrics(request: Request):
        if state.tenants.enabled:  # labels name every tenant's adapters: only the operator may read them
            _admin(state, request)
        for alias, weights in state.ab.weights.items():
            for variant, weight in weights.items():
                state.metrics.variant_weight.labels(alias, variant).set(weight)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


def _adapter_admin_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/admin/adapters")
    async def list_adapters(request: Request):
        _admin(state, request)
        rows = []
        for name in engine.adapter_names():
            spec = engine.adapter_spec(name)
            if spec is not None:
                rows.append({"name": name, "path": str(spec.path), "source": spec.source, "rank": spec.rank,
                             "modules": len(spec.modules), "tenant": state.tenants.owner(name),
                             "hot": engine.is_hot(name), "base_check": spec.extra.get("base_check")})
        return {"adapters": rows, "cache": engine.stats()}

    @app.post("/admin/adapters")
    async def load_adapter(body: AdapterBody, request: Request):
        _admin(state, request)
        try:
            spec = await asyncio.to_thread(engine.add_adapter, body.name, body.path)
        except (AdapterError, ValueError) as exc:
            raise APIError(400, str(exc), code="adapter_refused", param="path") from None
        if body.tenant:
            state.tenants.set_owner(body.name, body.tenant)
        return {"name": spec.name, "rank": spec.rank, "modules": len(spec.modules), "loaded": True}

    @app.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        _admin(state, request)
        if not engine.remove_adapter(name):
            raise APIError(404, f"adapter '{name}' is not loaded", code="model_not_found")
        return {"name": name, "unloaded": True}


def _alias_admin_routes(app: FastAPI, state: ServerState) -> None:
    def known(alias: str) -> None:
        if alias not in state.ab.weights:
            raise APIError(404, f"no alias '{alias}'", code="alias_not_found")

    @app.get("/admin/aliases")
    async def list_aliases(request: Request):
        _admin(state, request)
        return {"aliases": {a: {"weights": w, "previous": state.ab.previous.get(a)} for a, w in state.ab.weights.items()}}

    @app.put("/admin/aliases/{alias}")
    async def set_alias(alias: str, body: WeightsBody, request: Request):
        _admin(state, request)
        unknown = [v for v in body.weights if v != BASE and state.engine.adapter_spec(v) is None]
        if unknown:
            raise APIError(404, f"alias '{alias}': unknown variant(s) {unknown}", code="model_not_found")
        try:
            state.ab.set_weights(alias, body.weights)
        except ValueError as exc:
            raise APIError(422, str(exc), code="invalid_value", param="weights") from None
        if body.tenant:
            state.tenants.set_owner(alias, body.tenant)
        return {"alias": alias, "weights": state.ab.weights[alias]}

    @app.post("/admin/aliases/{alias}/promote")
    async def promote(alias: str, body: VariantBody, request: Request):
        _admin(state, request)
        known(alias)
        try:
            state.ab.promote(alias, body.variant)
        except ValueError as exc:
            raise APIError(422, str(exc), code="invalid_value", param="variant") from None
        return {"alias": alias, "weights": state.ab.weights[alias]}

    @app.post("/admin/aliases/{alias}/rollback")
    async def rollback(alias: str, request: Request):
        _admin(state, request)
        known(alias)
        try:
            state.ab.rollback(alias)
        except ValueError as exc:
            raise APIError(409, str(exc), code="no_previous_weights") from None
        return {"alias": alias, "weights": state.ab.weights[alias]}
