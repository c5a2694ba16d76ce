"""Fixtures for trainer tests: a small memorisable dataset and a config builder on the tiny model."""

import json

import pytest

from tunesmith.config import load_config
from tunesmith.records import metrics as records_metrics


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"instruction": f"Say the code for item {i}.", "output": f"code-{i % 5}"} for i in range(24)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (root / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    return root


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, small_data):
    def build(*overrides, name="run"):
        base = [
            f"model.name_or_path={tiny_model_dir}", f"data.train=[{small_data / 'train.jsonl'}]",
            f"data.validation=[{small_data / 'validation.jsonl'}]", "data.max_seq_len=128",
            "train.batch_size=4", "train.max_steps=6", "train.learning_rate=1e-2", "train.show_progress=false",
            "method.lora.r=4", "method.lora.dropout=0.0", f"output.dir={tmp_path / 'runs'}", f"output.name={name}",
            "output.register_run=false",
            # Exact comparisons below hold in fp32; 'auto' would pick bf16 on CPUs with native bf16 (AMX).
            "train.precision=fp32",
        ]
        return load_config(None, base + list(overrides))

    return build


def read_metrics(run_dir):
    return records_metrics.read_metrics(run_dir / "metrics.jsonl")
