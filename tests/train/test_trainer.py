"""The trainer on a tiny model: learning, schedule, accumulation, resume, best checkpoint, early stopping."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import read_metrics
from tunesmith.recipes.finetune import run_finetune


def log(*_args, **_kwargs):
    pass


def test_training_lowers_loss_and_writes_the_run_directory(make_config):
    config = make_config("train.max_steps=12", "train.eval_steps=6", "train.warmup_ratio=0", "method.lora.r=16")
    summary = run_finetune(config, log=log)
    run_dir = config.output.dir and (__import__("pathlib").Path(config.output.dir) / "run")
    records = read_metrics(run_dir)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.85
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    for name in ("config.yaml", "data_manifest.json", "metrics.jsonl", "summary.json", "loss_curves.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).exists(), name
    assert summary.steps == 12 and summary.best_step == 12
    manifest = json.loads((run_dir / "data_manifest.json").read_text())
    assert manifest["train_records"] == 20 and manifest["validation_records"] == 4
    assert manifest["hash"].startswith("sha256:") and manifest["files"][0]["sha256"].startswith("sha256:")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(config.model.name_or_path)
    PeftModel.from_pretrained(base, run_dir / "adapter")  # PEFT's own loader reads it


def test_warmup_then_cosine_schedule(make_config):
    config = make_config("train.max_steps=10", "train.warmup_ratio=0.2", "train.learning_rate=1e-3")
    run_finetune(config, log=log)
    lrs = [r["lr"] for r in read_metrics(__import__("pathlib").Path(config.output.dir) / "run")]
    # linear warm-up over 2 steps (0, 0.5), then cosine from the peak: lr_t = peak * 0.5 * (1 + cos(pi * (t-2)/8))
    expected = [1e-3 * t / 2 for t in range(2)] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 8)) for t in range(2, 10)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_gradient_accumulation_matches_a_larger_batch(tiny_model_and_tokenizer):
    """One optimizer step's gradient is the same for 4 sequences as 1x4, 2x2 or 4x1 (micro-batch x accumulation).

    Compared on gradients, not on losses after several AdamW steps: Adam's first steps divide by |g| and so
    amplify float-rounding noise in near-zero gradients.
    """
    from accelerate import Accelerator

    from tunesmith.config import MethodConfig, TrainConfig
    from tunesmith.data.formats import Conversation
    from tunesmith.data.pack import single_packs
    from tunesmith.data.render import render_dataset
    from tunesmith.methods.registry import get_method
    from tunesmith.train.loop import LoopContext, accumulate_gradients, count_targets

    model, tokenizer = tiny_model_and_tokenizer
    method = get_method("lora")
    model = method.apply(model, MethodConfig.model_validate({"lora": {"r": 4, "dropout": 0.0, "init": "gaussian"}}))
    torch.manual_seed(1)
    with torch.no_grad():  # move B away from zero so every LoRA parameter gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    texts = [("short q", "a"), ("a much longer question " * 3, "and a longer answer"), ("mid q " * 2, "mid"), ("x", "y" * 9)]
    conversations = [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in texts]
    examples, _ = render_dataset(tokenizer, conversations, 256)
    packs = single_packs(examples)
    ctx = LoopContext(TrainConfig(), None, tokenizer.pad_token_id, block_mask=True, precision="fp32",
                      accelerator=Accelerator(cpu=True), method=method, tokenizer=tokenizer)
    grads = []
    for micro in (4, 2, 1):
        model.zero_grad()
        split = [packs[i: i + micro] for i in range(0, 4, micro)]
        accumulate_gradients(model, ctx, split, float(count_targets(packs)))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    # fp32 summation order differs with the split (measured: at most ~6e-7 of each tensor's largest entry); a wrong
    # token weighting would be off by a factor, not by 1e-5
    for other in grads[1:]:
        for name, grad in grads[0].items():
            assert (grad - other[name]).abs().max() <= 1e-5 * grad.abs().max(), name


class Crash:
    """Stops the process 'abruptly' at a given step, after that step's checkpoint was not yet written."""

    def __init__(self, at_step):
        self.at_step = at_step

    def on_evaluate(self, state, model, tokenizer):
        if state.step == self.at_step:
            raise KeyboardInterrupt("simulated crash")
        return {}


