"""Register run directories as versioned runs, and look runs up (refs, listings, lineage).

A registration reads `runs/<name>/` (config.yaml, data_manifest.json, summary.json, eval.json, metrics.jsonl,
loss_curves.png, adapter/), stores the adapter and the logs in the content-addressed store (files first), then
writes the run row, its artifact rows and its lineage in one transaction. A crash before the commit leaves only
unreferenced files, which `gc` collects; a crash after it leaves a complete record. Registering the same run
directory again (same name, directory, config, data and adapter) updates that version in place (for instance
to attach eval.json written later by `tunesmith eval`) instead of creating a new version.

Refs name a run: `NAME@VERSION`, `NAME@latest`, an alias (`production`), or a bare `NAME` (its latest version).
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunesmith.registry import artifacts as art
from tunesmith.registry import hooks
from tunesmith.registry.schema import STATUSES, Alias, Artifact, Lineage, Run, utcnow
from tunesmith.registry.store import Registry, RegistryError, open_registry, read, write

LOG_FILES = ("metrics.jsonl", "loss_curves.png")


# ------------------------------------------------------------------------------------ reading a run dir
def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc}); fix or remove the file, then register again") from exc


def read_run_dir(run_dir: str | Path) -> dict[str, Any]:
    """Everything a registration records that lives in the run directory (no hashing of the base model).
    `run_dir` may also name the run's adapter/ folder (records.run.RunDir finds the run directory above it)."""
    from tunesmith.records.run import RunDir

    given = Path(run_dir).expanduser().resolve()
    found = RunDir.find(given) if given.exists() else None
    root = found.root if found is not None and found.root is not None else given
    config_file = root / "config.yaml"
    if not config_file.is_file():
        raise RegistryError(f"{config_file}: missing; is {root} a run directory written by `tunesmith train`?")
    config_yaml = config_file.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_yaml) or {}
    except yaml.YAMLError as exc:
        raise RegistryError(f"{config_file}: not valid YAML: {exc}") from exc
    summary = _read_json(root / "summary.json") or {}
    manifest = _read_json(root / "data_manifest.json")
    adapter_dir = root / "adapter"
    base_model = (config.get("model") or {}).get("name_or_path") or summary.get("base_model")
    return {
        "run_dir": str(root),
        "name": summary.get("name") or (config.get("output") or {}).get("name") or root.name,
        "config_yaml": config_yaml,
        "config": config,
        "summary": summary or None,
        "eval": _read_json(root / "eval.json"),
        "data_manifest": manifest,
        "data_hash": (manifest or {}).get("hash"),
        "data_location": _data_location(manifest, config),
        "method": summary.get("method") or (config.get("method") or {}).get("name"),
        "base_model": base_model,
        "adapter_dir": adapter_dir if adapter_dir.is_dir() and any(adapter_dir.iterdir()) else None,
        "log_files": [(n, root / n) for n in LOG_FILES if (root / n).is_file()],
        "code_version": summary.get("code_version") or code_version(),
        "continued_from": summary.get("continued_from"),
    }


def _data_location(manifest: dict | None, config: dict) -> list[str]:
    files = (manifest or {}).get("files")
    if isinstance(files, list):
        paths = [f.get("path") if isinstance(f, dict) else str(f) for f in files]
        return [p for p in paths if p]
    if isinstance(files, dict):
        return list(files)
    return list((config.get("data") or {}).get("train") or [])


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """tunesmith's version plus the git commit of its source tree when it runs from a checkout."""
    from tunesmith import __version__

    text = f"tunesmith {__version__}"
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return text
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        return f"{text} git:{sha.stdout.strip()}{'+dirty' if dirty.stdout.strip() else ''}"
    except (OSError, subprocess.SubprocessError):
        return text


def resolve_base_folder(name_or_path: str | None) -> Path | None:
    """The local folder holding the base model's weights, without importing torch: a directory, the converted
    reference model, or a hub id already in the Hugging Face cache. None when no local copy exists."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    from tunesmith.models import reference

    cached = reference.cached_path(name_or_path)
    if (cached / "config.json").exists():
        return cached
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not in the cache, or not a valid repo id: the hash stays unknown, and show says so
        return None


def base_model_hash(folder: Path | None) -> str | None:
    """Digest (artifacts.tree_digest) over the folder's *.safetensors files, per-file hashes cached."""
    if folder is None:
        return None
    digest, files = art.hash_folder(folder, suffix=".safetensors", cached=True)
    return digest if files else None


