"""`--continue-from`: refusals that name both runs and write nothing; a continued run starts from its parent
(EWC penalty exactly 0 at the first step), mixes replay, stores its Fisher, and its lineage shows in `runs show`;
merged runs list their parents; progressive runs stack on their parent's adapter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tunesmith.config import load_config
from tunesmith.recipes.continual import ContinueError, run_continual

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("tasks_generate", ROOT / "examples/tasks/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate(tmp_path_factory.mktemp("tasks"), seed=0, n_train=8, n_validation=2, n_test=2), module


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, task_data):
    """A registry and a first run `a` (task extract) that keeps a replay buffer and its Fisher."""
    paths, module = task_data
    root = tmp_path_factory.mktemp("continual")
    registry = f"sqlite:///{root / 'registry.db'}"

    def config(name: str, task: str, *extra: str):
        spec = module.TASKS[task]
        base = [
            f"model.name_or_path={tiny_model_dir}", f"data.train=[{paths[task]['train']}]",
            f"data.validation=[{paths[task]['validation']}]", f"data.system_prompt={spec['system_prompt']}",
            "data.max_seq_len=640", "train.batch_size=2", "train.max_steps=2", "train.learning_rate=1e-2", "train.warmup_ratio=0",
            "train.show_progress=false", "method.lora.r=4", "method.lora.dropout=0.0", "eval.metrics=[field_f1]",
            f"output.dir={root / 'runs'}", f"output.name={name}", f"output.registry_url={registry}",
        ]
        return load_config(None, base + list(extra))

    run_continual(config("a", "extract", "continual.replay_size=6", "continual.store_fisher=true",
                         "continual.ewc_examples=4"), log=lambda *a: None)
    return {"config": config, "root": root, "registry": registry, "runs": root / "runs", "tasks": task_data,
            "model": tiny_model_dir}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("change, words", [
    (["continual.continue_from=nope@3"], ["nope@3"]),
    (["continual.continue_from=a@1", "model.name_or_path=SWAP_QWEN"], ["'b'", "a@1", "different base models"]),
    (["continual.continue_from=a@1", "method.name=full"], ["'b'", "a@1", "incompatible methods"]),
    (["continual.continue_from=a@1", "method.lora.r=8"], ["'b'", "a@1", "r: 8 here, 4 there"]),
    (["continual.ewc_lambda=1.0"], ["continue_from"]),
])
def test_refusals_name_both_runs_and_write_nothing(world, tiny_qwen_dir, change, words):
    change = [c.replace("SWAP_QWEN", str(tiny_qwen_dir)) for c in change]
    before = _listing(world["runs"])
    with pytest.raises(ContinueError) as caught:
        run_continual(world["config"]("b", "risk", *change), log=lambda *a: None)
    for word in words:
        assert word in str(caught.value), str(caught.value)
    assert _listing(world["runs"]) == before


def test_continue_from_a_run_directory_that_is_not_one(world, tmp_path):
    with pytest.raises(ContinueError, match="not a finished run directory"):
        run_continual(world["config"]("b", "risk", f"continual.continue_from={tmp_path}"), log=lambda *a: None)


def test_continued_run_starts_from_parent_mixes_replay_and_records_lineage(world, capsys):
    from tunesmith.cli import main
    from tunesmith.data.mixing import ReservoirBuffer
    from tunesmith.train.ewc import EwcState

    runs = world["runs"]
    assert (runs / "a" / "ewc.safetensors").exists() and (runs / "a" / "replay_buffer.jsonl").exists()
    run_continual(world["config"]("b", "risk", "continual.continue_from=a@1", "continual.ewc_lambda=1e8",
                                  "continual.replay_share=0.25", "continual.replay_size=6",
                                  "continual.ewc_examples=4"), log=lambda *a: None)
    b = runs / "b"
    metrics = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "train_loss" in m]
    # step 1's penalty is taken before the first update: exactly 0 only if the parent's adapter was loaded
    assert steps[0]["ewc_penalty"] == 0.0 and steps[-1]["ewc_penalty"] > 0.0
    mixture = json.loads((b / "data_manifest.json").read_text())["mixture"]
    assert mixture["tasks"]["replay"]["drawn"] == round(0.25 * mixture["total"])
    assert sum(mixture["replayed_from"].values()) == mixture["tasks"]["replay"]["drawn"]
    assert all(key.startswith("a:") for key in mixture["replayed_from"])  # run a, its task
    buffer = ReservoirBuffer.load(b / "replay_buffer.jsonl")
    assert buffer.seen == 8 + mixture["tasks"]["train"]["drawn"]  # a's 8 records, then b's own (not the replayed)
    state = EwcState.load(b / "ewc.safetensors")
    assert [t.task for t in state.terms] == ["a+b"] and state.examples == 4
    assert json.loads((b / "summary.json").read_text())["continued_from"] == "a@1"
    assert main(["runs", "show", "b@1", "--registry", world["registry"], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"ref": "a@1", "relation": "continued_from"} in shown["parents"]


def test_merged_run_lists_its_parents(world, capsys):
    from tunesmith.cli import main

    runs = world["runs"]
    if not (runs / "b").exists():
        run_continual(world["config"]("b", "risk", "continual.continue_from=a@1"), log=lambda *a: None)
    paths, module = world["tasks"]
    datasets = [{"name": n, "train": [paths[n]["train"]], "test": [paths[n]["test"]],
                 "task_prefix": module.TASKS[n]["prefix"]} for n in ("extract", "risk")]
    eval_config = world["root"] / "tasks.yaml"
    eval_config.write_text(yaml.safe_dump({"model": {"name_or_path": str(world["model"])},
                                           "data": {"datasets": datasets},
                                           "eval": {"metrics": ["accuracy"], "max_new_tokens": 4, "max_examples": 1}}))
    code = main(["merge-adapters", str(runs / "a"), "b@1", "--out", str(runs / "ab"), "--combination", "cat",
                 "--registry", world["registry"], "--eval", str(eval_config), "--json"])
    assert code == 0
    capsys.readouterr()
    task_eval = json.loads((runs / "ab" / "task_eval.json").read_text())
    assert list(task_eval["rows"]) == ["merged"] and set(task_eval["rows"]["merged"]) == {"extract", "risk"}
    report = json.loads((runs / "ab" / "merge_report.json").read_text())
    assert report["exact"] and report["max_abs_logit_diff"] < 1e-4 and report["rank"] == 8
    assert main(["runs", "show", "ab@1", "--registry", world["registry"], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {(p["ref"], p["relation"]) for p in shown["parents"]} == {("a@1", "merged_from"), ("b@1", "merged_from")}
    assert main(["merge-adapters", "a@1", "b@1", "--out", str(runs / "ab"), "--registry", world["registry"]]) == 2
    assert "already exists" in capsys.readouterr().err


def test_progressive_run_trains_a_new_adapter_on_the_frozen_parent(world):
    runs = world["runs"]
    run_continual(world["config"]("p", "dates", "continual.continue_from=a@1", "continual.progressive=true"),
                  log=lambda *a: None)
    stack = json.loads((runs / "p" / "stack.json").read_text())["adapters"]
    assert stack == [str(runs / "a" / "adapter")]
    summary = json.loads((runs / "p" / "summary.json").read_text())
    assert summary["continued_from"] == "a@1"
    # only the new adapter trained: the trainable count equals a fresh r=4 adapter's
    assert summary["trainable_params"] == json.loads((runs / "a" / "summary.json").read_text())["trainable_params"]


def test_olora_run_logs_its_orthogonality_penalty_and_needs_progressive(world):
    """O-LoRA: a progressive child with continual.orthogonal_lambda logs orthogonal_penalty beside train_loss (> 0:
    a fresh adapter is not orthogonal to its parent's); without progressive it is refused before anything is written."""
    runs = world["runs"]
    run_continual(world["config"]("o", "dates", "continual.continue_from=a@1", "continual.progressive=true",
                                  "continual.orthogonal_lambda=0.1", "method.lora.init=gaussian"), log=lambda *a: None)
    records = [json.loads(line) for line in (runs / "o" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "orthogonal_penalty" in r]
    assert logged and all(r["orthogonal_penalty"] >= 0 for r in logged) and "train_loss" in logged[0]
    before = _listing(runs)
    with pytest.raises(ContinueError, match="progressive"):
        run_continual(world["config"]("o2", "dates", "continual.continue_from=a@1", "continual.orthogonal_lambda=0.1"),
                      log=lambda *a: None)
    assert _listing(runs) == before


def test_full_fine_tuning_continues_with_ewc_over_all_trained_weights(world):
    """Full FT: the child loads the parent's weights (first penalty exactly 0) and EWC covers every trained weight."""
    from tunesmith.train.ewc import EwcState

    runs = world["runs"]
    full = ("method.name=full", "train.learning_rate=1e-4", "continual.ewc_examples=2")
    run_continual(world["config"]("fa", "extract", *full, "continual.store_fisher=true"), log=lambda *a: None)
    run_continual(world["config"]("fb", "risk", *full, "continual.continue_from=fa@1", "continual.ewc_lambda=1e8"),
                  log=lambda *a: None)
    steps = [json.loads(line) for line in (runs / "fb" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "train_loss" in m]
    assert steps[0]["ewc_penalty"] == 0.0 and steps[-1]["ewc_penalty"] > 0.0
    (term,) = EwcState.load(runs / "fa" / "ewc.safetensors").terms
    trained = json.loads((runs / "fa" / "summary.json").read_text())["trainable_params"]
    assert sum(f.numel() for f in term.fisher.values()) == trained
