"""The dashboard's HTTP API and page (FastAPI, the same stack as `tunesmith serve`).

Routes (all JSON but `/` and `/static/*`):
  GET  /                       the single page (static/index.html)
  GET  /static/{name}          a file of static/ by exact name (a fixed list read at start: no path is joined)
  GET  /api/info               registry, runs folder, whether admin actions are on and reads need the key
  GET  /api/runs               the runs table (registered + unregistered run folders), live flags
  GET  /api/run?id=ID          one run: config, summary, diagnosis, compact eval, aliases
  GET  /api/curves?id=ID&x=    train/eval loss and lr against step|epoch|tokens (metrics.jsonl)
  GET  /api/compare?id=A&id=B  curves of each, diagnoses, config differences, task metrics, forgetting
  GET  /api/examples?a=&b=&split=   test items where two runs' outputs or scores differ
  GET  /api/data?id=ID         the data report of the run's snapshot (data_manifest.json)
  GET  /api/aliases            aliases and each alias's history (the registry's alias_events)
  POST /api/admin/promote {ref, alias} | /api/admin/rollback {alias} | /api/admin/archive {ref, restore}

Admin routes need `Authorization: Bearer <key>` (compared in constant time with hmac.compare_digest) and are off
(403) unless the server was given a key. With `require_key_for_reads` (a server bound beyond loopback) every /api
route needs the key. They call the registry functions the CLI calls (registry.aliases.promote/rollback,
registry.runs.set_archived), so the alias history records a UI promote exactly as a CLI promote.
"""

from __future__ import annotations

import hmac
import json
import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.registry.errors import RegistryError
from tunesmith.ui import views
from tunesmith.ui.sources import Catalog, UIError

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}
# Everything the page needs comes from this server; nothing inline, nothing from elsewhere (no CDN).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str = Field(..., min_length=1, max_length=300)
    alias: str = Field(..., min_length=1, max_length=100)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str = Field(..., min_length=1, max_length=100)


class ArchiveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str = Field(..., min_length=1, max_length=300)
    restore: bool = False


def _finite(value: Any) -> Any:
    """NaN and infinities (a diverged run writes them) as the strings "NaN", "Infinity", "-Infinity": strict JSON
    cannot carry them, and the page shows them as written."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class FiniteJSONResponse(JSONResponse):
    """Run data goes out through this (FastAPI's own encoder would turn NaN into null, hiding a divergence)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _static_files() -> dict[str, Path]:
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(catalog: Catalog, admin_key: str | None = None, require_key_for_reads: bool = False,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The dashboard app over `catalog`. `allowed_hosts` (Host header names) guards a loopback server against
    DNS rebinding; None accepts any Host (tests)."""
    app = FastAPI(title="tunesmith ui", docs_url=None, redoc_url=None, openapi_url=None)
    files = _static_files()
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    def key_ok(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return admin_key is not None and hmac.compare_digest(given.encode(), admin_key.encode())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if require_key_for_reads and request.url.path.startswith("/api/") and request.url.path != "/api/info" \
                and not key_ok(request):
            response: Response = _error(401, "this dashboard is bound beyond loopback: send the admin key "
                                             "(Authorization: Bearer <key>)")
        else:
            response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(UIError)
    async def _ui_error(_request: Request, exc: UIError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(RegistryError)
    async def _registry_error(_request: Request, exc: RegistryError) -> JSONResponse:
        return _error(409, str(exc))

    def admin(request: Request) -> None:
        if admin_key is None:
            raise UIError(403, "registry actions are off: start `tunesmith ui --admin-key-file FILE` to enable them")
        if not key_ok(request):
            raise UIError(401, "invalid or missing admin key (Authorization: Bearer <key>)")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(files["index.html"], media_type=MEDIA_TYPES[".html"])

    @app.get("/static/{name}")
    def static(name: str) -> FileResponse:
        path = files.get(name)  # exact names only: '..', '%2e%2e', 'a/b' never match a key
        if path is None:
            raise UIError(404, f"no static file {name!r}")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])

    @app.get("/api/info")
    def info(request: Request) -> dict[str, Any]:
        if require_key_for_reads and not key_ok(request):
            return {"admin": True, "key_required_for_reads": True}  # nothing about the machine before the key
        return {"registry": str(catalog.registry_url or "default ($TUNESMITH_REGISTRY or runs/registry.db)"),
                "runs_dir": str(catalog.runs_dir) if catalog.runs_dir else None, "admin": admin_key is not None,
                "key_required_for_reads": require_key_for_reads}

    @app.get("/api/runs")
    def runs() -> Response:
        return FiniteJSONResponse(views.runs_table(catalog))

    @app.get("/api/run")
    def run(id: str) -> Response:
        view = catalog.get(id)
        return FiniteJSONResponse({**views.run_row(catalog, view), "config": view.config, "summary": view.summary,
                                   "diagnosis": catalog.diagnosis(view), "eval": views.compact_eval(view.eval),
                                   "run_dir": str(view.run_dir) if view.run_dir else None})

    @app.get("/api/curves")
    def curves(id: str, x: str = "step") -> Response:
        return FiniteJSONResponse(views.curves(catalog, catalog.get(id), x))

    @app.get("/api/compare")
    def compare(id: list[str] = Query(default=[]), x: str = "step") -> Response:  # noqa: B008
        return FiniteJSONResponse(views.compare(catalog, id, x))

    @app.get("/api/examples")
    def examples(a: str, b: str, split: str | None = None, limit: int = Query(200, ge=1, le=5000)) -> Response:
        return FiniteJSONResponse(views.examples(catalog, a, b, split, limit))

    @app.get("/api/data")
    def data(id: str) -> Response:
        return FiniteJSONResponse(views.data_report(catalog.get(id)))

    @app.get("/api/aliases")
    def aliases() -> dict[str, Any]:
        from tunesmith.registry.aliases import alias_history, list_aliases

        listed = list_aliases(catalog.registry_url)
        return {"aliases": [{**a, "history": alias_history(a["alias"], catalog.registry_url)} for a in listed]}

    @app.post("/api/admin/promote")
    def promote(body: PromoteBody, request: Request) -> dict[str, Any]:
        admin(request)
        from tunesmith.registry.aliases import promote as registry_promote

        return registry_promote(body.ref, body.alias, catalog.registry_url)

    @app.post("/api/admin/rollback")
    def rollback(body: RollbackBody, request: Request) -> dict[str, Any]:
        admin(request)
        from tunesmith.registry.aliases import rollback as registry_rollback

        return registry_rollback(body.alias, catalog.registry_url)

    @app.post("/api/admin/archive")
    def archive(body: ArchiveBody, request: Request) -> dict[str, Any]:
        admin(request)
        from tunesmith.registry.runs import set_archived

        return set_archived(body.ref, catalog.registry_url, restore=body.restore)

    return app
