"""Every method through the trainer (`run_training`) on the tiny model: packing where supported, evaluation,
checkpoint and resume (interrupted after step 3, resumed to step 4, equal to an uninterrupted run), and the
saved run loading back through `load_trained` to generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunesmith.recipes.finetune as run_module
from tunesmith.config import load_config
from tunesmith.methods.registry import load_trained
from tunesmith.recipes.finetune import run_finetune

OPTIONS = {
    "full": ["train.learning_rate=1e-3"],
    "lora": ["method.lora.r=4", "method.lora.dropout=0.0", "train.learning_rate=5e-3"],
    "qlora": ["method.lora.r=4", "method.lora.dropout=0.0", "train.learning_rate=5e-3"],
    "prefix": ["method.prefix.num_virtual_tokens=4", "train.learning_rate=3e-2", "data.packing=false"],
    "prompt": ["method.prompt.num_virtual_tokens=4", "train.learning_rate=3e-2", "data.packing=false"],
    "adapters": ["method.adapters.reduction_factor=4", "train.learning_rate=5e-3"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("method-data")
    rows = [{"instruction": f"Code for item {i}?", "output": f"c{i % 3}"} for i in range(14)]
    for name, part in (("train", rows[:8]), ("validation", rows[8:11]), ("test", rows[11:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def config_for(name, run_name, tiny_model_dir, data_dir, tmp_path):
    return load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train=[{data_dir / 'train.jsonl'}]",
        f"data.validation=[{data_dir / 'validation.jsonl'}]", f"data.test=[{data_dir / 'test.jsonl'}]",
        "data.max_seq_len=64", "train.batch_size=4", "train.max_steps=4", "train.eval_steps=1",
        "train.save_steps=3", "train.warmup_ratio=0", "train.show_progress=false", "train.precision=fp32", "eval.max_new_tokens=4",
        "eval.metrics=[exact_match]", f"method.name={name}", f"output.dir={tmp_path / 'runs'}",
        f"output.name={run_name}", "output.register_run=false", *OPTIONS[name],
    ])


class Crash:
    def __init__(self, at_step):
        self.at_step = at_step

    def on_evaluate(self, state, model, tokenizer):
        if state.step == self.at_step:
            raise KeyboardInterrupt("simulated crash")
        return {}


def metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_method_trains_evaluates_and_resumes_through_the_trainer(name, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    quiet = lambda *a, **k: None  # noqa: E731
    straight = config_for(name, "straight", tiny_model_dir, data_dir, tmp_path)
    # The trainer does not seed before method.apply (reported to the lead), and the first bitsandbytes use
    # consumes random numbers, so the two runs would start from different LoRA A matrices; seed both the same.
    torch.manual_seed(0)
    summary = run_finetune(straight, log=quiet)
    assert summary.method == name and summary.steps == 4
    assert summary.eval  # the task evaluation (generation on test.jsonl) ran on the trained model
    resumed = config_for(name, "resumed", tiny_model_dir, data_dir, tmp_path)
    monkeypatch.setattr(run_module, "_callbacks", lambda config: [Crash(4)])
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(resumed, log=quiet)
    monkeypatch.setattr(run_module, "_callbacks", lambda config: [])
    run_finetune(resumed, resume=True, log=quiet)
    root = tmp_path / "runs"
    a, b = metrics(root / "straight"), metrics(root / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r.get("train_loss") for r in a] == pytest.approx([r.get("train_loss") for r in b], abs=1e-5)
    assert [r.get("eval_loss") for r in a] == pytest.approx([r.get("eval_loss") for r in b], abs=1e-5)
    losses = [r["train_loss"] for r in a]
    assert min(losses[1:]) < losses[0]
    model, tokenizer, info = load_trained(root / "resumed", log=quiet)
    assert info["method"] == name
    from tunesmith.eval.generate import generate_batch

    replies = generate_batch(model, tokenizer, [[{"role": "user", "content": "Code for item 3?"}]], max_new_tokens=3)
    assert len(replies) == 1 and isinstance(replies[0], str)


def test_packing_is_refused_for_prompt_learning(tiny_model_dir, data_dir, tmp_path):
    config = config_for("prefix", "packed", tiny_model_dir, data_dir, tmp_path)
    config.data.packing = True
    with pytest.raises(ValueError, match="packing"):
        run_finetune(config, log=lambda *a, **k: None)
