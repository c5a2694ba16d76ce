"""eval.json: one record for what `tunesmith train` (test splits after training) and `tunesmith eval` write.

Before this record the two commands wrote two shapes: the trainer only {"models": ...}, `tunesmith eval` a fuller
file with "version": 1. Both now write `EvalReport` (schema_version 2); `EvalReport.read` still reads both old
shapes (schema_version 0 = the trainer's, 1 = `tunesmith eval`'s), so run directories written before keep working.

Shapes of the nested parts (written by eval/task.py, read by the eval report, the registry and the dashboard):
    models:  {"base"|"tuned": {split: {"n", "total", "metrics": {name: value}, "scored", "skipped", "examples",
              "seconds", "files"}}}
    data:    {split: {"files" (resolved), "hash" (snapshot of the evaluated records), "n_total", "n_evaluated",
              "subset"}}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_json
from tunesmith.records.files import read_record_json

EVAL_SCHEMA_VERSION = 2
EVAL_FILE = "eval.json"


@dataclass
class EvalReport:
    models: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    metric_options: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] | None = None  # {"max_new_tokens", "batch_size", "max_examples", "decoding"}
    written_by: str = "eval"  # "train" (after training) or "eval" (`tunesmith eval`)
    run_dir: str | None = None
    evaluated: str | None = None  # the path `tunesmith eval` was given
    model: dict[str, Any] | None = None  # {"method", "base_model", "adapter_dir", "run_dir"}
    created: str | None = None
    forgetting: dict[str, Any] | None = None
    lm_eval: dict[str, Any] | None = None
    comparison: list[dict[str, Any]] = field(default_factory=list)  # rows of the printed table
    wall_seconds: float | None = None
    schema_version: int = EVAL_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept on rewrite
    paths: dict[str, str] = field(default_factory=dict, compare=False)  # where it was written; not in the file

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {**{k: v for k, v in data.items() if k not in ("extra", "paths")}, **data["extra"]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        data = dict(data)
        if "schema_version" not in data:  # files written before this record
            legacy = data.pop("version", 0)
            data["schema_version"] = legacy
            data.setdefault("written_by", "eval" if legacy else "train")
        known = {f.name for f in fields(cls)} - {"extra", "paths"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def compact_metrics(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{model: {split: {metric: value}}}: what summary.json keeps of an evaluation."""
        return {label: {split: r["metrics"] for split, r in results.items()} for label, results in self.models.items()}

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / EVAL_FILE
        write_json(path, self.to_dict())
        self.paths["eval_json"] = str(path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> EvalReport:
        """Read eval.json (a file, or the folder holding it)."""
        return cls.from_dict(read_record_json(path, EVAL_FILE))
