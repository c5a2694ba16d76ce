"""Multi-task configs: the materialised mixture, per-task eval splits, the interference matrix, and the bench's
table invariants (fast, on hand-made matrices; the bench's --quick run end to end is marked slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.data.formats import read_conversations

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    module = _load(ROOT / "examples/tasks/generate.py", "tasks_generate_mt")
    return module.generate(tmp_path_factory.mktemp("mt"), seed=1, n_train=20, n_validation=3, n_test=2), module


def _datasets_config(tmp_path, tiny_model_dir, tasks, *extra):
    paths, module = tasks
    datasets = [{"name": name, "train": [paths[name]["train"]], "validation": [paths[name]["validation"]],
                 "test": [paths[name]["test"]], "weight": weight, "task_prefix": module.TASKS[name]["prefix"],
                 "system_prompt": module.TASKS[name]["system_prompt"]}
                for name, weight in (("extract", 3.0), ("risk", 1.0))]
    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.datasets={json.dumps(datasets)}", "data.mix_size=16",
                 f"output.dir={tmp_path / 'runs'}", "output.name=mt", "eval.metrics=[accuracy]",
                 "eval.max_new_tokens=4", *extra]
    return load_config(None, overrides)


def test_materialize_mixes_by_weight_and_keeps_tasks_separate_for_eval(tmp_path, tiny_model_dir, tasks):
    from tunesmith.recipes.multitask import materialize

    _, module = tasks
    config = _datasets_config(tmp_path, tiny_model_dir, tasks)
    prepared, report, mixed = materialize(config, log=lambda *a: None)
    assert report["tasks"]["extract"]["drawn"] == 12 and report["tasks"]["risk"]["drawn"] == 4
    train = read_conversations(prepared.data.train[0])
    assert len(train) == 16 == len(mixed)
    prefixes = Counter(next(m for m in c.messages if m["role"] == "user")["content"].split("]")[0] + "]" for c in train)
    assert prefixes == {module.TASKS["extract"]["prefix"]: 12, module.TASKS["risk"]["prefix"]: 4}
    assert sorted(prepared.eval.splits) == ["extract", "risk"] and prepared.data.test == []
    for name in ("extract", "risk"):
        test = read_conversations(prepared.eval.splits[name][0])
        assert all(c.messages[0]["content"] == module.TASKS[name]["system_prompt"] for c in test)
        assert all(c.messages[1]["content"].startswith(module.TASKS[name]["prefix"] + " ") for c in test)
    assert [Path(f).name for f in prepared.data.validation] == ["validation-extract.jsonl", "validation-risk.jsonl"]
    assert [len(read_conversations(f)) for f in prepared.data.validation] == [3, 3]
    assert config.data.train == []  # the caller's config is not modified


def test_general_share_and_errors(tmp_path, tiny_model_dir, tasks):
    from tunesmith.config import ConfigError
    from tunesmith.recipes.multitask import materialize

    paths, _ = tasks
    config = _datasets_config(tmp_path, tiny_model_dir, tasks, f"data.general=[{paths['dates']['train']}]",
                              "data.general_share=0.25")
    _, report, _ = materialize(config, log=lambda *a: None)
    assert report["tasks"]["general"]["drawn"] == 4 and report["tasks"]["extract"]["drawn"] == 9
    empty = _datasets_config(tmp_path, tiny_model_dir, tasks, "data.general_share=0.25")
    with pytest.raises(ConfigError, match="general"):
        materialize(empty, log=lambda *a: None)


def test_interference_matrix_shape(tmp_path, tiny_model_dir, tasks):
    from peft import LoraConfig, get_peft_model

    from tunesmith.methods.combine import save_adapter
    from tunesmith.models.load import load_model
    from tunesmith.recipes.multitask import interference_matrix

    config = _datasets_config(tmp_path, tiny_model_dir, tasks)
    model = get_peft_model(load_model(config.model, log=lambda *a: None),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"))
    save_adapter(model, "default", tmp_path / "a1")
    result = interference_matrix(config, {"a1": tmp_path / "a1"}, max_examples=1, log=lambda *a: None)
    assert result["tasks"] == ["extract", "risk"] and list(result["rows"]) == ["base", "a1"]
    for row in result["rows"].values():
        assert set(row) == {"extract", "risk"} and all(0.0 <= v <= 1.0 for v in row.values())


def test_bench_metrics_and_invariants():
    bench = _load(ROOT / "bench/continual_bench.py", "continual_bench_t")
    R = [[0.1, 0.2, 0.3], [0.8, None, None], [0.5, 0.9, None], [0.4, 0.6, 0.7]]
    assert bench.bwt(R) == pytest.approx(((0.4 - 0.8) + (0.6 - 0.9)) / 2)
    assert bench.final_average(R) == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    good = {"tasks": [{}, {}, {}], "base_row": R[0],
            "strategies": {"seq": {"R": R, "ACC": bench.final_average(R), "BWT": bench.bwt(R)}}}
    assert bench.check_invariants(good) == []
    bad = json.loads(json.dumps(good))
    bad["strategies"]["seq"]["R"][1][2] = 0.5  # a future task measured
    bad["strategies"]["progressive"] = {"R": [R[0], [0.8, None, None], [0.7, 0.9, None], [0.8, 0.9, 0.7]],
                                        "ACC": 0.8, "BWT": 0.0}
    problems = bench.check_invariants(bad)
    assert any("future task" in p for p in problems)
    assert any("progressive: R[2][0]" in p for p in problems)
    assert any("ACC/BWT" in p for p in problems)


def test_bench_quick_runs_and_holds_its_invariants(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench/continual_bench.py"), "--quick", "--json",
                          "--work", str(tmp_path / "work"), "--md", str(tmp_path / "table.md")],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio=")
    result = json.loads(lines[-2])
    assert set(result["strategies"]) == {"seq", "replay", "ewc", "progressive", "olora", "merged:cat", "joint"}
    assert result["extra"]["merged:cat"]["exact"] and result["extra"]["merged:cat"]["max_abs_logit_diff"] < 1e-4
    table = (tmp_path / "table.md").read_text()
    assert "| strategy |" in table and "BWT" in table and "Command:" in table


def test_multitask_run_logs_a_validation_loss_per_task(tmp_path, tiny_model_dir, tasks):
    """eval_loss/<task> for every task, and eval_loss = their mean weighted by each task's target tokens (counted
    here from the task's own validation file)."""
    from tunesmith.recipes.continual import run_continual

    config = _datasets_config(tmp_path, tiny_model_dir, tasks, "train.max_steps=2", "train.batch_size=2",
                              "train.eval_steps=2", "train.show_progress=false", "train.precision=fp32",
                              "data.max_seq_len=1024", "method.lora.r=2", "eval.metrics=[]")
    run_continual(config, log=lambda *a: None)
    run_dir = tmp_path / "runs" / "mt"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert evals, "no evaluation was logged"
    last = evals[-1]
    assert {"eval_loss/extract", "eval_loss/risk"} <= set(last)
    # eval_loss = sum over tasks of loss_t * n_t / sum n_t, n_t = the target tokens of that task's validation file
    from tunesmith.data.render import render_dataset
    from tunesmith.models.load import load_tokenizer

    tokenizer = load_tokenizer(config.model, log=lambda *a: None)
    counts = {}
    for task in ("extract", "risk"):
        examples, _ = render_dataset(tokenizer, read_conversations(run_dir.parent / "mt.inputs" / f"validation-{task}.jsonl"), 1024)
        counts[task] = sum(e.target_tokens for e in examples)
    expected = sum(last[f"eval_loss/{t}"] * n for t, n in counts.items()) / sum(counts.values())
    assert last["eval_loss"] == pytest.approx(expected, abs=2e-6)
    assert last["eval_loss/extract"] != last["eval_loss/risk"]
