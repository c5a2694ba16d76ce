"""On the reference model (SmolLM2-135M-Instruct): a deliberately overfitted LoRA run (high rate, many epochs on
a tiny set, no best-checkpoint restore) is diagnosed as overfitting and drifts further from the base, with lower
probe retention, than a sane LoRA run on the same data. The numbers are printed (run with -s) and written to
$TUNESMITH_REFERENCE_OUT when that is set.

Measured once on the shared 2-core CPU (31.7 min, 2026-11-29), before the diagnosis gained its
"eval flat since the first evaluation" rule: sane KL 0.0011 nats/token, probe retention 1.00 (0.40 -> 0.40),
perplexity 26.56 -> 26.49; overfit KL 6.25, retention 0.19 (0.40 -> 0.075), perplexity 26.56 -> 1319, final
eval-train gap 0.23. That run's overfit curve was then classified "late_spike" (a spike at step 6, eval flat at its
floor from the first evaluation); its exact values are now a unit test in test_eval_diagnose.py, classified
"overfitting" by the revised rule."""

from __future__ import annotations

import json
import os
import random

import pytest

from tests.conftest import requires_reference

pytestmark = [pytest.mark.reference, pytest.mark.slow, requires_reference]

CITIES = ["Lisbon", "Oslo", "Quito", "Nairobi", "Hanoi", "Perth", "Lyon", "Tucson", "Gdansk", "Osaka"]


def _rows(start: int, count: int, rng: random.Random) -> list[dict[str, str]]:
    """Facts about made-up products: the format generalises, the values cannot (eval loss must turn up)."""
    return [{"instruction": f"What is the warranty on the Zephyr X{i} kettle, and where does it ship from?",
             "output": f"The Zephyr X{i} kettle has a {rng.choice([6, 12, 18, 24, 36])}-month warranty and ships "
                       f"from {rng.choice(CITIES)}."} for i in range(start, start + count)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference-data")
    rng = random.Random(7)
    for name, rows in (("train", _rows(100, 16, rng)), ("validation", _rows(500, 8, rng))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(name: str, data_dir, out_dir, options: list[str]):
    from tunesmith.config import load_config

    return load_config(None, [
        "model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct", "model.dtype=float32",
        f"data.train=[{data_dir / 'train.jsonl'}]", f"data.validation=[{data_dir / 'validation.jsonl'}]",
        "data.max_seq_len=128", "data.packing=false", "train.batch_size=4", "train.warmup_ratio=0.05",
        "train.show_progress=false", "train.load_best_at_end=false", "train.seed=0", "method.name=lora",
        "method.lora.dropout=0.0", "eval.forgetting=true", "eval.forgetting_max_prompts=4",
        f"output.dir={out_dir}", f"output.name={name}", "output.register_run=false", *options,
    ])


@pytest.fixture
def one_thread():
    """On the shared 2-core machine two torch threads were far slower than one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_overfitted_run_is_diagnosed_and_forgets_more(data_dir, tmp_path, one_thread):
    import torch

    from tunesmith.eval.diagnose import diagnose_file
    from tunesmith.eval.forgetting import measure_forgetting
    from tunesmith.methods.registry import load_trained
    from tunesmith.recipes.finetune import run_finetune

    quiet = lambda *a, **k: None  # noqa: E731
    runs = {
        "sane": ["method.lora.r=8", "method.lora.alpha=16", "train.learning_rate=1e-4", "train.epochs=2",
                 "train.eval_steps=2"],
        "overfit": ["method.lora.r=64", "method.lora.alpha=128", "train.learning_rate=3e-3", "train.epochs=8",
                    "train.eval_steps=4"],
    }
    numbers = {}
    for name, options in runs.items():
        torch.manual_seed(0)
        summary = run_finetune(_config(name, data_dir, tmp_path / "runs", options), log=quiet)
        run_dir = tmp_path / "runs" / name
        diagnosis = diagnose_file(run_dir)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in records if "kl_drift" in r]  # the ForgettingCallback ran at every evaluation
        model, tokenizer, _ = load_trained(run_dir, log=quiet)
        forgetting = measure_forgetting(model, tokenizer, max_prompts=32, max_probes=40, log=quiet)
        numbers[name] = {
            "steps": summary.steps, "diagnosis": diagnosis["diagnosis"], "best_step": diagnosis["best_step"],
            "best_eval_loss": diagnosis["best_eval_loss"], "gap": diagnosis["gap"],
            "final_eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r][-1],
            "final_train_loss": summary.final_train_loss,
            "callback_kl_last": logged[-1]["kl_drift"] if logged else None,
            "callback_retention_last": logged[-1].get("probe_retention") if logged else None,
            "kl_drift": forgetting["kl_drift"], "probe_base": forgetting["probe_accuracy"]["base"],
            "probe_tuned": forgetting["probe_accuracy"]["tuned"], "probe_retention": forgetting["probe_retention"],
            "perplexity_base": forgetting["perplexity"]["base"], "perplexity_tuned": forgetting["perplexity"]["tuned"],
            "wall_seconds": summary.wall_seconds,
            "curve": [{k: r[k] for k in ("step", "train_loss", "eval_loss") if k in r} for r in records],
        }
        assert logged and len(logged) == len([r for r in records if "eval_loss" in r])
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in numbers.items()}, indent=2))
    if os.environ.get("TUNESMITH_REFERENCE_OUT"):
        with open(os.environ["TUNESMITH_REFERENCE_OUT"], "w") as handle:
            json.dump(numbers, handle, indent=2)
    sane, overfit = numbers["sane"], numbers["overfit"]
    assert overfit["diagnosis"] == "overfitting"
    assert overfit["gap"] > 0.1  # measured 0.228: final eval loss well above the (memorised) train loss
    assert overfit["kl_drift"] > sane["kl_drift"]
    assert overfit["probe_retention"] < sane["probe_retention"]
