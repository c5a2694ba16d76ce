"""A real PEFT LoRA adapter (saved by peft on a tiny model) survives registry -> alias -> export byte for byte,
and the exported folder loads with plain `PeftModel.from_pretrained` to identical logits."""

from __future__ import annotations

import shutil

import torch

from tunesmith.registry import artifacts as art
from tunesmith.registry.aliases import promote, resolve_alias
from tunesmith.registry.export import export_run
from tunesmith.registry.runs import register_run


def test_exported_peft_adapter_loads_to_identical_logits(tiny_model_dir, make_run, sqlite_url, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(base, config).eval()
    run = make_run("lora-run", base=tiny_model_dir)
    shutil.rmtree(run / "adapter")
    tuned.save_pretrained(run / "adapter")
    record = register_run(run, url=sqlite_url)
    assert record["base_model_hash"] is not None  # the tiny model's safetensors were hashed
    promote(record["ref"], "production", sqlite_url)
    served = resolve_alias("production", sqlite_url)
    exported = export_run(record["ref"], tmp_path / "export", sqlite_url)
    assert art.hash_folder(served)[0] == record["adapter_digest"] == art.hash_folder(run / "adapter")[0]

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits
        for folder in (served, exported["out"]):
            fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            loaded = PeftModel.from_pretrained(fresh, folder).eval()
            assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert (expected - plain).abs().max() > 1e-3  # the adapter really changes the model
