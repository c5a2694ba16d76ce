"""`tunesmith merge` and the QLoRA specifics: merged LoRA equals unmerged within 1e-5 (fp32), a merged folder
cannot be merged again, QLoRA merges after dequantizing and reports the logit difference, non-mergeable methods
export the base + adapter pair, and the 4-bit base's storage is measured against the closed form."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.cli import main
from tunesmith.config import MethodConfig
from tunesmith.methods.merge import merge_run
from tunesmith.methods.registry import get_method, load_trained


def trained_adapter(name: str, base_dir, out_dir, options: dict | None = None):
    """Apply `name` to the tiny base, move its weights off their init, save it as a run's adapter/ would be."""
    method = get_method(name)
    config = MethodConfig.model_validate({"name": name, **(options or {})})
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **method.base_load_kwargs(config))
    model = method.apply(base, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.05)
    method.save(model, out_dir, config, str(base_dir))
    return out_dir


def probe(model, tokenizer):
    batch = tokenizer(["clause: the buyer pays", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


LORA = {"lora": {"r": 4, "dropout": 0.0}}


def test_lora_merge_equals_unmerged_and_refuses_a_second_merge(tiny_model_dir, tmp_path, capsys):
    adapter = trained_adapter("lora", tiny_model_dir, tmp_path / "adapter", LORA)
    unmerged, tokenizer, _ = load_trained(adapter, log=lambda _: None)
    expected = probe(unmerged, tokenizer)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["merged"] and report["max_abs_logit_diff"] <= 1e-5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (probe(merged, tokenizer) - expected).abs().max() <= 1e-5
    assert (probe(merged, tokenizer) - probe(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)).abs().max() > 1e-3
    assert main(["merge", str(tmp_path / "merged"), "--out", str(tmp_path / "again")]) == 2
    assert "already a merged model" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_qlora_merges_after_dequantizing_and_reports_the_difference(tiny_model_dir, tmp_path):
    # fp32 compute, so the unmerged reference is not itself rounded to bf16 ('auto' picks bf16 on AMX CPUs).
    adapter = trained_adapter("qlora", tiny_model_dir, tmp_path / "adapter", {**LORA, "quant": {"compute_dtype": "float32"}})
    report = merge_run(adapter, tmp_path / "merged", log=lambda _: None)
    assert report["merged"] and report["compared_to"] == "quantized base + adapter"
    # Dequantizing NF4 to fp32 is exact (each weight is code[i] * absmax), so merged == quantized + adapter up to
    # float rounding of the matmul order; the difference is reported, and small.
    assert 0 <= report["max_abs_logit_diff"] < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())


@pytest.mark.parametrize("name,options", [("prefix", {"prefix": {"num_virtual_tokens": 3}}),
                                          ("adapters", {"adapters": {"reduction_factor": 8}})])
def test_unmergeable_methods_export_the_pair_and_say_why(name, options, tiny_model_dir, tmp_path, capsys):
    adapter = trained_adapter(name, tiny_model_dir, tmp_path / "adapter", options)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "export")]) == 0
    out = capsys.readouterr().out
    assert f"{name} cannot merge" in out
    readme = (tmp_path / "export" / "README.md").read_text()
    assert str(tiny_model_dir) in readme
    copied = sorted(p.name for p in (tmp_path / "export" / "adapter").iterdir())
    assert copied == sorted(p.name for p in adapter.iterdir())
    model, _, info = load_trained(tmp_path / "export" / "adapter", log=lambda _: None)  # the pair loads
    assert info["method"] == name


def test_full_fine_tuning_refuses_to_merge(tiny_model_dir, tmp_path, capsys):
    adapter = trained_adapter("full", tiny_model_dir, tmp_path / "adapter")
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    assert "already holds a full model" in capsys.readouterr().err


def test_quantized_base_storage_matches_the_closed_form(tiny_model_dir):
    from tunesmith.methods.qlora import constant_bits_per_param, quantized_base_report

    assert constant_bits_per_param(True) == pytest.approx(8 / 64 + 32 / (64 * 256))
    assert constant_bits_per_param(False) == 0.5
    reports = {}
    for double in (True, False):
        config = MethodConfig.model_validate({"name": "qlora", "quant": {"double_quant": double}})
        base = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=torch.float32, **get_method("qlora").base_load_kwargs(config))
        reports[double] = quantized_base_report(base)
    # 7 matrices per layer, 2 layers: 2 * (64*64*2 + 64*32*2 + 64*128*3) quantized weights, 4 bits each.
    quantized = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)
    assert reports[True]["quantized_params"] == quantized
    assert reports[True]["packed_weight_bytes"] == quantized // 2
    assert reports[False]["constant_bits_per_param"] == pytest.approx(0.5)  # one fp32 absmax per 64 weights
    # Double quantization: 8-bit absmax per 64 + fp32 per 256 blocks; tiny matrices fill the 256-block partly,
    # so the measured value sits a little above the asymptotic 0.127.
    assert 0.125 < reports[True]["constant_bits_per_param"] < 0.2
