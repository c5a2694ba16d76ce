"""PlanReport: what `tunesmith plan` found, written by `--json` and read back through the same type.

One record per plan: the model's facts, the budget, the assumptions behind every number, the decision step, one
`MethodPlan` per registered method (exact trainable count, memory breakdown of the configuration the solver chose,
whether and how it fits) and the recommendation with its reasons. `schema_version` changes when a key changes
meaning; `PlanReport.from_dict` refuses a version it does not know.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tunesmith.errors import UsageError

SCHEMA_VERSION = 1


class PlanRecordError(UsageError):
    """A plan file is not a PlanReport this version of tunesmith can read; names the file and the key."""


@dataclass
class MethodPlan:
    """One method on one model and budget: counts, the memory of the chosen knobs, and the verdict."""

    trainable_params: int
    trainable_percent: float
    trainable_formula: str
    memory_bytes: dict[str, int]  # weights, trainable, gradients, master_weights, optimizer, activations, overhead, total
    fits: bool
    gpus_needed: dict[str, int | None]  # {"unsharded": 1 | None, "sharded": N | None} for the chosen knobs
    notes: list[str] = field(default_factory=list)
    quant_constant_bits_per_param: float | None = None
    description: str = ""
    solution: dict[str, Any] | None = None  # the solver's knobs (plan/solve.py Solution.as_dict), None if not solved
    why_not: str | None = None  # when it does not fit: why, and what would make it fit


@dataclass
class PlanReport:
    model: dict[str, Any]
    budget: dict[str, Any]
    assumptions: list[str]
    decision: dict[str, Any]
    methods: dict[str, MethodPlan]
    recommendation: dict[str, Any]
    written: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<plan>") -> PlanReport:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanRecordError(f"{source}: schema_version {version!r}, this tunesmith reads {SCHEMA_VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PlanRecordError(f"{source}: unknown keys {sorted(unknown)} for a plan report")
        method_keys = {f.name for f in fields(MethodPlan)}
        methods = {}
        for name, entry in data.get("methods", {}).items():
            extra = set(entry) - method_keys
            if extra:
                raise PlanRecordError(f"{source}: methods.{name} has unknown keys {sorted(extra)}")
            methods[name] = MethodPlan(**entry)
        return cls(**{**data, "methods": methods})

    @classmethod
    def read(cls, path: str | Path) -> PlanReport:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PlanRecordError(f"{path}: not JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    def write(self, path: str | Path) -> Path:
        from tunesmith.atomic import write_text

        path = Path(path)
        write_text(path, self.to_json() + "\n")
        return path
