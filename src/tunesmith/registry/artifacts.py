"""Content-addressed artifact store (adapters, logs) on a local folder or any fsspec URL, plus content hashes.

Digest of a folder (an "artifact tree"):
    D = sha256( concat over files f sorted by relative POSIX path:  path(f) + "\\0" + hex(sha256(bytes(f))) + "\\n" )
written "sha256:<hex>". Identical folders get identical digests, so an adapter is stored once however many runs
refer to it; renaming or editing any file changes the digest.

Layout under the store root:
    objects/<hex[:2]>/<hex>/...   the files, exactly as in the source folder (a PEFT adapter folder stays loadable)
    manifests/<hex>.json          written last: an object counts as present only once its manifest exists
    tmp/                          staging for local writes
Local writes copy into tmp/ then rename the whole folder into place (atomic on one filesystem), then write the
manifest with os.replace. Remote stores (S3, GCS, memory://) have no atomic folder rename, so files are uploaded
in place and the manifest, uploaded last, is the commit point; a half upload has no manifest and `gc` removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tunesmith.atomic import write_text as atomic_write_text
from tunesmith.hashing import file_hexdigest
from tunesmith.registry import hooks
from tunesmith.registry.errors import ArtifactError

# ------------------------------------------------------------------------------------------- hashing
file_sha256 = file_hexdigest  # bare hex: objects are named by it (tunesmith.hashing is the one file hasher)


def tree_files(folder: str | Path, suffix: str | None = None) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every regular file under `folder`, sorted; symlinks are followed."""
    root = Path(folder)
    found = []
    for path in root.rglob("*"):
        if path.is_file() and (suffix is None or path.name.endswith(suffix)):
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def tree_digest(entries: list[tuple[str, str]]) -> str:
    """Digest of (relative path, file sha256 hex) pairs, per the formula in the module docstring."""
    digest = hashlib.sha256()
    for rel, sha in sorted(entries):
        digest.update(f"{rel}\0{sha}\n".encode())
    return "sha256:" + digest.hexdigest()


def hash_folder(folder: str | Path, suffix: str | None = None, cached: bool = False) -> tuple[str, list[dict]]:
    """(digest, [{path, sha256, size}]) of a folder; `cached` reuses hashes of unchanged files (see below)."""
    files = []
    for rel, path in tree_files(folder, suffix):
        sha = cached_file_sha256(path) if cached else file_sha256(path)
        files.append({"path": rel, "sha256": sha, "size": path.stat().st_size})
    return tree_digest([(f["path"], f["sha256"]) for f in files]), files


def hash_cache_path() -> Path:
    root = Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))
    return root / "hash-cache.json"


def cached_file_sha256(path: str | Path) -> str:
    """sha256 of a large file (base model weights), cached by (absolute path, size, mtime_ns).

    Hashing a multi-GB base model takes seconds to minutes; every registration would pay it again. A changed file
    changes its size or mtime, so the key invalidates itself. The cache is a small JSON file written atomically;
    concurrent writers may drop each other's entries, which only costs a recomputation.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    sha = file_sha256(path)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
    cache[key] = sha
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache_file, json.dumps(cache, indent=0))
    return sha


# --------------------------------------------------------------------------------------------- store
@dataclass(frozen=True)
class ArtifactStore:
    url: str
    fs: Any  # fsspec.AbstractFileSystem
    root: str

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def object_path(self, digest: str) -> str:
        hexd = hex_of(digest)
        return f"{self.root}/objects/{hexd[:2]}/{hexd}"

    def manifest_path(self, digest: str) -> str:
        return f"{self.root}/manifests/{hex_of(digest)}.json"


def hex_of(digest: str) -> str:
    hexd = digest.removeprefix("sha256:")
    if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise ArtifactError(f"{digest!r} is not a sha256 digest ('sha256:' + 64 hex digits)")
    return hexd


def open_store(url: str | Path) -> ArtifactStore:
    """A local folder or an fsspec URL (memory://..., s3://..., file://...)."""
    fs, root = fsspec.core.url_to_fs(str(url))
    root = root.rstrip("/") or "/"
    if isinstance(fs, LocalFileSystem):
        Path(root).mkdir(parents=True, exist_ok=True)
    return ArtifactStore(str(url), fs, root)


def has(store: ArtifactStore, digest: str) -> bool:
    return bool(store.fs.exists(store.manifest_path(digest)))


def read_manifest(store: ArtifactStore, digest: str) -> dict:
    try:
        return json.loads(store.fs.cat_file(store.manifest_path(digest)))
    except FileNotFoundError as exc:
        raise ArtifactError(f"artifact {digest} is missing from {store.url}") from exc


def put_folder(store: ArtifactStore, folder: str | Path, kind: str) -> dict:
    """Store every file of a folder once; return its manifest (plus `new`: whether this call stored it)."""
    return put_files(store, tree_files(folder), kind)


def put_files(store: ArtifactStore, files: list[tuple[str, Path]], kind: str) -> dict:
    """Store (relative path, source file) pairs as one artifact tree; identical content is stored once."""
    entries = [{"path": rel, "sha256": file_sha256(src), "size": Path(src).stat().st_size} for rel, src in files]
    digest = tree_digest([(e["path"], e["sha256"]) for e in entries])
    manifest = {
        "digest": digest,
        "kind": kind,
        "files": entries,
        "size_bytes": sum(e["size"] for e in entries),
        "created_at": time.time(),
    }
    if has(store, digest):
        return {**manifest, "new": False}
    sources = {rel: Path(src) for rel, src in files}
    if store.local:
        _put_local(store, sources, manifest)
    else:
        _put_remote(store, sources, manifest)
    return {**manifest, "new": True}


def _put_local(store: ArtifactStore, sources: dict[str, Path], manifest: dict) -> None:
    final = Path(store.object_path(manifest["digest"]))
    staging = Path(store.root) / "tmp" / f"{hex_of(manifest['digest'])[:16]}-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        for item in manifest["files"]:
            target = staging / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sources[item["path"]], target)
            with open(target, "rb+") as handle:
                os.fsync(handle.fileno())
        staged = tree_digest([(rel, file_sha256(path)) for rel, path in tree_files(staging)])
        if staged != manifest["digest"]:  # a source file changed while being copied: never store a misnamed object
            raise ArtifactError(f"files changed while being stored (expected {manifest['digest']}, copied {staged}); "
                                "register again once the run directory is no longer being written")
        hooks.checkpoint("artifact-staged")
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, final)  # atomic; fails if another writer already put the same digest
        except OSError:
            if not final.is_dir():
                raise
        hooks.checkpoint("artifact-renamed")
        manifests = Path(store.root) / "manifests"
        manifests.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifests / f"{hex_of(manifest['digest'])}.json", json.dumps(manifest, indent=1))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _put_remote(store: ArtifactStore, sources: dict[str, Path], manifest: dict) -> None:
    base = store.object_path(manifest["digest"])
    for item in manifest["files"]:
        store.fs.makedirs(f"{base}/{item['path']}".rsplit("/", 1)[0], exist_ok=True)
        store.fs.put_file(str(sources[item["path"]]), f"{base}/{item['path']}")
    hooks.checkpoint("artifact-renamed")
    store.fs.makedirs(f"{store.root}/manifests", exist_ok=True)
    store.fs.pipe_file(store.manifest_path(manifest["digest"]), json.dumps(manifest, indent=1).encode())