# ------------------------------------------------------------------------------------------- register
def register_run(
    run_dir: str | Path,
    url: str | Path | None = None,
    continued_from: str | None = None,
    merged_from: list[str] | tuple[str, ...] = (),
    status: str | None = None,
    name: str | None = None,
    artifacts: str | Path | None = None,
) -> dict[str, Any]:
    """Record a run directory as the next version of its name; returns the run's record (see `run_record`) plus
    `created` (False when this run directory was registered before and its record was updated in place).

    Files first (content-addressed, idempotent), then one transaction for the rows: see the module docstring."""
    info = read_run_dir(run_dir)
    info["name"] = name or info["name"]
    info["status"] = status or (info["summary"] or {}).get("status") or ("finished" if info["summary"] else "failed")
    if info["status"] not in STATUSES:
        raise RegistryError(f"status {info['status']!r} is not one of {', '.join(STATUSES)}")
    continued_from = continued_from or info["continued_from"]
    parents = [(continued_from, "continued_from")] if continued_from else []
    parents += [(r, "merged_from") for r in merged_from]
    registry = open_registry(url, artifacts)
    base_folder = resolve_base_folder(info["base_model"])
    info["base_model_path"] = str(base_folder) if base_folder else None
    info["base_model_hash"] = base_model_hash(base_folder)
    adapter = art.put_folder(registry.store, info["adapter_dir"], "adapter") if info["adapter_dir"] else None
    logs = art.put_files(registry.store, info["log_files"], "logs") if info["log_files"] else None
    hooks.checkpoint("artifacts-stored")

    def work(session: Session) -> dict[str, Any]:
        now = utcnow()
        for manifest in (adapter, logs):
            if manifest is not None:
                _touch_artifact(session, registry, manifest, now)
        run, created = _upsert_run(session, info, adapter, logs, now)
        session.flush()  # assigns run.id; a (name, version) clash raises here and the whole write is retried
        _link_parents(session, run, parents)
        session.flush()
        hooks.checkpoint("in-transaction")
        return {**run_record(session, run), "created": created}

    record = write(registry, work)
    hooks.checkpoint("registered")
    return record


def _upsert_run(session: Session, info: dict[str, Any], adapter: dict | None, logs: dict | None, now) -> tuple[Run, bool]:
    """The run row for this run directory: the existing version when the same directory, config, data and adapter
    were registered before (updated in place), else a new version of its name. Returns (row, created)."""
    name = info["name"]
    identity = "sha256:" + hashlib.sha256(
        json.dumps([info["run_dir"], info["config_yaml"], info["data_hash"], adapter and adapter["digest"]]).encode()
    ).hexdigest()
    run = session.scalars(
        select(Run).where(Run.name == name, Run.identity == identity).order_by(Run.version.desc())
    ).first()
    created = run is None
    if run is None:
        latest = session.scalar(select(func.max(Run.version)).where(Run.name == name)) or 0
        run = Run(name=name, version=latest + 1, status=info["status"], created_at=now, identity=identity,
                  run_dir=info["run_dir"], config_yaml=info["config_yaml"])
        session.add(run)
    elif run.status not in ("promoted", "archived"):
        run.status = info["status"]
    run.updated_at = now
    run.method, run.base_model, run.code_version = info["method"], info["base_model"], info["code_version"]
    run.base_model_path, run.base_model_hash = info["base_model_path"], info["base_model_hash"]
    run.data_hash, run.data_location = info["data_hash"], json.dumps(info["data_location"])
    run.data_manifest_json = _dump(info["data_manifest"])
    run.summary_json, run.eval_json = _dump(info["summary"]), _dump(info["eval"])
    run.adapter_digest = adapter and adapter["digest"]
    run.logs_digest = logs and logs["digest"]
    return run, created


def _link_parents(session: Session, run: Run, parents: list[tuple[str, str]]) -> None:
    for ref, relation in parents:
        parent = find_run(session, ref)
        if parent.id == run.id:
            raise RegistryError(f"{run.name}@{run.version} cannot be its own parent ({relation} {ref})")
        if session.get(Lineage, (run.id, parent.id, relation)) is None:
            session.add(Lineage(child_id=run.id, parent_id=parent.id, relation=relation))


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _touch_artifact(session: Session, registry: Registry, manifest: dict, now) -> None:
    """Insert or refresh the artifact's row; inside the transaction, so a concurrent gc (which only deletes rows
    idle for its grace period) cannot remove it between this check and the commit."""
    if not art.has(registry.store, manifest["digest"]):
        raise RegistryError(f"artifact {manifest['digest']} vanished from {registry.store.url} mid-registration; "
                            "register again")
    row = session.get(Artifact, manifest["digest"])
    if row is None:
        session.add(Artifact(digest=manifest["digest"], kind=manifest["kind"], size_bytes=manifest["size_bytes"],
                             file_count=len(manifest["files"]), created_at=now, last_used_at=now))
    else:
        row.last_used_at = now


# ---------------------------------------------------------------------------------------------- lookup
def find_run(session: Session, ref: str) -> Run:
    """Resolve a ref (NAME@VERSION, NAME@latest, alias, NAME) to its run row, or explain what exists."""
    ref = str(ref).strip()
    if "@" in ref:
        name, _, version = ref.rpartition("@")
        query = select(Run).where(Run.name == name)
        if version == "latest":
            run = session.scalars(query.order_by(Run.version.desc())).first()
        elif version.isdigit():
            run = session.scalars(query.where(Run.version == int(version))).first()
        else:
            raise RegistryError(f"{ref!r}: expected NAME@VERSION with a number (or NAME@latest)")
    else:
        alias = session.get(Alias, ref)
        if alias is not None:
            return session.get(Run, alias.run_id)
        name = ref
        run = session.scalars(select(Run).where(Run.name == ref).order_by(Run.version.desc())).first()
    if run is None:
        versions = session.scalars(select(Run.version).where(Run.name == name).order_by(Run.version)).all()
        hint = f"versions of {name}: {', '.join(map(str, versions))}" if versions else "see `tunesmith runs list`"
        raise RegistryError(f"no run {ref!r} in the registry ({hint})")
    return run


