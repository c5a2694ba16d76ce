"""`tunesmith runs register` on a run directory written by the real fine-tuning recipe (tiny model, 4 steps), then
`runs show` finds what the version table lists, `runs check` passes, and registering the adapter folder or the
same run again updates that version instead of adding one."""

from __future__ import annotations

import json

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.hashing import file_sha256
from tunesmith.recipes.finetune import run_finetune
from tunesmith.registry import artifacts as art


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_register_a_real_run_directory(tmp_path, tiny_model_dir, sqlite_url, capsys):
    rows = [{"instruction": f"Say the code for item {i}.", "output": f"code-{i % 5}"} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train=[{tmp_path / 'train.jsonl'}]", "data.max_seq_len=64",
        "train.batch_size=4", "train.max_steps=4", "train.show_progress=false", "method.lora.r=4",
        f"output.dir={tmp_path / 'runs'}", "output.name=real", "output.register_run=false"])
    run_finetune(config, log=lambda *_a, **_k: None)
    run_dir = tmp_path / "runs" / "real"
    reg = ["--registry", sqlite_url]

    code, out, err = _cli(capsys, "runs", "register", str(run_dir), "--json", *reg)
    assert code == 0, err
    registered = json.loads(out)
    assert registered["ref"] == "real@1" and registered["created"] is True
    code, out, _ = _cli(capsys, "runs", "show", "real@1", "--json", *reg)
    shown = json.loads(out)
    manifest = json.loads((run_dir / "data_manifest.json").read_text())
    assert shown["data_hash"] == manifest["hash"] and shown["data_hash"].startswith("sha256:")
    assert shown["base_model"] == str(tiny_model_dir)
    weights = sorted(tiny_model_dir.glob("*.safetensors"))
    assert shown["base_model_hash"] == art.tree_digest([(w.name, file_sha256(w).removeprefix("sha256:"))
                                                        for w in weights])
    assert shown["config"]["train"]["max_steps"] == 4 and shown["method"] == "lora"
    assert shown["adapter_digest"] == art.hash_folder(run_dir / "adapter")[0]
    assert shown["logs_digest"] and shown["summary"]["steps"] == 4 and shown["status"] == "finished"
    code, out, _ = _cli(capsys, "runs", "check", "--deep", *reg)
    assert code == 0 and "consistent" in out
    # the adapter folder names the same run; registering again updates that version
    code, out, _ = _cli(capsys, "runs", "register", str(run_dir / "adapter"), "--json", *reg)
    again = json.loads(out)
    assert code == 0 and again["ref"] == "real@1" and again["created"] is False
