"""Typed records: written and read through one type, versioned; files written before versioning still read."""

from __future__ import annotations

import json

import pytest

from tunesmith.config import ConfigError, RunConfig, resolved_yaml
from tunesmith.records.eval import EVAL_SCHEMA_VERSION, EvalReport
from tunesmith.records.run import SUMMARY_SCHEMA_VERSION, RunDir, RunSummary


def test_run_summary_round_trips_and_keeps_unknown_keys(tmp_path):
    summary = RunSummary(name="demo", method="lora", steps=3, best_eval_loss=1.25, data_hash="sha256:ab")
    summary.write(tmp_path)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["schema_version"] == SUMMARY_SCHEMA_VERSION and "eval" not in data and "registry" not in data
    assert RunSummary.read(tmp_path) == summary
    data.update(future_field=[1, 2])
    (tmp_path / "summary.json").write_text(json.dumps(data))
    again = RunSummary.read(tmp_path / "summary.json")
    assert again.extra == {"future_field": [1, 2]} and again.to_dict()["future_field"] == [1, 2]


def test_a_summary_written_before_versioning_still_reads(tmp_path):
    old = {"name": "r", "method": "lora", "steps": 6, "best_step": 6, "eval": {"tuned": {"test": {"em": 1.0}}}}
    (tmp_path / "summary.json").write_text(json.dumps(old))
    summary = RunSummary.read(tmp_path)
    assert summary.schema_version == 0 and summary.steps == 6 and summary.eval == old["eval"]


def test_eval_report_reads_both_old_shapes_and_writes_one(tmp_path):
    trainer_v0 = {"models": {"tuned": {"test": {"n": 2, "metrics": {"exact_match": 0.5}}}}}
    eval_v1 = {"version": 1, "models": trainer_v0["models"], "data": {"test": {"hash": "sha256:x"}},
               "metrics": ["exact_match"], "settings": {"max_new_tokens": 8}, "comparison": []}
    a, b = EvalReport.from_dict(trainer_v0), EvalReport.from_dict(eval_v1)
    assert (a.schema_version, a.written_by, a.data) == (0, "train", {})
    assert (b.schema_version, b.written_by, b.data["test"]["hash"]) == (1, "eval", "sha256:x")
    assert a.compact_metrics() == {"tuned": {"test": {"exact_match": 0.5}}}
    b.schema_version = EVAL_SCHEMA_VERSION
    path = b.write(tmp_path)
    written = json.loads(path.read_text())
    assert "version" not in written and written["schema_version"] == EVAL_SCHEMA_VERSION and "paths" not in written
    assert EvalReport.read(tmp_path) == b


def test_run_dir_finds_runs_adapter_folders_and_bare_adapters(tmp_path):
    run = tmp_path / "runs" / "demo"
    (run / "adapter").mkdir(parents=True)
    config = RunConfig.model_validate({"model": {"name_or_path": "some/model"}})
    (run / "config.yaml").write_text(resolved_yaml(config))
    bare = tmp_path / "bare-adapter"
    bare.mkdir()
    for given, root, adapter, is_run, output in ((run, run, run / "adapter", True, run),
                                                 (run / "adapter", run, run / "adapter", False, run),
                                                 (bare, None, bare, False, bare)):
        found = RunDir.find(given)
        assert (found.root, found.adapter, found.is_run, found.output_dir) == (root, adapter, is_run, output)
    assert RunDir.find(run).config().model.name_or_path == "some/model"
    assert RunDir.find(bare).config() == RunConfig()
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        RunDir.find(tmp_path / "missing")
    (run / "config.yaml").write_text("model: {nme_or_path: x}\n")
    with pytest.raises(ConfigError, match="config.yaml: cannot be read as a run config"):
        RunDir.find(run).config()