def ref_of(run: Run) -> str:
    return f"{run.name}@{run.version}"


def run_record(session: Session, run: Run, full: bool = False) -> dict[str, Any]:
    """A run as plain data (what `runs show --json` prints); `full` adds config, summary, eval, data manifest."""
    aliases = session.scalars(select(Alias.name).where(Alias.run_id == run.id).order_by(Alias.name)).all()
    parents = session.execute(
        select(Run, Lineage.relation).join(Lineage, Lineage.parent_id == Run.id).where(Lineage.child_id == run.id)
    ).all()
    children = session.execute(
        select(Run, Lineage.relation).join(Lineage, Lineage.child_id == Run.id).where(Lineage.parent_id == run.id)
    ).all()
    summary = json.loads(run.summary_json) if run.summary_json else None
    record = {
        "ref": ref_of(run), "name": run.name, "version": run.version, "id": run.id, "status": run.status,
        "created_at": run.created_at.isoformat() + "Z", "updated_at": run.updated_at.isoformat() + "Z",
        "run_dir": run.run_dir, "method": run.method, "base_model": run.base_model,
        "base_model_path": run.base_model_path, "base_model_hash": run.base_model_hash,
        "data_hash": run.data_hash, "data_location": json.loads(run.data_location or "[]"),
        "adapter_digest": run.adapter_digest, "logs_digest": run.logs_digest, "code_version": run.code_version,
        "aliases": list(aliases),
        "parents": [{"ref": ref_of(r), "relation": rel} for r, rel in parents],
        "children": [{"ref": ref_of(r), "relation": rel} for r, rel in children],
        "best_eval_loss": (summary or {}).get("best_eval_loss"),
    }
    if full:
        record["config"] = yaml.safe_load(run.config_yaml) or {}
        record["config_yaml"] = run.config_yaml
        record["summary"] = summary
        record["eval"] = json.loads(run.eval_json) if run.eval_json else None
        record["data_manifest"] = json.loads(run.data_manifest_json) if run.data_manifest_json else None
    return record


def show_run(ref: str, url: str | Path | None = None) -> dict[str, Any]:
    registry = open_registry(url)
    return read(registry, lambda s: run_record(s, find_run(s, ref), full=True))


def list_runs(url: str | Path | None = None, name: str | None = None, include_archived: bool = False) -> list[dict]:
    def work(session: Session) -> list[dict]:
        query = select(Run).order_by(Run.name, Run.version)
        if name:
            query = query.where(Run.name == name)
        if not include_archived:
            query = query.where(Run.status != "archived")
        return [run_record(session, run) for run in session.scalars(query)]

    return read(open_registry(url), work)


def lineage(ref: str, url: str | Path | None = None) -> dict[str, list[dict]]:
    """Transitive ancestors and descendants of a run: [{ref, relation, depth}], nearest first (breadth-first)."""

    def walk(session: Session, start: Run, upward: bool) -> list[dict]:
        seen, out, frontier, depth = {start.id}, [], [start.id], 0
        while frontier:
            depth += 1
            mine, theirs = (Lineage.child_id, Lineage.parent_id) if upward else (Lineage.parent_id, Lineage.child_id)
            rows = session.execute(select(theirs, Lineage.relation).where(mine.in_(frontier))).all()
            frontier = []
            for other_id, relation in sorted(rows):
                if other_id not in seen:
                    seen.add(other_id)
                    frontier.append(other_id)
                    out.append({"ref": ref_of(session.get(Run, other_id)), "relation": relation, "depth": depth})
        return out

    def work(session: Session) -> dict[str, list[dict]]:
        run = find_run(session, ref)
        return {"ref": ref_of(run), "ancestors": walk(session, run, True), "descendants": walk(session, run, False)}

    return read(open_registry(url), work)


def set_archived(ref: str, url: str | Path | None = None, restore: bool = False) -> dict[str, Any]:
    """Archive a run (hidden from `list`, cannot be promoted; its artifacts are kept) or restore it."""

    def work(session: Session) -> dict[str, Any]:
        run = find_run(session, ref)
        if restore:
            if run.status == "archived":
                run.status = "finished" if run.adapter_digest else "failed"
        else:
            holders = session.scalars(select(Alias.name).where(Alias.run_id == run.id)).all()
            if holders:
                raise RegistryError(f"{ref_of(run)} serves alias {', '.join(holders)}; promote another run or "
                                    f"`tunesmith runs rollback --alias {holders[0]}` first")
            run.status = "archived"
        run.updated_at = utcnow()
        return run_record(session, run)

    return write(open_registry(url), work)
