"""Keep the registry tidy and prove it consistent: `gc` (unreferenced artifacts) and `check` (every reference
resolves to complete files).

gc deletes (1) artifact rows no run refers to, then their files, and (2) stored objects and staging folders no row
knows. Both only when idle for longer than the grace period (default one hour), the same rule as git's
gc.pruneExpire: a registration in flight has stored its files but not yet committed its row, and must not lose
them. A registration refreshes its artifacts' last_used_at inside its transaction, so a row it relies on is never
idle. Deleting the row before the files means a crash in between leaves only stray files for the next gc.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunesmith.registry import artifacts as art
from tunesmith.registry.schema import Alias, AliasEvent, Artifact, Run, utcnow
from tunesmith.registry.store import open_registry, read, write

DEFAULT_GRACE_SECONDS = 3600.0


def _referenced(session: Session) -> set[str]:
    rows = session.execute(select(Run.adapter_digest, Run.logs_digest)).all()
    return {d for row in rows for d in row if d}


def gc(url: str | Path | None = None, grace_seconds: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False) -> dict[str, Any]:
    registry = open_registry(url)
    cutoff = utcnow() - timedelta(seconds=grace_seconds)

    def work(session: Session) -> tuple[list[tuple[str, int]], set[str], int]:
        referenced = _referenced(session)
        rows = session.scalars(select(Artifact)).all()
        doomed = [r for r in rows if r.digest not in referenced and r.last_used_at <= cutoff]
        if not dry_run:
            for row in doomed:
                session.delete(row)
        return [(r.digest, r.size_bytes) for r in doomed], {r.digest for r in rows}, len(rows)

    doomed, known, total = (read if dry_run else write)(registry, work)
    if not dry_run:
        for digest, _ in doomed:
            art.delete(registry.store, digest)
    now = time.time()
    strays = [d for d, t in art.stored_objects(registry.store).items()
              if d not in known and (t is None or now - t >= grace_seconds)]
    staging = _old_staging(registry.store, now, grace_seconds)
    if not dry_run:
        for digest in strays:
            art.delete(registry.store, digest)
        for path in staging:
            registry.store.fs.rm(path, recursive=True)
    return {
        "dry_run": dry_run, "grace_seconds": grace_seconds, "artifacts_before": total,
        "deleted": [d for d, _ in doomed], "freed_bytes": sum(size for _, size in doomed),
        "kept": total - len(doomed), "stray_objects_deleted": strays, "staging_deleted": len(staging),
    }


def _old_staging(store: art.ArtifactStore, now: float, grace_seconds: float) -> list[str]:
    """Staging folders left by killed local writers (remote stores stage nothing)."""
    tmp = Path(store.root) / "tmp"
    if not store.local or not tmp.is_dir():
        return []
    return [str(p) for p in tmp.iterdir() if now - p.stat().st_mtime >= grace_seconds]


def _alias_problems(session: Session, alias: Alias) -> list[str]:
    """An alias must point at a run with an adapter, and agree with its own history's last event (a move writes
    both in one transaction, so a disagreement means a torn write)."""
    problems = []
    run = session.get(Run, alias.run_id)
    if run is None or run.adapter_digest is None:
        problems.append(f"alias {alias.name}: points at a run without an adapter")
    last = session.scalars(select(AliasEvent).where(AliasEvent.alias == alias.name)
                           .order_by(AliasEvent.id.desc())).first()
    if last is None or (last.run_id, last.revision) != (alias.run_id, alias.revision):
        seen = f"revision {last.revision} -> run {last.run_id}" if last else "no history"
        problems.append(f"alias {alias.name}: row says revision {alias.revision} -> run {alias.run_id}, "
                        f"but its history ends with {seen}")
    return problems


def check(url: str | Path | None = None, deep: bool = False) -> dict[str, Any]:
    """Every artifact row has complete files (and, with `deep`, files that still hash to its digest); every run's
    and alias's references resolve. `problems` empty means consistent; stray objects are not problems."""
    registry = open_registry(url)

    def work(session: Session) -> dict[str, Any]:
        problems: list[str] = []
        rows = {r.digest: r for r in session.scalars(select(Artifact))}
        for digest in rows:
            if not art.has(registry.store, digest):
                problems.append(f"artifact {digest}: row present, files missing from {registry.store.url}")
            elif deep and not art.verify(registry.store, digest):
                problems.append(f"artifact {digest}: files no longer hash to the digest (corrupt)")
        runs = session.scalars(select(Run)).all()
        for run in runs:
            for field in ("adapter_digest", "logs_digest"):
                digest = getattr(run, field)
                if digest and digest not in rows:
                    problems.append(f"run {run.name}@{run.version}: {field} {digest} has no artifact row")
        for alias in session.scalars(select(Alias)):
            problems += _alias_problems(session, alias)
        return {"runs": len(runs), "artifacts": len(rows), "problems": problems, "known": set(rows)}

    result = read(registry, work)
    known = result.pop("known")
    result["stray_objects"] = sorted(d for d in art.stored_objects(registry.store) if d not in known)
    result["ok"] = not result["problems"]
    return result
