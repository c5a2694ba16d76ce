"""`tunesmith plan` solves: per method the cheapest knobs that fit, a practitioner's choice, and a written config
whose planned peak is within the budget (issue 19's checks, on the public catalogue)."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.plan.memory import GiB
from tunesmith.plan.report import planned_peak
from tunesmith.plan.solve import USABLE_FRACTION, Budget


def _plan(capsys, tmp_path, *args) -> tuple[dict, object]:
    target = tmp_path / "run.yaml"
    assert main(["plan", *args, "--write", str(target), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    return plan, target


def _check_written(plan: dict, target, device: str = "cuda") -> None:
    """The written config loads with `tunesmith config` and its planned peak is within the stated budget."""
    assert main(["config", str(target)]) == 0
    config = load_config(target)
    rec = plan["recommendation"]
    knobs = rec["solution"]["knobs"]
    assert config.method.name == rec["method"]
    t = config.train
    assert (t.batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing, t.optimizer) == (
        knobs["batch_size"], knobs["gradient_accumulation_steps"], knobs["gradient_checkpointing"], knobs["optimizer"])
    assert config.data.max_seq_len == knobs["max_seq_len"]
    budget = Budget(device, plan["budget"]["gpu_memory_bytes"], plan["budget"]["gpus"])
    peak = planned_peak(config, budget)
    assert peak == rec["solution"]["per_gpu_bytes"]
    assert peak <= plan["budget"]["gpu_memory_bytes"] * USABLE_FRACTION
    assert "launch:" in target.read_text()


def test_8b_on_one_24gb_gpu_fits_lora_with_checkpointing(capsys, tmp_path):
    plan, target = _plan(capsys, tmp_path, "--model", "meta-llama/Llama-3.1-8B", "--gpu-memory", "24GB",
                         "--examples", "8000", "--task", "extraction")
    rec = plan["recommendation"]
    assert rec["method"] in ("lora", "qlora") and rec["fits"]
    knobs = rec["solution"]["knobs"]
    assert knobs["gradient_checkpointing"] and knobs["strategy"] == "single" and not knobs["cpu_offload"]
    assert knobs["batch_size"] * knobs["gradient_accumulation_steps"] == knobs["effective_batch"] == 16
    if plan["methods"]["lora"]["fits"] and plan["methods"]["qlora"]["fits"]:
        assert rec["method"] == "lora" and any("both fit" in r for r in rec["reasons"])
    # Without the knobs (the old report: 4 x 2048, no checkpointing) LoRA did not fit: the solver turned them.
    assert plan["methods"]["lora"]["solution"]["turned"]
    assert plan["methods"]["lora"]["solution"]["relative_step_time"] == pytest.approx(4 / 3, rel=1e-3)
    _check_written(plan, target)


def test_70b_on_one_80gb_gpu_is_qlora_with_checkpointing(capsys, tmp_path):
    plan, target = _plan(capsys, tmp_path, "--model", "meta-llama/Llama-3.1-70B", "--gpu-memory", "80GB",
                         "--examples", "8000", "--task", "extraction")
    rec = plan["recommendation"]
    assert rec["method"] == "qlora" and rec["fits"]
    knobs = rec["solution"]["knobs"]
    assert knobs["gradient_checkpointing"] and not knobs["cpu_offload"] and knobs["strategy"] == "single"
    # 16-bit LoRA needs the 70B weights (131 GiB): only CPU offload gets it onto one GPU, which the choice avoids.
    lora = plan["methods"]["lora"]
    assert not lora["fits"] or lora["solution"]["knobs"]["cpu_offload"]
    _check_written(plan, target)


def test_70b_on_two_24gb_gpus_is_sharded_qlora_or_says_what_it_needs(capsys, tmp_path):
    plan, target = _plan(capsys, tmp_path, "--model", "meta-llama/Llama-3.1-70B", "--gpu-memory", "24GB",
                         "--gpus", "2", "--examples", "8000")
    rec = plan["recommendation"]
    qlora = plan["methods"]["qlora"]
    if rec["fits"]:
        assert rec["method"] == "qlora"
        knobs = rec["solution"]["knobs"]
        assert knobs["strategy"] == "sharded" and knobs["gpus"] == 2
        assert rec["solution"]["launch"].startswith("torchrun --nproc_per_node 2 -m tunesmith.cli train")
        assert load_config(target).train.sharding == "fsdp"
        by = qlora["solution"]["per_gpu_by_strategy"]
        assert by["sharded"] < by["replicated"]  # per-GPU figures for both strategies
        _check_written(plan, target)
    else:
        assert "needs" in qlora["why_not"]


def test_135m_on_cpu_fits_without_any_knob(capsys, tmp_path):
    plan, target = _plan(capsys, tmp_path, "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--device", "cpu",
                         "--gpu-memory", "16GB", "--seq-len", "512", "--examples", "2000", "--task", "extraction")
    rec = plan["recommendation"]
    assert rec["method"] == "lora" and rec["fits"]
    sol = rec["solution"]
    assert sol["turned"] == [] and sol["relative_step_time"] == 1.0
    assert sol["knobs"]["batch_size"] == 4 and sol["knobs"]["max_seq_len"] == 512
    assert sol["launch"].startswith("tunesmith train")
    _check_written(plan, target, device="cpu")


def test_nothing_fits_says_why_and_what_is_needed(capsys, tmp_path):
    plan, _ = _plan(capsys, tmp_path, "--model", "meta-llama/Llama-3.1-70B", "--gpu-memory", "4GB")
    for entry in plan["methods"].values():
        assert not entry["fits"] and "does not fit 1 x 4 GiB" in entry["why_not"]
    assert plan["recommendation"]["fits"] is False
    assert any("no method fits" in r for r in plan["recommendation"]["reasons"])


def test_many_variants_prefer_prompt_learning(capsys, tmp_path):
    plan, _ = _plan(capsys, tmp_path, "--model", "meta-llama/Llama-3.1-8B", "--gpu-memory", "80GB", "--variants", "50")
    rec = plan["recommendation"]
    assert rec["method"] in ("prefix", "prompt") and any("50 task variants" in r for r in rec["reasons"])
    assert 1e-2 <= rec["hyperparameters"]["learning_rate"] <= 3e-1  # prompt-learning rates, not LoRA's


def test_full_only_when_the_task_calls_for_it(capsys, tmp_path):
    plan, _ = _plan(capsys, tmp_path, "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--gpu-memory", "80GB",
                    "--examples", "8000", "--task", "extraction")
    assert plan["methods"]["full"]["fits"] and plan["recommendation"]["method"] == "lora"
    assert any("does not call for it" in r for r in plan["recommendation"]["reasons"])
    plan, _ = _plan(capsys, tmp_path, "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--gpu-memory", "80GB",
                    "--examples", "100000", "--task", "behaviour")
    assert plan["recommendation"]["method"] == "full"


def test_knob_order_checkpointing_before_smaller_batches_before_shorter_sequences():
    from tunesmith.config import MethodConfig
    from tunesmith.models.facts import model_facts
    from tunesmith.plan.solve import Start, solve

    facts = model_facts("meta-llama/Llama-3.1-8B")
    lora = MethodConfig(name="lora")
    start = Start(batch_size=4, effective_batch=16, seq_len=2048)
    roomy = solve(facts, lora, Budget("cuda", 80 * GiB), Start(batch_size=1, effective_batch=16, seq_len=512))
    assert roomy.fits and roomy.turned == []  # 80 GiB for 1 x 512 tokens: nothing to turn
    tight = solve(facts, lora, Budget("cuda", 24 * GiB), start)
    assert tight.knobs.gradient_checkpointing and tight.knobs.max_seq_len == 2048  # sequences kept
    prefix = solve(facts, MethodConfig(name="prefix"), Budget("cuda", 24 * GiB), start)
    assert not prefix.knobs.gradient_checkpointing  # prefix tuning cannot checkpoint: its only way is shorter/smaller
    assert prefix.knobs.batch_size == 1 and prefix.shortened_from == 2048


def test_data_gives_truncated_share(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": "word " * n, "output": "ok"} for n in (10, 20, 400, 3000)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plan, _ = _plan(capsys, tmp_path, "--model", "meta-llama/Llama-3.1-8B", "--gpu-memory", "16GB",
                    "--method", "prefix", "--data", str(data))
    assert plan["budget"]["data"]["examples"] == 4
    prefix = plan["methods"]["prefix"]["solution"]
    assert prefix["shortened_from"] == 2048 and prefix["truncated"]["examples"] > 0