def test_resume_continues_exactly(make_config, monkeypatch):
    """Interrupted at step 4 (last checkpoint: step 3) and resumed == uninterrupted: same losses and weights."""
    from pathlib import Path

    import tunesmith.recipes.finetune as run_module

    straight = make_config("train.max_steps=6", "train.eval_steps=1", "train.save_steps=3",
                           "method.lora.dropout=0.1", name="straight")
    run_finetune(straight, log=log)
    resumed = make_config("train.max_steps=6", "train.eval_steps=1", "train.save_steps=3",
                          "method.lora.dropout=0.1", name="resumed")
    monkeypatch.setattr(run_module, "_callbacks", lambda config: [Crash(4)])
    with pytest.raises(KeyboardInterrupt):
        run_finetune(resumed, log=log)
    root = Path(straight.output.dir)
    assert [r["step"] for r in read_metrics(root / "resumed")] == [1, 2, 3]
    monkeypatch.setattr(run_module, "_callbacks", lambda config: [])
    run_finetune(resumed, resume=True, log=log)
    a, b = read_metrics(root / "straight"), read_metrics(root / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], abs=1e-6)
    wa = load_file(str(root / "straight/adapter/adapter_model.safetensors"))
    wb = load_file(str(root / "resumed/adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_early_stopping_and_best_checkpoint(make_config):
    """A learning rate far too high makes eval loss rise: training stops and the best checkpoint is loaded."""
    from pathlib import Path

    # 2.0: in fp32 (conftest) a rate of 0.5 recovers after one bad evaluation and never stops (measured).
    config = make_config("train.max_steps=40", "train.eval_steps=1", "train.learning_rate=2.0",
                         "train.warmup_ratio=0", "train.early_stopping_patience=2", "train.lr_scheduler=constant")
    summary = run_finetune(config, log=log)
    records = read_metrics(Path(config.output.dir) / "run")
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert summary.steps < 40 and "early stopping" in summary.stop_reason
    assert summary.best_step == min(evals, key=evals.get)
    assert summary.best_eval_loss == pytest.approx(min(evals.values()), abs=1e-6)
    best_dir = Path(config.output.dir) / "run/checkpoints" / f"step-{summary.best_step}"
    saved = load_file(str(best_dir / "trainable.safetensors"))
    final = load_file(str(Path(config.output.dir) / "run/adapter/adapter_model.safetensors"))
    # the exported adapter is the best checkpoint's weights (peft drops the adapter name from keys)
    for key, value in saved.items():
        short = key.replace("base_model.model.", "").replace(".default", "")
        match = [v for k, v in final.items() if k.replace("base_model.model.", "") == short]
        assert match and torch.equal(match[0], value)


def test_existing_run_directory_is_not_overwritten(make_config):
    from tunesmith.config import ConfigError

    config = make_config("train.max_steps=1")
    run_finetune(config, log=log)
    with pytest.raises(ConfigError, match="already exists"):
        run_finetune(config, log=log)


def test_malformed_record_names_file_line_and_field(make_config, tmp_path):
    from tunesmith.data.formats import RecordError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    with pytest.raises(RecordError) as err:
        run_finetune(make_config(f"data.train=[{bad}]"), log=log)
    assert str(bad) in str(err.value) and ":2" in str(err.value) and "output" in str(err.value)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.methods.registry import get_method
    from tunesmith.models.load import load_model

    grads = []
    for checkpointing in (False, True):
        model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), log=log)
        torch.manual_seed(0)
        method = get_method("lora")
        model = method.apply(model, MethodConfig.model_validate({"lora": {"r": 4, "dropout": 0.0}}))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, 0, 0.1)
        if checkpointing:
            method.enable_gradient_checkpointing(model)
        model.train()
        ids = torch.arange(3, 40).unsqueeze(0)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_data_prepare_runs_before_training(make_config, tmp_path):
    """data.prepare: raw files are validated, deduplicated and split first; training uses the cleaned split."""
    from pathlib import Path

    raw = tmp_path / "raw.jsonl"
    rows = [json.dumps({"instruction": f"Name item {i}.", "output": f"item-{i}"}) for i in range(16)]
    rows += [rows[0], rows[1], '{"instruction": "broken"}']  # two exact duplicates and one invalid record
    raw.write_text("\n".join(rows) + "\n")
    config = make_config(f"data.train=[{raw}]", "data.validation=[]", "data.prepare=true",
                         "data.validation_fraction=0.25", "train.max_steps=1")
    run_finetune(config, log=log)
    manifest = json.loads((Path(config.output.dir) / "run/data_manifest.json").read_text())
    prepared = manifest["prepare"]
    assert prepared["input"] == 19 and prepared["quarantined"] == 1 and prepared["duplicates_exact"] == 2
    assert manifest["train_records"] + manifest["validation_records"] == prepared["kept"] == 16
    assert manifest["validation_records"] > 0
