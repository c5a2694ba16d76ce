"""Extra loss terms (LoopContext.loss_terms): added once per optimizer step and logged beside train_loss."""

import pytest
import torch

from tests.train.conftest import read_metrics


def l2_term(model):
    """0.5 * sum of squared trainable parameters: its gradient is the parameter itself (an independent check)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return "l2_penalty", 0.5 * sum((p * p).sum() for p in params)


def test_a_loss_term_adds_its_gradient_once_per_step(tiny_model_and_tokenizer):
    from accelerate import Accelerator

    from tunesmith.config import MethodConfig, TrainConfig
    from tunesmith.data.formats import Conversation
    from tunesmith.data.pack import single_packs
    from tunesmith.data.render import render_dataset
    from tunesmith.methods.registry import get_method
    from tunesmith.train.loop import LoopContext, accumulate_gradients, count_targets

    model, tokenizer = tiny_model_and_tokenizer
    method = get_method("lora")
    model = method.apply(model, MethodConfig.model_validate({"lora": {"r": 4, "dropout": 0.0}}))
    conversations = [Conversation([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i + 1)}])
                     for i in range(4)]
    packs = single_packs(render_dataset(tokenizer, conversations, 64)[0])
    split = [packs[:2], packs[2:]]  # two micro-batches: the term must still count once
    grads, returned = [], []
    for terms in ([], [l2_term]):
        ctx = LoopContext(TrainConfig(), None, tokenizer.pad_token_id, block_mask=True, precision="fp32",
                          accelerator=Accelerator(cpu=True), method=method, tokenizer=tokenizer, loss_terms=terms)
        model.zero_grad()
        returned.append(accumulate_gradients(model, ctx, split, float(count_targets(packs)))[2])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[1].items():
        assert torch.allclose(grad - grads[0][name], params[name], atol=1e-6), name
    assert returned[0] == {}
    expected = 0.5 * sum(float((p * p).sum()) for p in params.values())
    assert abs(returned[1]["l2_penalty"] - expected) < 1e-4 * max(1.0, expected)


def test_loss_terms_are_logged_in_metrics(make_config, monkeypatch):
    from pathlib import Path

    import tunesmith.train.loop as loop

    original = loop.LoopContext.__init__

    def with_term(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.loss_terms = [l2_term]

    monkeypatch.setattr(loop.LoopContext, "__init__", with_term)
    from tunesmith.recipes.finetune import run_finetune

    config = make_config("train.max_steps=2")
    run_finetune(config, log=lambda *a, **k: None)
    records = read_metrics(Path(config.output.dir) / "run")
    assert all("l2_penalty" in r and "train_loss" in r for r in records)


@pytest.mark.parametrize("method,packing,segments", [("lora", True, True), ("adapters", True, True),
                                                    ("lora", False, False), ("prefix", False, False)])
def test_cpu_training_attends_per_example(make_config, monkeypatch, method, packing, segments):
    """On a CPU, packed training collates segment lengths and runs on per-example attention (no 4-D mask);
    unpacked rows and prefix tuning (which cannot pack) keep a 2-D padding mask on SDPA; the model's
    implementation is restored after training."""
    import tunesmith.train.loop as loop
    from tunesmith.models.attention import SEGMENT_ATTENTION, model_config
    from tunesmith.recipes.finetune import run_finetune

    seen, implementations, original = [], [], loop.forward_loss

    def spy(model, method_, batch, *args, **kwargs):
        seen.append(("segment_lengths" in batch, batch["attention_mask"].dim()))
        implementations.append(model_config(model)._attn_implementation)
        models.append(model)
        return original(model, method_, batch, *args, **kwargs)

    monkeypatch.setattr(loop, "forward_loss", spy)
    models = []
    run_finetune(make_config("train.max_steps=2", f"method.name={method}", f"data.packing={str(packing).lower()}",
                             name=method), log=lambda *a, **k: None)
    assert seen and set(seen) == {(segments, 2)}
    assert set(implementations) == ({SEGMENT_ATTENTION} if segments else {"sdpa"})
    assert model_config(models[0])._attn_implementation == "sdpa"
