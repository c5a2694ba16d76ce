"""The finetune recipe registers its run (issue 16): end to end on the tiny model through the CLI, with the
default registry (runs/registry.db under the working directory), and a failing registration that exits 1, says
how to register later and leaves the run directory intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.hashing import file_sha256

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch):
    """A working directory with data and a run config; the default registry and caches live inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNESMITH_REGISTRY", raising=False)
    monkeypatch.delenv("TUNESMITH_ARTIFACTS", raising=False)
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": f"Say the code for item {i}.", "output": f"code-{i % 5}"} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    config = {"model": {"name_or_path": str(tiny_model_dir)},
              "data": {"train": ["train.jsonl"], "validation": ["validation.jsonl"], "max_seq_len": 64},
              "method": {"name": "lora", "lora": {"r": 2, "dropout": 0.0}},
              "train": {"max_steps": 2, "batch_size": 4, "show_progress": False, "learning_rate": 1e-2}}
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_train_registers_and_runs_show_finds_everything(project, capsys):
    assert main(["train", "demo.yaml"]) == 0
    run_dir = project / "runs" / "demo"
    assert (project / "runs" / "registry.db").is_file()  # the default registry
    capsys.readouterr()
    assert main(["runs", "show", "demo", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "data_manifest.json").read_text())
    assert record["ref"] == "demo@1" and summary["registry"] == {"name": "demo", "version": 1}
    assert record["data_hash"] == manifest["hash"] == summary["data_hash"]
    assert record["base_model_hash"].startswith("sha256:")
    assert record["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert record["adapter_digest"].startswith("sha256:")
    assert record["summary"]["steps"] == 2 and record["best_eval_loss"] == summary["best_eval_loss"]
    assert record["summary"]["schema_version"] == 1
    from tunesmith.registry import artifacts as art
    from tunesmith.registry.store import open_registry

    store = open_registry(None).store
    adapter = {f["path"]: f["sha256"] for f in art.read_manifest(store, record["adapter_digest"])["files"]}
    assert "sha256:" + adapter["adapter_model.safetensors"] == file_sha256(run_dir / "adapter/adapter_model.safetensors")
    logs = {f["path"] for f in art.read_manifest(store, record["logs_digest"])["files"]}
    assert logs == {"metrics.jsonl", "loss_curves.png"}
    assert Path(record["run_dir"]) == run_dir.resolve()
    # `tunesmith runs show demo --json | head`, with the reader gone before the first byte: quiet, status 141
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONUNBUFFERED", None)  # users' stdout is buffered (see tests/core/test_cli.py)
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "runs", "show", "demo", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=project)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_a_failed_registration_exits_1_and_says_how_to_register_later(project, capsys, monkeypatch):
    import tunesmith.registry as registry

    real = registry.register_run

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(registry, "register_run", broken)
    assert main(["train", "demo.yaml"]) == 1
    captured = capsys.readouterr()
    run_dir = project / "runs" / "demo"
    assert "error: training finished but registering" in captured.err and "disk full" in captured.err
    # the command to paste, with the run directory as the config named it (relative to the working directory)
    assert "hint: the run directory is intact; register it later with `tunesmith runs register runs/demo`" \
        in captured.err
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert "registry" not in json.loads((run_dir / "summary.json").read_text())
    monkeypatch.setattr(registry, "register_run", real)
    assert main(["runs", "register", str(run_dir)]) == 0  # the hint works
    assert main(["runs", "show", "demo", "--json"]) == 0
