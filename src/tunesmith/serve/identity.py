"""Which base model an adapter belongs to, decided by what the model is rather than by how it was named.

An adapter records `base_model_name_or_path`: a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) or a local path.
The server's base may be named the other way round (the local copy of that hub id, or the hub id of that local
folder), so comparing strings refuses adapters made for this very model. The check, in order:
1. not recorded: accepted (nothing to compare; the shapes are still checked against the base).
2. names: the recorded string is one of the server base's names (as given, resolved path, the local copy of a hub
   id, config._name_or_path).
3. local copy: the recorded name resolves to a local folder (a directory, or the local copy of a hub id found by
   `registry.runs.resolve_base_folder`: tunesmith's model cache, then the Hugging Face cache) that is the base's.
4. fingerprint: that folder holds the same model as the base's folder,
       F = sha256( config.json without its naming/version keys, canonical JSON  +  "\\0"
                   + tree digest of the *.safetensors files (registry.artifacts: relative path + sha256 per file) )
   Per-file hashes are cached by (path, size, mtime), so a large base is read once per machine, not per adapter.
Anything else is a different base: refused with a message naming both, unless the server runs with
--allow-base-mismatch (experts: a re-saved copy in another dtype, say), which logs a warning per adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tunesmith.serve")
# Keys that name or date a saved config without changing the model it describes.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "name_or_path"}


def local_folder(name_or_path: str | None) -> Path | None:
    """The local folder of a model path or hub id, or None when no local copy exists."""
    from tunesmith.registry.runs import resolve_base_folder  # the one resolver the registry also uses

    try:
        folder = resolve_base_folder(name_or_path)
    except Exception:  # an unusual name (not a path, not a valid repo id): no local copy
        return None
    return Path(folder).resolve() if folder is not None and (Path(folder) / "config.json").is_file() else None


def fingerprint(folder: Path) -> str | None:
    """F in the module docstring, or None when the folder holds no config.json or no safetensors weights."""
    from tunesmith.registry.artifacts import hash_folder

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    weights, files = hash_folder(folder, suffix=".safetensors", cached=True)
    if not files:
        return None
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode() + b"\0" + weights.encode())
    return "sha256:" + digest.hexdigest()


class BaseMismatch(ValueError):
    """Raised by BaseIdentity.check for an adapter recorded for another base model."""


@dataclass
class BaseIdentity:
    """The server's base model: the names it goes by, its local folder, and (lazily) its fingerprint."""

    names: set[str]
    folder: Path | None = None
    _fingerprint: str | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def of(cls, name_or_path: str, *other_names: str) -> BaseIdentity:
        names = {n for n in (name_or_path, name_or_path.rstrip("/"), *other_names) if n}
        folder = next((f for f in map(local_folder, [name_or_path, *sorted(other_names)]) if f is not None), None)
        if folder is not None:
            names.add(str(folder))
        return cls(names, folder)

    @property
    def label(self) -> str:
        return sorted(self.names, key=len)[0] if self.names else "?"

    def fingerprint(self) -> str | None:
        with self._lock:
            if self._fingerprint is None and self.folder is not None:
                self._fingerprint = fingerprint(self.folder)
            return self._fingerprint

    def check(self, recorded: str | None) -> str:
        """How `recorded` was recognised as this base (step 1-4 of the module docstring); BaseMismatch otherwise."""
        if not recorded:
            return "no base recorded"
        if recorded in self.names or recorded.rstrip("/") in self.names:
            return "same name"
        other = local_folder(recorded)
        if other is not None and str(other) in self.names:
            return f"same local copy ({other})"
        mine = self.fingerprint()
        theirs = fingerprint(other) if other is not None else None
        if mine is not None and mine == theirs:
            return f"same config and weights ({mine[:19]}) in {other}"
        where = (f"its local copy {other} has fingerprint {theirs and theirs[:19]}" if other is not None
                 else "no local copy of it was found to compare")
        server = f"{self.label!r}" + (f" ({self.folder}, fingerprint {mine and mine[:19]})" if self.folder else "")
        raise BaseMismatch(f"recorded for base {recorded!r} ({where}), but this server's base is {server}")
