"""Aliases (production, staging, ...): named pointers to runs, moved by promote and rollback, with full history.

History is the ordered list of alias_events. Rollback treats it as a stack: each promote pushes its run, each
rollback pops one, so `promote a, promote b, promote c, rollback, rollback` ends at a. The alias row carries a
revision counter bumped by every move; `alias_etag` (one indexed query) lets a server poll for promotions and
reload only when the tag changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunesmith.registry import artifacts as art
from tunesmith.registry import hooks
from tunesmith.registry.runs import find_run, ref_of
from tunesmith.registry.schema import Alias, AliasEvent, Run, utcnow
from tunesmith.registry.store import RegistryError, open_registry, read, write


def _check_servable(run: Run) -> None:
    if run.status == "archived":
        raise RegistryError(f"{ref_of(run)} is archived; restore it with `tunesmith runs archive {ref_of(run)} --restore`")
    if run.adapter_digest is None:
        raise RegistryError(f"{ref_of(run)} has no adapter (status {run.status}); only a finished run can serve")


def _refresh_status(session: Session, run_id: int | None) -> None:
    """promoted while some alias points at the run; back to finished once none does."""
    if run_id is None:
        return
    run = session.get(Run, run_id)
    holds = session.scalars(select(Alias.name).where(Alias.run_id == run_id)).first() is not None
    if holds and run.status != "archived":
        run.status = "promoted"
    elif not holds and run.status == "promoted":
        run.status = "finished"


def _move(session: Session, alias: str, run: Run, action: str) -> dict[str, Any]:
    now = utcnow()
    row = session.scalars(select(Alias).where(Alias.name == alias).with_for_update()).first()
    hooks.checkpoint("alias-locked")
    previous = row.run_id if row is not None else None
    if previous == run.id and action == "promote":
        return {"alias": alias, "ref": ref_of(run), "previous": ref_of(run), "revision": row.revision, "changed": False}
    if row is None:
        row = Alias(name=alias, run_id=run.id, revision=1, updated_at=now)
        session.add(row)
    else:
        row.run_id, row.revision, row.updated_at = run.id, row.revision + 1, now
    session.add(AliasEvent(alias=alias, action=action, run_id=run.id, previous_run_id=previous,
                           revision=row.revision, at=now))
    session.flush()
    hooks.checkpoint("alias-moved")
    _refresh_status(session, run.id)
    _refresh_status(session, previous)
    session.flush()
    hooks.checkpoint("alias-in-transaction")
    return {
        "alias": alias, "ref": ref_of(run), "adapter_digest": run.adapter_digest, "revision": row.revision,
        "previous": ref_of(session.get(Run, previous)) if previous else None, "changed": True,
    }


def promote(ref: str, alias: str, url: str | Path | None = None) -> dict[str, Any]:
    """Point `alias` at the run `ref` (NAME@VERSION); the previous holder stays in the history for rollback."""

    def work(session: Session) -> dict[str, Any]:
        run = find_run(session, ref)
        _check_servable(run)
        return _move(session, alias, run, "promote")

    result = write(open_registry(url), work)
    hooks.checkpoint("alias-committed")
    return result


def holder_stack(session: Session, alias: str) -> list[int]:
    stack: list[int] = []
    for event in session.scalars(select(AliasEvent).where(AliasEvent.alias == alias).order_by(AliasEvent.id)):
        if event.action == "promote":
            stack.append(event.run_id)
        elif stack:
            stack.pop()
    return stack


def rollback(alias: str, url: str | Path | None = None) -> dict[str, Any]:
    """Give `alias` back to the run that held it before the current holder's promotion."""

    def work(session: Session) -> dict[str, Any]:
        if session.get(Alias, alias) is None:
            raise RegistryError(f"no alias {alias!r}; known aliases: {', '.join(_alias_names(session)) or 'none'}")
        stack = holder_stack(session, alias)
        if len(stack) < 2:
            raise RegistryError(f"alias {alias!r} has no previous holder to roll back to (see `tunesmith runs aliases {alias}`)")
        target = session.get(Run, stack[-2])
        _check_servable(target)
        return _move(session, alias, target, "rollback")

    result = write(open_registry(url), work)
    hooks.checkpoint("alias-committed")
    return result