def materialize(store: ArtifactStore, digest: str, cache_root: str | Path | None = None) -> Path:
    """A local folder holding the artifact's files: the object folder itself for a local store (read it, never
    write it), else a verified copy under the cache (downloaded to a temp folder, checked, renamed into place)."""
    manifest = read_manifest(store, digest)
    if store.local:
        return Path(store.object_path(digest))
    root = Path(cache_root or hash_cache_path().parent / "registry-objects")
    target = root / hex_of(digest)
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        for item in manifest["files"]:
            local = staging / item["path"]
            local.parent.mkdir(parents=True, exist_ok=True)
            store.fs.get_file(f"{store.object_path(digest)}/{item['path']}", str(local))
        got, _ = hash_folder(staging)
        if got != digest:
            raise ArtifactError(f"artifact {digest} in {store.url} is corrupt: its files hash to {got}")
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def verify(store: ArtifactStore, digest: str) -> bool:
    """Recompute the digest from the stored files (slow; `tunesmith runs check --deep`)."""
    manifest = read_manifest(store, digest)
    entries = []
    for item in manifest["files"]:
        try:
            data = store.fs.cat_file(f"{store.object_path(digest)}/{item['path']}")
        except FileNotFoundError:
            return False
        entries.append((item["path"], hashlib.sha256(data).hexdigest()))
    return tree_digest(entries) == digest


def delete(store: ArtifactStore, digest: str) -> None:
    """Manifest first (the object stops being 'present'), then the files."""
    for path in (store.manifest_path(digest), store.object_path(digest)):
        if store.fs.exists(path):
            store.fs.rm(path, recursive=True)


def stored_objects(store: ArtifactStore) -> dict[str, float | None]:
    """digest -> age reference time (manifest created_at, else file mtime, else None) of everything stored,
    complete or not; used by gc to find objects no database row refers to."""
    found: dict[str, float | None] = {}
    objects = f"{store.root}/objects"
    if not store.fs.exists(objects):
        return found
    for prefix in store.fs.ls(objects, detail=False):
        for obj in store.fs.ls(prefix, detail=False):
            hexd = str(obj).rstrip("/").rsplit("/", 1)[-1]
            digest = f"sha256:{hexd}"
            try:
                found[digest] = read_manifest(store, digest)["created_at"]
            except ArtifactError:
                found[digest] = _mtime(store, str(obj))
    manifests = f"{store.root}/manifests"
    if store.fs.exists(manifests):  # a manifest whose object folder vanished also counts as stored (and broken)
        for path in store.fs.ls(manifests, detail=False):
            name = str(path).rsplit("/", 1)[-1]
            if name.endswith(".json"):
                found.setdefault(f"sha256:{name[:-5]}", None)
    return found


def _mtime(store: ArtifactStore, path: str) -> float | None:
    try:
        info = store.fs.info(path)
    except FileNotFoundError:
        return None
    for key in ("mtime", "created", "LastModified"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
    return None
