"""The JSON each page draws: runs table, compare (curves, diagnoses, config differences, task metrics and
forgetting), examples where two runs differ, and the data report of a run's snapshot.

Every value is data; the browser inserts it as text (never as HTML), so names and values holding markup are shown
as typed. Numbers are passed through unrounded: the charts plot the same values as loss_curves.png.
"""

from __future__ import annotations

import json
from typing import Any

from tunesmith.records.data import COUNT_ROWS, DataManifest
from tunesmith.records.eval import EvalReport
from tunesmith.records.run import RunSummary
from tunesmith.registry.compare import IGNORED_CONFIG_KEYS, flatten
from tunesmith.ui.sources import Catalog, RunView, UIError, xy_series

CURVES = ("train_loss", "eval_loss", "lr")
FORGETTING_KEYS = ("kl_drift", "probe_accuracy", "base_probe_accuracy", "probe_retention")


def _summary(view: RunView) -> RunSummary:
    return RunSummary.from_dict(view.summary) if isinstance(view.summary, dict) else RunSummary()


def _eval(view: RunView) -> EvalReport:
    return EvalReport.from_dict(view.eval) if isinstance(view.eval, dict) else EvalReport()


def _model_metrics(view: RunView, label: str) -> dict[str, dict[str, Any]]:
    """{split: {metric: value}} of the base or tuned model: eval.json first, else the compact copy in summary.json."""
    results = _eval(view).models.get(label)
    if isinstance(results, dict) and results:
        return {s: dict(r.get("metrics") or {}) for s, r in results.items() if isinstance(r, dict)}
    compact = (_summary(view).eval or {}).get(label) or {}
    return {s: dict(m) for s, m in compact.items() if isinstance(m, dict)}


def _tuned_metrics(view: RunView) -> dict[str, dict[str, Any]]:
    return _model_metrics(view, "tuned")


def _base_metrics(view: RunView) -> dict[str, dict[str, Any]]:
    return _model_metrics(view, "base")


