"""bench/memory_accuracy.py: the error is computed from the measured peak and the planner's total for the same
config; the --quick path runs `tunesmith train` end to end and reports the JSON keys."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory_accuracy.py"


def _bench():
    spec = importlib.util.spec_from_file_location("memory_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_comes_from_the_measured_peak(tmp_path, monkeypatch):
    bench = _bench()
    from transformers import AutoTokenizer

    from tunesmith.models.tiny import save_tiny_model

    model = str(save_tiny_model(tmp_path / "tiny"))
    data = bench.make_data(AutoTokenizer.from_pretrained(model), 128, 4, tmp_path / "d.jsonl")
    measured = {"returncode": 0, "peak_rss_bytes": 700 * 2**20, "seconds": 1.0, "tail": []}
    monkeypatch.setattr(bench, "run_train", lambda path, threads, processes=1: dict(measured))
    monkeypatch.setattr(bench, "labelled_share", lambda run_dir: 0.3)
    case = {"model": model, "method": "lora", "seq_len": 128, "batch_size": 2, "ckpt": False, "steps": 2, "data": data}
    row = bench.run_case(case, tmp_path, 2, lambda msg: None)
    predicted = bench.predict(tmp_path / f"{row['case']}.yaml", 0.3)["predicted_bytes"]
    assert row["predicted_bytes"] == predicted
    assert row["relative_error"] == round((predicted - 700 * 2**20) / (700 * 2**20), 4)
    measured["peak_rss_bytes"] = 350 * 2**20  # a different measurement gives a different error: nothing is constant
    assert bench.run_case(case, tmp_path, 2, lambda msg: None)["relative_error"] != row["relative_error"]
    # Every example fills max_seq_len, and truncation leaves labelled tokens in each.
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 4 and all(r["messages"][1]["role"] == "assistant" for r in rows)


def test_sharded_case_is_compared_with_the_planners_per_device_figure(tmp_path, monkeypatch):
    """A 2-process FSDP2 case: torchrun launches it (train.sharding=fsdp in its config), and its per-process peak is
    compared with the planner's sharded per-device figure, which for full fine-tuning is below the single-process
    one (parameters, gradients and optimizer state divided over 2)."""
    import yaml

    bench = _bench()
    from transformers import AutoTokenizer

    from tunesmith.models.tiny import save_tiny_model

    model = str(save_tiny_model(tmp_path / "tiny"))
    data = bench.make_data(AutoTokenizer.from_pretrained(model), 128, 8, tmp_path / "d.jsonl")
    launched = []
    monkeypatch.setattr(bench, "run_train", lambda path, threads, processes=1: launched.append(processes) or
                        {"returncode": 0, "peak_rss_bytes": 600 * 2**20, "seconds": 1.0, "tail": []})
    monkeypatch.setattr(bench, "labelled_share", lambda run_dir: 0.3)
    case = {"model": model, "method": "full", "seq_len": 128, "batch_size": 1, "ckpt": False, "steps": 2, "data": data}
    single = bench.run_case(case, tmp_path, 1, lambda msg: None)
    sharded = bench.run_case({**case, "processes": 2}, tmp_path, 1, lambda msg: None)
    assert launched == [1, 2] and sharded["case"].endswith("-fsdp2") and sharded["processes"] == 2
    config = yaml.safe_load((tmp_path / f"{sharded['case']}.yaml").read_text())
    assert config["train"]["sharding"] == "fsdp"
    assert sharded["predicted_bytes"] == bench.predict(tmp_path / f"{sharded['case']}.yaml", 0.3, 2)["predicted_bytes"]
    assert sharded["predicted_bytes"] < single["predicted_bytes"]


def test_quick_runs_tunesmith_train_and_reports(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--quick", "--json", "--steps", "2", "--work", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"model", "calibration", "cases", "summary", "protocol"} <= set(report)
    row = report["cases"][0]
    assert {"predicted_bytes", "peak_rss_bytes", "relative_error", "labelled_share", "seconds"} <= set(row)
    assert row["relative_error"] == round((row["predicted_bytes"] - row["peak_rss_bytes"]) / row["peak_rss_bytes"], 4)
    assert 0 < row["labelled_share"] < 1
    assert report["summary"]["worst_relative_error"] == row["relative_error"]


def test_repeats_report_the_worst_run_and_each_cases_spread():
    bench = _bench()
    mib = 2**20
    rows = [{"case": "lora-s1024-b2-ckpt", "repeat": 1, "peak_rss_bytes": 3000 * mib, "relative_error": -0.016,
             "predicted_bytes": 2952 * mib},
            {"case": "lora-s1024-b2", "repeat": 1, "peak_rss_bytes": 6000 * mib, "relative_error": -0.02,
             "predicted_bytes": 5880 * mib},
            {"case": "lora-s1024-b2-ckpt", "repeat": 2, "peak_rss_bytes": 2320 * mib, "relative_error": 0.272,
             "predicted_bytes": 2952 * mib},
            {"case": "lora-s1024-b2", "repeat": 2, "returncode": 1}]
    summary = bench.summarize(rows)
    assert summary["cases"] == 2 and summary["runs"] == 4 and summary["measured"] == 3
    assert summary["worst_relative_error"] == 0.272 and summary["worst_case"] == "lora-s1024-b2-ckpt"  # not the mean
    assert summary["measured_spread_mib"] == {"lora-s1024-b2-ckpt": 680}
    assert summary["failed"] == ["lora-s1024-b2"]
    # the budget view, beside (not instead of) the per-run worst: each case against its highest run
    assert summary["relative_error_vs_case_max"] == {"lora-s1024-b2-ckpt": -0.016, "lora-s1024-b2": -0.02}
    assert summary["worst_relative_error_vs_case_max"] == -0.02 and summary["worst_case_vs_case_max"] == "lora-s1024-b2"
