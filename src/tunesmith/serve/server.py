"""Build a server from a ServeConfig (model, engine, adapters, tenants, aliases) and run it under uvicorn.

Adapters named `registry:ALIAS` are resolved through tunesmith.registry.resolve_alias and re-resolved every
registry_refresh_s seconds; when the alias moves, the adapter name is re-pointed at the new folder (its hot copy is
dropped between steps and the new weights load on the next request), so a promotion needs no restart.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

from tunesmith.config import ConfigError, ModelConfig
from tunesmith.serve.api import ServerState, create_app
from tunesmith.serve.cache import parse_bytes
from tunesmith.serve.config import ServeConfig
from tunesmith.serve.engine import BASE, Engine
from tunesmith.serve.identity import BaseIdentity
from tunesmith.serve.metrics import ServeMetrics
from tunesmith.serve.router import ABRouter, load_tenants

REGISTRY_PREFIX = "registry:"
log = logging.getLogger("tunesmith.serve")


def resolve_adapter_source(source: str, registry_url: str | None) -> Path:
    if not source.startswith(REGISTRY_PREFIX):
        return Path(source).expanduser()
    try:
        from tunesmith.registry import resolve_alias
    except ImportError as exc:  # the registry is optional at import time
        raise ConfigError(f"--adapter ...={source}: the registry is not available ({exc})") from None
    return Path(resolve_alias(source[len(REGISTRY_PREFIX):], url=registry_url))


def base_identity(config: ServeConfig, model) -> BaseIdentity:
    """The server's base: every name it goes by and its local folder (identity.py matches adapters against it)."""
    from tunesmith.models.load import resolve_source

    names = set()
    try:
        names.add(resolve_source(ModelConfig(name_or_path=config.model), log=lambda *_: None))
    except Exception:  # an unresolvable id is caught by load_model already
        pass
    name_or_path = getattr(model.config, "_name_or_path", None)
    if name_or_path:
        names.add(str(name_or_path))
    path = Path(config.model).expanduser()
    if path.exists():
        names.add(str(path.resolve()))
    return BaseIdentity.of(config.model, *sorted(names))


def build_state(config: ServeConfig, log_fn=print, model=None, tokenizer=None) -> ServerState:
    import torch

    from tunesmith.models.load import load_model, load_tokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    model_config = ModelConfig(name_or_path=config.model, dtype=config.dtype)
    tokenizer = tokenizer or load_tokenizer(model_config, log=log_fn)
    model = model or load_model(model_config, log=log_fn)
    metrics = ServeMetrics()
    try:
        budget = parse_bytes(config.cache_budget)
    except ValueError as exc:
        raise ConfigError(f"--cache-budget: {exc}") from None
    engine = Engine(model, tokenizer, cache_budget_bytes=budget, max_batch_size=config.max_batch_size,
                    max_model_len=config.max_model_len, base=base_identity(config, model),
                    allow_base_mismatch=config.allow_base_mismatch,
                    on_step=lambda n: metrics.batch_size.observe(n))
    metrics.watch_engine(engine.stats)
    tenants = load_tenants(config.tenants)
    from tunesmith.serve.adapters import AdapterError

    for name, source in config.adapters.items():
        try:
            engine.add_adapter(name, resolve_adapter_source(source, config.registry_url), source=source)
        except (AdapterError, ValueError) as exc:
            engine.close()
            raise ConfigError(f"--adapter {name}={source}: {exc}") from None
    ab = ABRouter()
    for alias, weights in config.aliases.items():
        unknown = [v for v in weights if v != BASE and v not in config.adapters]
        if unknown:
            engine.close()
            raise ConfigError(f"aliases.{alias}: unknown variant(s) {unknown}; variants must be adapters or 'base'")
        ab.set_weights(alias, weights)
    for alias, tenant in config.alias_tenants.items():
        tenants.set_owner(alias, tenant)
    admin_key = None
    if config.admin_key_file:
        try:
            admin_key = Path(config.admin_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--admin-key-file {config.admin_key_file}: cannot read ({exc})") from None
        if len(admin_key) < 8:
            raise ConfigError(f"--admin-key-file {config.admin_key_file}: the key must have 8+ characters")
    state = ServerState(engine=engine, tenants=tenants, ab=ab, metrics=metrics, admin_key=admin_key,
                        model_name=config.model, max_body_bytes=config.max_body_bytes,
                        max_stream_backlog=config.max_stream_backlog)
    return state


def start_registry_refresh(state: ServerState, config: ServeConfig, stop: threading.Event) -> threading.Thread | None:
    """Re-resolve registry:ALIAS adapters every registry_refresh_s; re-point a name when its alias moved."""
    watched = {n: s for n, s in config.adapters.items() if s.startswith(REGISTRY_PREFIX)}
    if not watched:
        return None

    def run() -> None:
        while not stop.wait(config.registry_refresh_s):
            refresh_registry_adapters(state, watched, config.registry_url)

    thread = threading.Thread(target=run, name="registry-refresh", daemon=True)
    thread.start()
    return thread


def refresh_registry_adapters(state: ServerState, watched: dict[str, str], registry_url: str | None) -> list[str]:
    """One refresh pass; returns the names that were re-pointed. Errors are logged, the old version keeps serving."""
    moved = []
    for name, source in watched.items():
        try:
            path = resolve_adapter_source(source, registry_url)
            spec = state.engine.adapter_spec(name)
            if spec is None or Path(spec.path) != path:
                state.engine.add_adapter(name, path, source=source)
                moved.append(name)
        except Exception as exc:
            log.warning("registry refresh of %s (%s) failed, keeping the current version: %s", name, source, exc)
    return moved


def serve(config: ServeConfig, log_fn=print) -> None:
    import uvicorn

    if not config.tenants:
        log_fn(f"notice: no --tenants given: the server is open to every local user, on loopback only "
               f"({config.host}:{config.port}); give --tenants tenants.yaml to require API keys")
    state = build_state(config, log_fn=log_fn)
    log_fn(f"serving {config.model} with {len(config.adapters)} adapter(s) on http://{config.host}:{config.port}"
           + ("" if state.admin_key else "; admin endpoints off (no --admin-key-file)"))
    stop = threading.Event()
    start_registry_refresh(state, config, stop)
    try:
        settings = uvicorn.Config(create_app(state), host=config.host, port=config.port, log_level="warning",
                                  access_log=False)
        sock = settings.bind_socket()
        if config.send_buffer_bytes:  # accepted connections inherit it from the listening socket (Linux, BSD)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.send_buffer_bytes)
        uvicorn.Server(settings).run(sockets=[sock])
    finally:
        stop.set()
        state.engine.close()
