"""`tunesmith runs ...` end to end through cli.main: JSON output, compare, promote/rollback, export, errors."""

from __future__ import annotations

import json

from tunesmith.cli import main
from tunesmith.registry import artifacts as art


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_runs_commands_end_to_end(make_run, sqlite_url, tmp_path, capsys):
    reg = ["--registry", sqlite_url]
    code, out, _ = _run(capsys, "runs", "register", str(make_run("m1", seed=1, lr=1e-4, eval_loss=1.5)), "--name", "m", *reg)
    assert code == 0 and out.startswith("registered m@1")
    code, out, _ = _run(capsys, "runs", "register", str(make_run("m2", seed=2, lr=3e-4, eval_loss=1.25)), "--name", "m",
                        "--continued-from", "m@1", "--json", *reg)
    assert code == 0 and json.loads(out)["version"] == 2

    code, out, _ = _run(capsys, "runs", "list", "--json", *reg)
    listed = json.loads(out)
    assert [r["ref"] for r in listed] == ["m@1", "m@2"] and listed[1]["parents"][0]["ref"] == "m@1"
    code, out, _ = _run(capsys, "runs", "list", *reg)
    assert out.splitlines()[0].split()[:3] == ["RUN", "STATUS", "METHOD"] and len(out.splitlines()) == 3

    code, out, _ = _run(capsys, "runs", "show", "m@2", "--json", *reg)
    shown = json.loads(out)
    assert shown["config"]["train"]["learning_rate"] == 3e-4 and shown["summary"]["best_eval_loss"] == 1.25

    code, out, _ = _run(capsys, "runs", "compare", "m@1", "m@2", "--json", *reg)
    compared = json.loads(out)
    assert ["train.learning_rate", 1e-4, 3e-4] in compared["config"]
    assert ["summary.best_eval_loss", 1.5, 1.25, -0.25] in compared["metrics"]
    assert all(key not in ("output.name",) for key, *_ in compared["config"])
    code, out, _ = _run(capsys, "runs", "compare", "m@1", "m@2", *reg)
    assert "config differences (" in out and "train.learning_rate" in out

    assert _run(capsys, "runs", "promote", "m@1", "--alias", "production", *reg)[0] == 0
    code, out, _ = _run(capsys, "runs", "promote", "m@2", "--alias", "production", *reg)
    assert out.strip() == "production -> m@2 (revision 2, previously m@1)"
    code, out, _ = _run(capsys, "runs", "rollback", "--alias", "production", *reg)
    assert code == 0 and out.startswith("production -> m@1 (rolled back from m@2")
    code, out, _ = _run(capsys, "runs", "aliases", "production", "--json", *reg)
    assert [e["action"] for e in json.loads(out)] == ["promote", "promote", "rollback"]

    out_dir = tmp_path / "export"
    code, out, _ = _run(capsys, "runs", "export", "m@2", "--out", str(out_dir), "--json", *reg)
    exported = json.loads(out)
    assert code == 0 and exported["peft_layout"] is True
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "config.yaml", "tunesmith_run.json",
            "logs/metrics.jsonl"} <= set(exported["files"])
    assert art.file_sha256(out_dir / "adapter_model.safetensors") == art.file_sha256(
        tmp_path / "runs" / "m2" / "adapter" / "adapter_model.safetensors")
    card = (out_dir / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "sha256:" + "d" * 64 in card and "summary.best_eval_loss | 1.25" in card and "continued_from m@1" in card
    assert "learning_rate: 0.0003" in card

    code, out, _ = _run(capsys, "runs", "archive", "m@2", *reg)
    assert out.strip() == "m@2: archived"
    code, out, _ = _run(capsys, "runs", "check", "--json", *reg)
    assert code == 0 and json.loads(out)["ok"] is True
    code, out, _ = _run(capsys, "runs", "gc", "--dry-run", *reg)
    assert code == 0 and out.startswith("would delete 0 of 4 artifacts")


def test_runs_errors_are_one_line_for_people(make_run, sqlite_url, tmp_path, capsys):
    reg = ["--registry", sqlite_url]
    code, _, err = _run(capsys, "runs", "show", "ghost@3", *reg)
    assert code == 2 and err.strip() == "error: no run 'ghost@3' in the registry (see `tunesmith runs list`)"
    code, _, err = _run(capsys, "runs", "register", str(tmp_path), *reg)
    assert code == 2 and "config.yaml: missing" in err
    _run(capsys, "runs", "register", str(make_run("a", seed=1)), *reg)
    code, _, err = _run(capsys, "runs", "rollback", "--alias", "production", *reg)
    assert code == 2 and "no alias 'production'" in err
    code, _, err = _run(capsys, "runs", "export", "a@1", "--out", str(tmp_path / "runs"), *reg)
    assert code == 2 and "exists and is not empty" in err
