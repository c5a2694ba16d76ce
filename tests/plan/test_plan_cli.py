"""`tunesmith plan`: the JSON contract, the written run config, the human table and the errors."""

from __future__ import annotations

import json

from tunesmith.cli import main
from tunesmith.config import load_config

KEYS = {"weights", "trainable", "gradients", "optimizer", "activations", "total"}


def _plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON object


def test_json_contract_70b(capsys):
    plan = _plan_json(capsys, "--model", "meta-llama/Llama-3.1-70B", "--gpu-memory", "80GB", "--gpus", "2",
                      "--examples", "8000", "--task", "extraction", "--gradient-checkpointing", "--batch-size", "1")
    assert plan["model"]["params_total"] == 70_553_706_496
    assert plan["model"]["layers"] == 80 and plan["model"]["hidden_size"] == 8192
    assert set(plan["methods"]) == {"full", "lora", "qlora", "prefix", "prompt", "adapters"}
    for entry in plan["methods"].values():
        assert KEYS <= set(entry["memory_bytes"]) and isinstance(entry["fits"], bool)
        assert 0 < entry["trainable_percent"] <= 100
    assert plan["methods"]["qlora"]["quant_constant_bits_per_param"] == 0.126953125
    assert plan["methods"]["qlora"]["fits"]
    # Full fine-tuning of 70B (~1 TiB of states) fits 2 x 80 GiB only with everything offloaded to the host.
    full = plan["methods"]["full"]
    assert not full["fits"] or full["solution"]["knobs"]["cpu_offload"]
    rec = plan["recommendation"]
    assert rec["method"] == "qlora" and rec["hyperparameters"]["rank"] == 16
    assert any("GiB" in a for a in plan["assumptions"])


def test_lora_targets_and_rank_flags(capsys):
    plan = _plan_json(capsys, "--model", "meta-llama/Llama-3.1-8B", "--rank", "8", "--targets", "q_proj,v_proj")
    assert plan["methods"]["lora"]["trainable_params"] == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    plan = _plan_json(capsys, "--model", "meta-llama/Llama-3.1-8B", "--virtual-tokens", "30")
    assert plan["methods"]["prompt"]["trainable_params"] == 30 * 4096
    assert plan["methods"]["prefix"]["trainable_params"] == 30 * 32 * 2 * 1024


def test_decision_flags_stop_fine_tuning(capsys):
    plan = _plan_json(capsys, "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--needs-citations")
    assert plan["recommendation"]["fine_tune"] is False and plan["recommendation"]["choice"] == "rag"
    plan = _plan_json(capsys, "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--examples", "20")
    assert plan["recommendation"]["choice"] == "few-shot prompting"


def test_write_run_yaml_loads_unchanged(tmp_path, capsys):
    target = tmp_path / "run.yaml"
    assert main(["plan", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--gpu-memory", "24GB", "--examples", "8000",
                 "--task", "extraction", "--method", "lora", "--rank", "32", "--write", str(target)]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "wrote" in out  # the human table was printed
    config = load_config(target)
    assert config.method.name == "lora" and config.method.lora.r == 32 and config.method.lora.alpha == 64
    assert config.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 1e-4 <= config.train.learning_rate <= 5e-4  # <1B PEFT range
    assert config.data.max_seq_len == 2048 and config.train.batch_size == 4


def test_local_folder_model(tiny_model_dir, capsys):
    plan = _plan_json(capsys, "--model", str(tiny_model_dir), "--device", "cpu", "--gpu-memory", "4GB")
    assert plan["model"]["config_source"] == "path" and plan["model"]["hidden_size"] == 64
    assert all(m["fits"] for m in plan["methods"].values())


def test_errors_name_the_flag(capsys):
    assert main(["plan", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["plan", "--model", "/nonexistent/model-folder-xyz"]) == 2
    assert "--model" in capsys.readouterr().err


def test_json_is_a_plan_report_record(capsys, tmp_path):
    from tunesmith.records.plan import SCHEMA_VERSION, PlanRecordError, PlanReport

    plan = _plan_json(capsys, "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--gpu-memory", "24GB")
    assert plan["schema_version"] == SCHEMA_VERSION
    report = PlanReport.from_dict(plan)
    assert report.methods["lora"].trainable_params == plan["methods"]["lora"]["trainable_params"]
    path = report.write(tmp_path / "plan.json")
    assert PlanReport.read(path).to_dict() == plan
    import pytest

    with pytest.raises(PlanRecordError, match="schema_version"):
        PlanReport.from_dict({**plan, "schema_version": 99})
