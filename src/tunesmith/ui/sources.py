"""Where the dashboard's runs come from: the registry's runs, plus run directories in a runs folder that are not
registered (yet): a run still training is registered only when it finishes, and the dashboard shows it live.

A run is named in requests by an id: `NAME@VERSION` for a registered run (looked up in the registry, never as a
path), or `dir:FOLDER` for an unregistered run directory directly inside the runs folder. A folder name must be
one plain path component, and the resolved folder (symlinks followed) must sit directly inside the resolved runs
folder, so no request can read outside it (`dir:..`, `dir:../x`, `dir:/etc`, `dir:a/../../b` are refused).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import UsageError
from tunesmith.records.metrics import parse_metrics_lines

DIR_PREFIX = "dir:"
FOLDER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
X_KEYS = ("step", "epoch", "tokens")
LIVE_SECONDS = 600  # an unregistered run without summary.json whose metrics.jsonl moved this recently is "running"


class UIError(Exception):
    """A request the dashboard cannot answer, phrased for a person; `status` is the HTTP status to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class RunView:
    """One run as the dashboard sees it: the registry's record (when registered) plus its run directory."""

    id: str
    name: str
    run_dir: Path | None
    registered: bool
    version: int | None = None
    status: str = "unknown"
    aliases: list[str] = field(default_factory=list)
    method: str | None = None
    base_model: str | None = None
    data_hash: str | None = None
    created_at: str | None = None
    logs_digest: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None

    @property
    def live(self) -> bool:
        return self.status == "running"


# ------------------------------------------------------------------------------------------ metrics.jsonl
_METRICS_CACHE: dict[str, tuple[tuple[int, int], list[dict[str, Any]]]] = {}


