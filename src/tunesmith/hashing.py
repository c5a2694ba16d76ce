"""The one file hasher: sha256 of a file's bytes, read in 1 MiB chunks (constant memory for multi-GB weights).

`file_sha256` returns "sha256:<hex>" (the form run records store); `file_hexdigest` the bare hex (the form the
content-addressed registry store names objects by). hashlib does the work; this module only fixes the chunking
and the two spellings so that every caller hashes the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def file_hexdigest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    return "sha256:" + file_hexdigest(path)
