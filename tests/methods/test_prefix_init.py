"""Prefix initialised from a text's keys/values: the prefixed model on X equals the base model on text + X."""

import pytest
import torch

from tunesmith.config import MethodConfig
from tunesmith.methods.base import MethodError
from tunesmith.methods.registry import get_method


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_from_text_equals_base_model_with_the_text_as_context(arch, tmp_path):
    from tunesmith.models.tiny import build_tiny_model

    torch.manual_seed(0)
    base, tokenizer = build_tiny_model(arch)
    base.eval()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    text = "Extract the clause as JSON with its parties"
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(text_ids)
    x = torch.tensor([tokenizer("the contract says hello world", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = base(input_ids=torch.cat([torch.tensor([text_ids]), x], dim=1)).logits[:, n:]
        plain = base(input_ids=x).logits
    config = MethodConfig(name="prefix", prefix={"num_virtual_tokens": n, "init": "text", "init_text": text,
                                                 "tokenizer": str(base_dir)})
    model = get_method("prefix").apply(base, config)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, plain, atol=1e-3)  # the prefix does act


def test_prefix_text_init_refuses_bad_options():
    from tunesmith.models.tiny import build_tiny_model

    base, _ = build_tiny_model("llama")
    with pytest.raises(MethodError, match="init_text is empty"):
        get_method("prefix").apply(base, MethodConfig(name="prefix", prefix={"init": "text"}))
    with pytest.raises(MethodError, match="projection"):
        get_method("prefix").apply(base, MethodConfig(name="prefix", prefix={"init": "text", "init_text": "x",
                                                                            "projection": True}))
