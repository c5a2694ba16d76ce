"""A run directory and its summary.json, as one loader and one typed record.

`RunDir.find(path)` answers "is this a run directory or an adapter folder?" once for every reader (the eval
report, `load_trained`, merge): a run directory holds config.yaml and adapter/; an adapter folder inside a run
(`runs/<name>/adapter`) belongs to that run; any other folder is a bare adapter folder with no run around it.
`RunDir.config()` is the one reader of a run's config.yaml.

`RunSummary` is summary.json: written by the finetune recipe, read by the registry, the dashboard and tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_json
from tunesmith.records.files import read_record_json, split_known

SUMMARY_SCHEMA_VERSION = 1
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
ADAPTER_FOLDER = "adapter"
# Optional sections written only when they exist (the file's shape before versioning).
_OPTIONAL = ("eval", "diagnosis", "registry", "continued_from")


@dataclass
class RunSummary:
    """summary.json: what one finetune run did, in numbers (see the recipe for how each is measured)."""

    name: str | None = None
    method: str | None = None
    base_model: str | None = None
    run_dir: str | None = None
    steps: int = 0  # optimizer steps done
    max_steps: int = 0
    best_step: int | None = None
    best_eval_loss: float | None = None
    final_train_loss: float | None = None
    tokens_seen: int = 0  # non-padding tokens fed to the model
    target_tokens_seen: int = 0  # tokens that carried loss
    trainable_params: int = 0
    total_params: int = 0
    wall_seconds: float = 0.0
    peak_memory_bytes: int | None = None
    precision: str | None = None
    stop_reason: str | None = None
    data_hash: str | None = None
    processes: int = 1
    eval: dict[str, Any] | None = None  # {model: {split: {metric: value}}} when test data was configured
    diagnosis: str | None = None  # the loss-curve diagnosis (eval/diagnose.py)
    registry: dict[str, Any] | None = None  # {"name", "version"} once registered
    continued_from: str | None = None  # NAME@VERSION of the run this one continued (continual learning)
    schema_version: int = SUMMARY_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept on rewrite

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        for key in _OPTIONAL:
            if data[key] is None:
                del data[key]
        return {**data, **extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        values, extra = split_known(cls, data)
        values.setdefault("schema_version", 0)  # written before summary.json carried a version
        return cls(**values, extra=extra)

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / SUMMARY_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        """Read summary.json (a file, or the run directory holding it)."""
        return cls.from_dict(read_record_json(path, SUMMARY_FILE))


@dataclass(frozen=True)
class RunDir:
    """Where a run's files are, for a path that names a run directory or an adapter folder.

    root: the run directory (config.yaml, summary.json, adapter/ ...), or None for a bare adapter folder.
    adapter: the folder holding the trained method's files (it may not exist yet for an unfinished run).
    given: the path as the user gave it.
    """

    root: Path | None
    adapter: Path
    given: Path

    @classmethod
    def find(cls, path: str | Path) -> RunDir:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run directory or adapter folder")
        if (path / CONFIG_FILE).is_file():
            return cls(root=path, adapter=path / ADAPTER_FOLDER, given=path)
        if path.is_dir() and (path.parent / CONFIG_FILE).is_file():  # runs/<name>/adapter
            return cls(root=path.parent, adapter=path, given=path)
        return cls(root=None, adapter=path, given=path)

    @property
    def is_run(self) -> bool:
        """The user named the run directory itself (not an adapter folder)."""
        return self.root is not None and self.given == self.root

    @property
    def output_dir(self) -> Path:
        """Where reports about this run go (eval.json, eval.html): the run directory, else the adapter folder."""
        return self.root if self.root is not None else self.adapter

    @property
    def name(self) -> str:
        return (self.root or self.adapter).name

    def config(self):
        """The run's config.yaml as a RunConfig; the defaults for a bare adapter folder."""
        import yaml

        from tunesmith.config import ConfigError, RunConfig

        if self.root is None:
            return RunConfig()
        path = self.root / CONFIG_FILE
        try:
            # config.yaml is the resolved config (absolute paths, every key), so no path resolution here
            return RunConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        except Exception as exc:  # YAML or validation errors alike: the file is not a run config
            raise ConfigError(f"{path}: cannot be read as a run config: {exc}") from exc

    def summary(self) -> RunSummary | None:
        path = self.root / SUMMARY_FILE if self.root is not None else None
        return RunSummary.read(path) if path is not None and path.is_file() else None
