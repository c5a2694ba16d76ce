"""Open a registry: resolve its URL, create the engine, run Alembic `upgrade head`, retry contended writes.

Where the registry lives (first that is set): the `url` argument (`--registry`), `$TUNESMITH_REGISTRY`,
`runs/registry.db` under the current directory. A value with "://" is a SQLAlchemy URL (sqlite:///..., or
postgresql+psycopg://user@host/db for teams); anything else is a path: a file, or a folder holding registry.db.
Artifacts go to the `artifacts` argument, `$TUNESMITH_ARTIFACTS`, the URL recorded in the database at creation,
or, for an SQLite file, the folder `registry-artifacts/` beside it. The first client records the artifact URL in the
database, so every later client (any machine) uses the same store.

Concurrency: SQLite runs in WAL mode (readers never block the writer) with a 30 s busy timeout, and write
transactions start with BEGIN IMMEDIATE so two writers queue instead of failing on a lock upgrade. Any write that
still loses a race (a version number taken meanwhile, a lock timeout, a serialisation failure) is rolled back
whole and retried with jittered backoff.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from tunesmith.registry import artifacts as art
from tunesmith.registry.errors import RegistryError
from tunesmith.registry.schema import Setting

T = TypeVar("T")
DEFAULT_PATH = Path("runs") / "registry.db"
BUSY_TIMEOUT_MS = 30_000
WRITE_ATTEMPTS = 12


@dataclass(frozen=True)
class Registry:
    url: str
    engine: Engine
    read_engine: Engine
    store: art.ArtifactStore


def resolve_url(url: str | Path | None = None) -> str:
    raw = str(url or os.environ.get("TUNESMITH_REGISTRY") or DEFAULT_PATH)
    if "://" in raw:
        return raw
    path = Path(raw).expanduser()
    if path.is_dir() or (not path.exists() and path.suffix == ""):
        path = path / "registry.db"
    return f"sqlite:///{path.resolve()}"


def _sqlite_file(url: str) -> Path | None:
    if url.startswith("sqlite") and ":///" in url:
        rest = url.split(":///", 1)[1].split("?", 1)[0]
        return Path(rest) if rest and rest != ":memory:" else None
    return None


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        db_file = _sqlite_file(url)
        if db_file is not None:
            db_file.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine, wal=db_file is not None)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _configure_sqlite(engine: Engine, wal: bool) -> None:
    """pysqlite's own transaction handling defers BEGIN and cannot say IMMEDIATE; take it over (the recipe in
    SQLAlchemy's SQLite dialect docs, 'Serializable isolation / Savepoints / Transactional DDL')."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if wal:
            _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _enable_wal(cursor) -> None:
    """PRAGMA journal_mode=WAL, retried: switching a fresh database's journal mode needs a lock that SQLite does not
    wait for through busy_timeout, so a second process opening the same new registry at that moment got "database is
    locked" at once (tests/registry/test_registry_atomicity.py::test_two_concurrent_writer_processes, ~1 run in 6)."""
    import sqlite3

    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() and "busy" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(0.5, delay * 2)


def migrate(engine: Engine) -> None:
    """Alembic `upgrade head` on this engine (idempotent; concurrent first opens serialise, see env.py)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


_OPEN: dict[tuple[str, str | None], Registry] = {}


def _forget_after_fork() -> None:
    """A forked child (a server worker) must not share the parent's pooled connections (SQLAlchemy docs, 'Using
    Connection Pools with Multiprocessing'): drop them without closing the parent's sockets, reopen on demand."""
    for registry in _OPEN.values():
        registry.engine.dispose(close=False)
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def open_registry(url: str | Path | None = None, artifacts: str | Path | None = None) -> Registry:
    """Open (creating and migrating on first use) the registry; cached per process so polling stays cheap."""
    resolved = resolve_url(url)
    wanted = str(artifacts) if artifacts else os.environ.get("TUNESMITH_ARTIFACTS")
    key = (resolved, wanted)
    if key in _OPEN:
        return _OPEN[key]
    engine = make_engine(resolved)
    try:
        migrate(engine)
    except OperationalError as exc:
        raise RegistryError(f"cannot open the registry at {resolved}: {exc.orig} (check --registry / $TUNESMITH_REGISTRY)") from exc
    store_url = _settle_artifact_url(engine, resolved, wanted)
    registry = Registry(resolved, engine, engine.execution_options(sqlite_begin="DEFERRED"), art.open_store(store_url))
    _OPEN[key] = registry
    return registry


def _default_artifacts(url: str) -> str | None:
    db_file = _sqlite_file(url)
    return str(db_file.parent / "registry-artifacts") if db_file is not None else None  # not a likely run name


def _settle_artifact_url(engine: Engine, url: str, wanted: str | None) -> str:
    if wanted and "://" not in wanted:
        wanted = str(Path(wanted).expanduser().resolve())

    def settle(session: Session) -> str:
        row = session.get(Setting, "artifacts_url")
        if row is not None:
            if wanted and wanted != row.value:
                raise RegistryError(
                    f"{url} keeps its artifacts at {row.value}, not {wanted}; drop --artifacts/$TUNESMITH_ARTIFACTS "
                    "or use another registry"
                )
            return row.value
        chosen = wanted or _default_artifacts(url)
        if chosen is None:
            raise RegistryError(f"{url}: where should artifacts go? set $TUNESMITH_ARTIFACTS (a folder or fsspec URL)")
        session.add(Setting(key="artifacts_url", value=chosen))
        return chosen

    return write_with_engine(engine, settle)


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, IntegrityError):
        return True  # a unique (name, version) or alias key taken by a concurrent writer: recompute and retry
    text = str(getattr(exc, "orig", exc)).lower()
    return isinstance(exc, OperationalError) and any(w in text for w in ("locked", "busy", "deadlock", "serializ"))


def write_with_engine(engine: Engine, work: Callable[[Session], T], attempts: int = WRITE_ATTEMPTS) -> T:
    """Run `work` in one transaction; commit, or roll back entirely and retry when it lost a race."""
    for attempt in range(attempts):
        try:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                return work(session)
        except (IntegrityError, OperationalError) as exc:
            if attempt == attempts - 1 or not _retryable(exc):
                raise
            time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def write(registry: Registry, work: Callable[[Session], T]) -> T:
    return write_with_engine(registry.engine, work)


def read(registry: Registry, work: Callable[[Session], T]) -> T:
    with Session(registry.read_engine, expire_on_commit=False) as session, session.begin():
        return work(session)


def setting(registry: Registry, key: str) -> str | None:
    return read(registry, lambda s: s.scalar(select(Setting.value).where(Setting.key == key)))