def compact_eval(evaluated: dict[str, Any] | None) -> dict[str, Any] | None:
    """eval.json without the bulky per-item lists (examples, probe items); the examples view serves those."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("examples", "items")}
        return value

    return strip(evaluated) if isinstance(evaluated, dict) else None


# -------------------------------------------------------------------------------------------------- runs
def run_row(catalog: Catalog, view: RunView) -> dict[str, Any]:
    summary = _summary(view) if view.summary else None
    records = catalog.metrics(view) if view.run_dir is not None or view.logs_digest else []
    last_step = max((r["step"] for r in records if isinstance(r.get("step"), (int, float))), default=None)
    train_xs, train_ys = xy_series(records, "train_loss")
    eval_xs, eval_ys = xy_series(records, "eval_loss")
    headline: dict[str, Any] = {  # a finished run's summary.json; a live run's metrics.jsonl so far
        "step": summary.steps if summary else last_step,
        "train_loss": train_ys[-1] if train_ys else (summary.final_train_loss if summary else None),
        "best_eval_loss": summary.best_eval_loss if summary else (min(eval_ys) if eval_ys else None),
    }
    for split, metrics in _tuned_metrics(view).items():
        for metric, value in metrics.items():
            headline[f"{split}.{metric}"] = value
    return {
        "id": view.id, "name": view.name, "version": view.version, "registered": view.registered,
        "aliases": view.aliases, "method": view.method, "base_model": view.base_model, "data_hash": view.data_hash,
        "status": view.status, "live": view.live, "created_at": view.created_at, "headline": headline,
        "points": len(train_xs) + len(eval_xs),
    }


def runs_table(catalog: Catalog) -> dict[str, Any]:
    rows = [run_row(catalog, v) for v in catalog.runs()]
    columns = list(dict.fromkeys(k for r in rows for k in r["headline"]))
    return {"runs": rows, "metric_columns": columns, "live": any(r["live"] for r in rows)}


# --------------------------------------------------------------------------------------------- curves
def curves(catalog: Catalog, view: RunView, x: str = "step") -> dict[str, Any]:
    """{key: {"x": [...], "y": [...]}} for train_loss, eval_loss and lr, from metrics.jsonl."""
    records = catalog.metrics(view)
    out = {}
    for key in CURVES:
        xs, ys = xy_series(records, key, x)
        out[key] = {"x": xs, "y": ys}
    return {"id": view.id, "name": view.name, "x": x, "records": len(records), "live": view.live, "series": out}


def _label(view: RunView) -> str:
    return view.id if view.registered else f"{view.name} (unregistered)"


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def config_differences(views: list[RunView]) -> list[dict[str, Any]]:
    flat = [flatten(v.config) for v in views]
    keys = sorted(set().union(*flat)) if flat else []
    rows = []
    for key in keys:
        values = [_cell(f.get(key)) for f in flat]
        if key not in IGNORED_CONFIG_KEYS and any(v != values[0] for v in values):
            rows.append({"key": key, "values": values})
    return rows


def metric_rows(views: list[RunView]) -> dict[str, Any]:
    """Task metrics side by side: one base row per distinct base model (from the first run that measured it)
    and one row per run; columns are split.metric."""
    rows, bases = [], {}
    for view in views:
        base = _base_metrics(view)
        if base and view.base_model not in bases:
            bases[view.base_model] = {"model": f"base ({view.base_model})", "source": _label(view), "kind": "base",
                                      "metrics": {f"{s}.{m}": v for s, ms in base.items() for m, v in ms.items()}}
    rows += list(bases.values())
    for view in views:
        tuned = _tuned_metrics(view)
        rows.append({"model": _label(view), "source": "eval.json" if view.eval else "summary.json", "kind": "tuned",
                     "metrics": {f"{s}.{m}": v for s, ms in tuned.items() for m, v in ms.items()}})
    columns = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    return {"columns": columns, "rows": rows}


def forgetting_rows(catalog: Catalog, views: list[RunView]) -> list[dict[str, Any]]:
    """Per run: the forgetting measures of `tunesmith eval --forgetting` (eval.json) and, when the run logged
    them while training (eval.forgetting), the last values from metrics.jsonl."""
    rows = []
    for view in views:
        measures: dict[str, Any] = {}
        f = _eval(view).forgetting
        if isinstance(f, dict):
            acc, ppl = f.get("probe_accuracy") or {}, f.get("perplexity") or {}
            measures.update({"kl_drift": f.get("kl_drift"), "probe_accuracy.base": acc.get("base"),
                             "probe_accuracy.tuned": acc.get("tuned"), "probe_retention": f.get("probe_retention"),
                             "perplexity.base": ppl.get("base"), "perplexity.tuned": ppl.get("tuned"),
                             "perplexity_ratio": f.get("perplexity_ratio")})
        logged = [r for r in catalog.metrics(view) if any(k in r for k in FORGETTING_KEYS)]
        if logged:
            last = logged[-1]
            measures.update({f"training (step {last.get('step')}).{k}": last[k] for k in FORGETTING_KEYS if k in last})
        if measures:
            rows.append({"model": _label(view), "measures": measures})
    return rows


def compare(catalog: Catalog, ids: list[str], x: str = "step") -> dict[str, Any]:
    if len(ids) < 2:
        raise UIError(400, "compare needs two or more runs (?id=A&id=B)")
    if len(set(ids)) != len(ids):
        raise UIError(400, "compare: a run is named twice")
    views = [catalog.get(i) for i in ids]
    diagnoses = []
    for view in views:
        d = catalog.diagnosis(view)
        diagnoses.append({"id": view.id, "diagnosis": (d or {}).get("diagnosis"), "advice": (d or {}).get("advice", []),
                          "best_step": (d or {}).get("best_step"), "spikes": (d or {}).get("spikes", []),
                          "computed_by": (d or {}).get("computed_by", "diagnosis.json" if d else None)})
    return {
        "x": x, "runs": [{**curves(catalog, v, x), "label": _label(v)} for v in views], "diagnoses": diagnoses,
        "config": {"labels": [_label(v) for v in views], "differences": config_differences(views)},
        "metrics": metric_rows(views), "forgetting": forgetting_rows(catalog, views),
    }


# ------------------------------------------------------------------------------------------- examples
def _examples(view: RunView, split: str) -> list[dict[str, Any]]:
    result = (_eval(view).models.get("tuned") or {}).get(split)
    if not isinstance(result, dict) or not isinstance(result.get("examples"), list):
        raise UIError(404, f"{view.id}: eval.json has no per-example outputs for split {split!r} (run "
                           f"`tunesmith eval` on it, or configure data.test before training)")
    return result["examples"]


def _splits(view: RunView) -> list[str]:
    tuned = _eval(view).models.get("tuned") or {}
    return [s for s, r in tuned.items() if isinstance(r, dict) and isinstance(r.get("examples"), list)]


def _example_key(example: dict[str, Any]) -> str:
    """What makes two examples the same test item: the prompt turns and the reference."""
    return json.dumps([example.get("prompt"), example.get("reference")], sort_keys=True)


def examples(catalog: Catalog, id_a: str, id_b: str, split: str | None = None, limit: int = 200) -> dict[str, Any]:
    """Test items both runs answered (same prompt and reference) where the outputs or the scores differ."""
    a, b = catalog.get(id_a), catalog.get(id_b)
    common_splits = [s for s in _splits(a) if s in _splits(b)]
    split = split or (common_splits[0] if common_splits else "test")
    ex_a, ex_b = _examples(a, split), _examples(b, split)
    by_key = {}
    for example in ex_b:
        by_key.setdefault(_example_key(example), example)
    common, differing = 0, []
    for example in ex_a:
        other = by_key.get(_example_key(example))
        if other is None:
            continue
        common += 1
        if example.get("prediction") != other.get("prediction") or example.get("scores") != other.get("scores"):
            differing.append({"index_a": example.get("index"), "index_b": other.get("index"),
                              "source_file": example.get("source_file"), "line": example.get("line"),
                              "prompt": example.get("prompt"), "reference": example.get("reference"),
                              "a": {"prediction": example.get("prediction"), "scores": example.get("scores")},
                              "b": {"prediction": other.get("prediction"), "scores": other.get("scores")}})
    if common == 0:
        raise UIError(409, f"{a.id} and {b.id} share no test item on split {split!r}: not the same test set")
    hashes = [(_eval(v).data.get(split) or {}).get("hash") for v in (a, b)]
    return {"a": a.id, "b": b.id, "split": split, "splits": common_splits, "n_a": len(ex_a), "n_b": len(ex_b),
            "common": common, "differing_count": len(differing), "differing": differing[:limit],
            "shown": min(limit, len(differing)), "data_hashes": hashes}


# ----------------------------------------------------------------------------------------------- data
MIXTURE_COLUMNS = ("origin", "available", "weight", "drawn", "repeats", "unused", "realised_share")


def _mixture(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The realised task mixture of a multi-task run (recipes/multitask.py adds it to data_manifest.json)."""
    mixture = manifest.get("mixture")
    if not isinstance(mixture, dict) or not mixture:
        return None
    tasks = mixture.get("tasks") if isinstance(mixture.get("tasks"), dict) else {}
    return {"total": mixture.get("total"), "seed": mixture.get("seed"), "sampling": mixture.get("sampling"),
            "columns": list(MIXTURE_COLUMNS),
            "tasks": [{"task": name, **{c: (row or {}).get(c) for c in MIXTURE_COLUMNS}} for name, row in tasks.items()],
            "replayed_from": mixture.get("replayed_from") or {}}


