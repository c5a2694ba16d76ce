"""What a newcomer meets at the terminal (issue 20): help text, path checks before heavy work, closed pipes, one
error formatter and its exit statuses."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import build_parser, main

SRC = Path(__file__).resolve().parents[2] / "src"


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "tunesmith"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield f"{prefix} {name}", child
                yield from _subparsers(child, f"{prefix} {name}")


def test_top_level_help_says_what_it_does_then_the_typical_path_with_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "one thin function per subcommand" not in text  # not the developers' module docstring
    first = text.split("\n\n")[1]
    assert first.startswith("tunesmith: fine-tune a language model on your own data")
    path = text[text.index("the typical path"):]
    positions = [path.index(f"\n  {step} ") for step in ("plan", "data", "train", "eval", "merge", "serve", "runs")]
    assert positions == sorted(positions)
    for example in ("tunesmith plan --model", "tunesmith data prepare", "tunesmith train run.yaml",
                    "tunesmith eval runs/run", "tunesmith merge runs/run", "tunesmith serve --model",
                    "tunesmith runs list"):
        assert example in path
    assert "README.md" in text and "exit status" in text


def test_every_subcommand_help_ends_with_an_example_invocation():
    commands = list(_subparsers(build_parser()))
    assert len(commands) >= 20  # train, config, models ..., data check/prepare/convert, runs list/show/...
    for name, parser in commands:
        lines = parser.format_help().rstrip().splitlines()
        assert lines[-2] == "example:", f"{name}: help does not end with an example"
        assert lines[-1].strip().startswith(name.split()[0] + " " + name.split()[1]), (name, lines[-1])


def _config(tmp_path, data: dict, model: str) -> Path:
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": model}, "data": data,
                                    "eval": {"splits": {"ood": ["ood-missing.jsonl"]}},
                                    "output": {"dir": str(tmp_path / "runs")}}))
    return path


def test_missing_paths_are_all_named_before_any_model_is_loaded(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import transformers

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model or tokenizer load was attempted before the paths were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr("tunesmith.recipes.finetune.load_model", refuse)
    monkeypatch.setattr("tunesmith.recipes.finetune.load_tokenizer", refuse)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "present.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    config = _config(tmp_path, {"train": ["nope.jsonl", "present.jsonl"], "validation": ["val/missing.jsonl"],
                                "test": ["test-missing.jsonl"]}, "./models/not-here")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 5 path(s) in ") and "\nhint: " in err
    project = (tmp_path / "project").resolve()
    for key, written in (("data.train[0]", "nope.jsonl"), ("data.validation[0]", "val/missing.jsonl"),
                         ("data.test[0]", "test-missing.jsonl"), ("eval.splits.ood[0]", "ood-missing.jsonl")):
        assert f"{key}: {written} (resolved: {project / written})" in err
    assert "model.name_or_path: ./models/not-here" in err
    assert "data.train[1]" not in err  # the file that exists is not listed


def test_a_hub_id_is_not_mistaken_for_a_missing_folder():
    from tunesmith.config import RunConfig
    from tunesmith.recipes.checks import config_paths

    config = RunConfig.model_validate({"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}})
    assert config_paths(config) == []
    config.model.name_or_path = "/abs/models/mine"
    assert config_paths(config) == [("model.name_or_path", "/abs/models/mine")]


def test_a_closed_output_pipe_ends_quietly(tmp_path):
    """`tunesmith ... | head`: the reader goes away early; no BrokenPipeError traceback, the usual status (141)."""
    source = tmp_path / "big.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"question {i} " * 20, "output": "answer " * 20}) + "\n"
                              for i in range(3000)))  # ~1.5 MB of output: far more than a pipe buffer
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # Users' stdout is buffered; PYTHONUNBUFFERED (set on some CI machines) makes CPython drop the rest of a large
    # write that a closing pipe cut short instead of raising, which would hide the case under test.
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "data", "convert", str(source), "--to", "messages"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its first line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert json.loads(first)["messages"]
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr, stderr


def test_exit_statuses_and_the_one_error_formatter(tmp_path, capsys, monkeypatch):
    from tunesmith import cli
    from tunesmith.errors import Failure

    # 2: a usage or configuration error (bad --set key), printed as error: + hint:, no traceback
    assert main(["config", "--set", "train.learning_rat=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "learning_rate" in err and "Traceback" not in err
    # 2: a missing file named by the user
    assert main(["diagnose", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("error: ")

    def fail(_args):
        raise Failure("the work failed", hint="do this instead")

    monkeypatch.setattr(cli, "build_parser", _parser_calling(fail))
    assert main(["diagnose", "x"]) == 1
    assert capsys.readouterr().err == "error: the work failed\nhint: do this instead\n"

    def bug(_args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "build_parser", _parser_calling(bug))
    assert main(["diagnose", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: KeyError: 'oops'\nhint: rerun with --debug") and "Traceback" not in err
    assert main(["--debug", "diagnose", "x"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("TUNESMITH_DEBUG", "1")
    assert main(["diagnose", "x"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def _parser_calling(func):
    real = build_parser

    def build():
        parser = real()
        for _, sub in _subparsers(parser):
            sub.set_defaults(func=func)
        return parser

    return build


def test_the_readme_documents_the_exit_statuses():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Exit statuses"):]
    for status in ("`0`", "`1`", "`2`", "`130`", "`141`"):
        assert status in section.split("\n##")[0]
