"""manifest.json of `tunesmith data prepare` (and the result of `data check`): one typed record.

Before this record the manifest was a dict with private `_splits/_quarantine/_removed` keys popped before writing;
the pipeline now returns those beside the manifest (`data.prepare.PipelineResult`), and every reader goes through
`DataManifest`. Files written before versioning (no `schema_version`) read as version 1; keys this version does not
know are kept in `extra` and written back.

Counting identity (asserted when the manifest is built):
    input = kept + quarantined + duplicates_exact + duplicates_near + trimmed + pii_dropped + leakage_removed
Shapes of the nested reports (written by data/, read by the report, the CLI and the trainer):
    splits:  {name: SplitInfo(count, hash, path)}         pii: {TYPE: count}
    lengths: {"unit", "trim_limit", "before_trim", "after_trim"}   diversity: {"clusters", "sizes", ...}
    leakage: {"threshold", "pairs": [...]}                report: {"markdown", "html", chart name: path}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_json
from tunesmith.records.files import read_record_json, split_known

DATA_SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
COUNT_PARTS = ("kept", "quarantined", "duplicates_exact", "duplicates_near", "trimmed", "pii_dropped",
               "leakage_removed")
COUNT_ROWS = ("input", *COUNT_PARTS)


@dataclass
class SplitInfo:
    count: int
    hash: str
    path: str | None = None


@dataclass
class DataManifest:
    input: int = 0
    kept: int = 0
    quarantined: int = 0
    duplicates_exact: int = 0
    duplicates_near: int = 0
    trimmed: int = 0
    pii_dropped: int = 0
    leakage_removed: int = 0
    pii: dict[str, int] = field(default_factory=dict)  # findings by type (values never stored)
    pii_mode: str = "redact"
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, Any] = field(default_factory=dict)
    diversity: dict[str, Any] = field(default_factory=dict)
    leakage: dict[str, Any] = field(default_factory=dict)
    near_dedup: dict[str, Any] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected (or forced) format
    tool_conversations: int = 0  # kept conversations that carry tool definitions or tool calls
    files: list[dict[str, Any]] = field(default_factory=list)  # {"path", "sha256"}
    options: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)  # {"holds", "formula"}
    quarantine_path: str | None = None
    removed_path: str | None = None
    findings_path: str | None = None
    report: dict[str, str] = field(default_factory=dict)
    schema_version: int = DATA_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept on rewrite

    def count_identity(self) -> dict[str, Any]:
        total = sum(getattr(self, part) for part in COUNT_PARTS)
        formula = f"input {self.input} = " + " + ".join(f"{part} {getattr(self, part)}" for part in COUNT_PARTS)
        return {"holds": total == self.input, "formula": formula}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {**{k: v for k, v in data.items() if k != "extra"}, **data["extra"]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataManifest:
        data = dict(data)
        data.setdefault("schema_version", 1)  # written before this record
        values, extra = split_known(cls, data)
        values["splits"] = {name: s if isinstance(s, SplitInfo) else SplitInfo(**s)
                            for name, s in (values.get("splits") or {}).items()}
        return cls(**values, extra=extra)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, path: str | Path) -> DataManifest:
        return cls.from_dict(read_record_json(path, MANIFEST_FILE))