def read_metrics_live(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records in file order, like `records.metrics.read_metrics`, except that a last line without its
    newline (the trainer is writing it right now) is left for the next poll instead of raising. Cached by
    (mtime, size), so polling an unchanged file costs one stat."""
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _METRICS_CACHE.get(str(path))
    if cached and cached[0] == key:
        return cached[1]
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # incomplete last line: written next
    try:
        records = parse_metrics_lines(lines, path)
    except UsageError as exc:
        raise UIError(500, str(exc)) from exc
    _METRICS_CACHE[str(path)] = (key, records)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def xy_series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, values) of records carrying a finite `key` and a finite `x`. For x="step" this is exactly
    `tunesmith.eval.plots.series`, the function that draws loss_curves.png (a test holds the two together),
    except that infinite values are dropped too: matplotlib leaves them undrawn, and JSON cannot carry them."""
    if x not in X_KEYS:
        raise UIError(400, f"x axis {x!r}: expected one of {', '.join(X_KEYS)}")
    xs, values = [], []
    for record in records:
        if _number(record.get(key)) and _number(record.get(x)):
            xs.append(float(record[x]))
            values.append(float(record[key]))
    return xs, values


# ---------------------------------------------------------------------------------------------- catalog
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a file being rewritten right now; the next poll reads it (writers replace atomically)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


class Catalog:
    """Registered runs (one read of the registry per call) and unregistered run directories of `runs_dir`."""

    def __init__(self, registry_url: str | Path | None = None, runs_dir: str | Path | None = "runs") -> None:
        self.registry_url = registry_url
        self.runs_dir = Path(runs_dir).expanduser().resolve() if runs_dir else None
        self._cache: tuple[tuple, list[RunView]] | None = None

    # registry ----------------------------------------------------------------------------------------
    def _registered(self, name: str | None = None, version: int | None = None) -> list[RunView]:
        """Registered runs (all, or the one NAME@VERSION) with their full records, in one read transaction.

        The full list is cached under a stamp that one cheap query reads (run count, latest run update, alias
        event count): every registration, archive, promote and rollback changes it. Measured with 60 runs on the
        loaded 2-core machine (load ~20): the full read took ~250 ms, which a poll every 2 s would repeat."""
        from sqlalchemy import func, select

        from tunesmith.registry.runs import run_record
        from tunesmith.registry.schema import AliasEvent, Run
        from tunesmith.registry.store import open_registry, read

        registry = open_registry(self.registry_url)
        stamp = None
        if name is None:
            stamp = read(registry, lambda s: (*s.execute(select(func.count(Run.id), func.max(Run.updated_at))).one(),
                                              s.scalar(select(func.count(AliasEvent.id)))))
            if self._cache is not None and self._cache[0] == stamp:
                return self._cache[1]

        def work(session) -> list[dict[str, Any]]:
            query = select(Run).order_by(Run.name, Run.version)
            if name is not None:
                query = query.where(Run.name == name, Run.version == version)
            runs = session.scalars(query)
            return [{**run_record(session, run, full=True), "logs_digest": run.logs_digest} for run in runs]

        views = [self._from_record(r) for r in read(registry, work)]
        if stamp is not None:
            self._cache = (stamp, views)
        return views

    def _from_record(self, record: dict[str, Any]) -> RunView:
        run_dir = Path(record["run_dir"])
        return RunView(
            id=record["ref"], name=record["name"], version=record["version"], registered=True,
            run_dir=run_dir if run_dir.is_dir() else None, status=record["status"], aliases=record["aliases"],
            method=record["method"], base_model=record["base_model"], data_hash=record["data_hash"],
            created_at=record["created_at"], logs_digest=record.get("logs_digest"), config=record.get("config") or {},
            summary=record.get("summary"), eval=record.get("eval"), manifest=record.get("data_manifest"),
        )

    # run folders -------------------------------------------------------------------------------------
    def _folder_view(self, folder: Path) -> RunView:
        config = _read_yaml(folder / "config.yaml")
        summary = _read_json(folder / "summary.json")
        metrics = folder / "metrics.jsonl"
        if summary:
            status = summary.get("status") or "finished"
        elif metrics.is_file() and time.time() - metrics.stat().st_mtime < LIVE_SECONDS:
            status = "running"
        else:
            status = "incomplete"
        manifest = _read_json(folder / "data_manifest.json")
        return RunView(
            id=DIR_PREFIX + folder.name, name=(summary or {}).get("name") or folder.name, run_dir=folder,
            registered=False, status=str(status), method=(summary or {}).get("method") or (config.get("method") or {}).get("name"),
            base_model=(config.get("model") or {}).get("name_or_path"), data_hash=(manifest or {}).get("hash"),
            config=config, summary=summary, eval=_read_json(folder / "eval.json"), manifest=manifest,
        )

    def folder(self, name: str) -> RunView:
        """The unregistered run directory `name`, which must lie directly inside the runs folder."""
        if self.runs_dir is None:
            raise UIError(404, "no runs folder given (tunesmith ui --runs DIR)")
        if not FOLDER_NAME.match(name):
            raise UIError(404, f"{name!r} is not a run folder name (one path component: letters, digits, . _ -)")
        path = (self.runs_dir / name).resolve()
        if path.parent != self.runs_dir or not (path / "config.yaml").is_file():
            raise UIError(404, f"no run directory {name!r} in {self.runs_dir}")
        return self._folder_view(path)

    def runs(self) -> list[RunView]:
        registered = self._registered()
        seen = {str(v.run_dir) for v in registered if v.run_dir is not None}
        views = list(registered)
        if self.runs_dir is not None and self.runs_dir.is_dir():
            for folder in sorted(self.runs_dir.iterdir()):
                if (FOLDER_NAME.match(folder.name) and folder.is_dir() and (folder / "config.yaml").is_file()
                        and str(folder.resolve()) not in seen and folder.resolve().parent == self.runs_dir):
                    views.append(self._folder_view(folder.resolve()))
        return views

    def get(self, run_id: str) -> RunView:
        run_id = str(run_id)
        if run_id.startswith(DIR_PREFIX):
            return self.folder(run_id[len(DIR_PREFIX):])
        name, at, version = run_id.rpartition("@")
        if not at or not name or not version.isdigit():
            raise UIError(404, f"run id {run_id!r}: expected NAME@VERSION (registered) or dir:FOLDER")
        found = self._registered(name, int(version))
        if found:
            return found[0]
        raise UIError(404, f"no run {run_id!r} in the registry")

    # files of a run ----------------------------------------------------------------------------------
    def metrics(self, view: RunView) -> list[dict[str, Any]]:
        """The run's metrics.jsonl: from its run directory, else from the logs the registry stored."""
        if view.run_dir is not None and (view.run_dir / "metrics.jsonl").is_file():
            return read_metrics_live(view.run_dir / "metrics.jsonl")
        if view.logs_digest:
            from tunesmith.registry import artifacts as art
            from tunesmith.registry.store import open_registry

            folder = art.materialize(open_registry(self.registry_url).store, view.logs_digest)
            if (folder / "metrics.jsonl").is_file():
                return read_metrics_live(folder / "metrics.jsonl")
        return []

    def diagnosis(self, view: RunView) -> dict[str, Any] | None:
        """diagnosis.json as the trainer wrote it; for a run still training, diagnosed now from metrics.jsonl
        with the same function (`tunesmith.eval.diagnose.diagnose`)."""
        if view.run_dir is not None:
            written = _read_json(view.run_dir / "diagnosis.json")
            if isinstance(written, dict) and not view.live:
                return written
        records = self.metrics(view)
        if not records:
            return None
        from tunesmith.eval.diagnose import diagnose

        return {**diagnose(records), "computed_by": "ui (from metrics.jsonl)"}