def _alias_names(session: Session) -> list[str]:
    return list(session.scalars(select(Alias.name).order_by(Alias.name)))


def alias_history(alias: str, url: str | Path | None = None) -> list[dict[str, Any]]:
    def work(session: Session) -> list[dict[str, Any]]:
        events = session.scalars(select(AliasEvent).where(AliasEvent.alias == alias).order_by(AliasEvent.id)).all()
        if not events:
            raise RegistryError(f"no alias {alias!r}; known aliases: {', '.join(_alias_names(session)) or 'none'}")
        return [
            {"revision": e.revision, "action": e.action, "ref": ref_of(session.get(Run, e.run_id)),
             "previous": ref_of(session.get(Run, e.previous_run_id)) if e.previous_run_id else None,
             "at": e.at.isoformat() + "Z"}
            for e in events
        ]

    return read(open_registry(url), work)


def list_aliases(url: str | Path | None = None) -> list[dict[str, Any]]:
    def work(session: Session) -> list[dict[str, Any]]:
        rows = session.execute(select(Alias, Run).join(Run, Run.id == Alias.run_id).order_by(Alias.name)).all()
        return [{"alias": a.name, "ref": ref_of(r), "revision": a.revision, "adapter_digest": r.adapter_digest,
                 "etag": _etag(a.name, a.revision, r.adapter_digest), "updated_at": a.updated_at.isoformat() + "Z"}
                for a, r in rows]

    return read(open_registry(url), work)


def _etag(alias: str, revision: int, digest: str | None) -> str:
    return f"{alias}-r{revision}-{(digest or 'sha256:none').removeprefix('sha256:')[:16]}"


def alias_etag(alias: str, url: str | Path | None = None) -> str | None:
    """A short tag that changes whenever `alias` moves (None if it does not exist); one indexed query, so a
    server can poll it every second and reload its adapter only when the tag differs from the last one."""

    def work(session: Session) -> str | None:
        row = session.execute(
            select(Alias.revision, Run.adapter_digest).join(Run, Run.id == Alias.run_id).where(Alias.name == alias)
        ).first()
        return None if row is None else _etag(alias, row[0], row[1])

    return read(open_registry(url), work)


def alias_info(alias: str, url: str | Path | None = None) -> dict[str, Any]:
    """{alias, ref, etag, adapter_digest, path}: the holder of `alias`, its adapter materialised in PEFT layout."""

    def work(session: Session) -> tuple[dict[str, Any], str]:
        row = session.get(Alias, alias)
        if row is None:
            raise RegistryError(f"no alias {alias!r}; known aliases: {', '.join(_alias_names(session)) or 'none'} "
                                f"(create one with `tunesmith runs promote NAME@VERSION --alias {alias}`)")
        run = session.get(Run, row.run_id)
        info = {"alias": alias, "ref": ref_of(run), "etag": _etag(alias, row.revision, run.adapter_digest),
                "adapter_digest": run.adapter_digest, "base_model": run.base_model}
        return info, run.adapter_digest

    registry = open_registry(url)
    info, digest = read(registry, work)
    return {**info, "path": str(art.materialize(registry.store, digest))}


def resolve_alias(alias: str, url: str | Path | None = None) -> Path:
    """Path of the adapter folder (PEFT layout: adapter_config.json + adapter_model.safetensors) that `alias`
    points at. For a local store it is the content-addressed object folder itself: read it, never write it."""
    return Path(alias_info(alias, url)["path"])


def resolve_ref(ref: str, url: str | Path | None = None) -> Path:
    """Like resolve_alias, for any ref (NAME@VERSION, NAME@latest, alias, NAME)."""
    registry = open_registry(url)

    def work(session: Session) -> str:
        run = find_run(session, ref)
        if run.adapter_digest is None:
            raise RegistryError(f"{ref_of(run)} has no adapter (status {run.status})")
        return run.adapter_digest

    return art.materialize(registry.store, read(registry, work))
