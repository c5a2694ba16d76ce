"""The places where recipes built on finetune (continual learning) inject behaviour: init_model, extra_callbacks,
loss_terms — each one observably used, and an all-zero loss term leaves the run's losses unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.recipes.finetune import run_finetune
from tunesmith.records.run import RunSummary


@pytest.fixture
def config_for(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"Say the code for item {i}.", "output": f"code-{i % 5}"} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))

    def build(name):
        return load_config(None, [
            f"model.name_or_path={tiny_model_dir}", f"data.train=[{tmp_path / 'train.jsonl'}]",
            f"data.validation=[{tmp_path / 'validation.jsonl'}]", "data.max_seq_len=64", "train.batch_size=4",
            "train.max_steps=2", "train.eval_steps=1", "train.show_progress=false", "method.lora.r=2",
            "method.lora.dropout=0.0", f"output.dir={tmp_path / 'runs'}", f"output.name={name}",
            "output.register_run=false"])

    return build


def quiet(*_args, **_kwargs):
    pass


def test_init_model_callbacks_and_loss_terms_are_used(config_for):
    seen = []

    def init_model(model, method):
        seen.append(("init", method.name, any(p.requires_grad for p in model.parameters())))
        return model

    class Probe:
        def on_train_begin(self, state, model, tokenizer):
            seen.append(("begin", state.step))

        def on_evaluate(self, state, model, tokenizer):
            return {"probe": float(state.step)}

    def zero_penalty(model):
        return "zero_penalty", sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0

    plain = run_finetune(config_for("plain"), log=quiet)
    hooked = run_finetune(config_for("hooked"), log=quiet, init_model=init_model, extra_callbacks=[Probe()],
                          loss_terms=[zero_penalty])
    assert isinstance(hooked, RunSummary) and hooked.steps == 2
    assert seen == [("init", "lora", True), ("begin", 0)]
    metrics = [json.loads(line) for line in (Path(hooked.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("probe") for r in metrics] == [1.0, 2.0]
    assert all(r["zero_penalty"] == 0.0 for r in metrics if "train_loss" in r)
    baseline = [json.loads(line)["train_loss"] for line in (Path(plain.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in metrics] == pytest.approx(baseline, abs=1e-6)