def data_report(view: RunView) -> dict[str, Any]:
    """The run snapshot's data report from data_manifest.json: the prepare report (counts with their identity,
    quarantine reasons, lengths, PII counts, clusters) when the run prepared its data, the render/truncation
    counts, and the realised task mixture when a multi-task run recorded one."""
    manifest = view.manifest
    if not isinstance(manifest, dict):
        raise UIError(404, f"{view.id}: no data_manifest.json recorded")
    raw = manifest.get("prepare") if isinstance(manifest.get("prepare"), dict) else None
    if raw is None and "identity" in manifest and "kept" in manifest:
        raw = manifest  # a `tunesmith data prepare` manifest itself
    out: dict[str, Any] = {
        "id": view.id, "hash": manifest.get("hash"), "files": manifest.get("files") or [],
        "records": {k: manifest.get(k) for k in ("train_records", "validation_records", "validation_held_out_from_train")
                    if k in manifest},
        "sequences": manifest.get("sequences"), "render": manifest.get("render"), "prepared": raw is not None,
        "mixture": _mixture(manifest),
    }
    if raw is not None:
        try:
            prepared = DataManifest.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise UIError(500, f"{view.id}: the prepare section of data_manifest.json does not read as a data "
                               f"manifest ({exc})") from exc
        diversity = prepared.diversity or {}
        out.update({
            "counts": [{"count": k, "records": getattr(prepared, k)} for k in COUNT_ROWS],
            "identity": prepared.identity or prepared.count_identity(),
            "quarantine_reasons": prepared.quarantine_reasons, "lengths": prepared.lengths, "pii": prepared.pii,
            "pii_mode": prepared.pii_mode,
            "clusters": {k: diversity.get(k) for k in ("embedder", "clusters", "sizes", "largest_share", "near_empty",
                                                       "examples")},
            "leakage_pairs": len(prepared.leakage.get("pairs") or []),
            "splits": {name: {"count": split.count, "hash": split.hash} for name, split in prepared.splits.items()},
        })
    return out
