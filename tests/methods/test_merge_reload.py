"""QLoRA merge drift measured on the SAVED and RELOADED merged model, not taken from merge_run's own report.

Three models answer the same probe inputs (not merge.py's own probe texts):
  unmerged  the model that was trained: 4-bit NF4 base + LoRA adapter (load_trained, as `tunesmith eval` loads it)
  reloaded  the folder `tunesmith merge` wrote, loaded back from disk by plain transformers in fp32
  plain     the fp32 base (never quantized) + the same adapter through peft
drift = max |logits(reloaded) - logits(unmerged)| must be float rounding (NF4 dequantization is exact: code * absmax),
while |reloaded - plain| is the quantization error, orders of magnitude larger: had merge saved the unquantized
base, or lost the adapter, the first number would be large and the test would fail. The merged weights are also
checked against an independent computation, W = dequantize_4bit(W_nf4) + (alpha / r) * B @ A, per target layer.
"""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.methods.test_methods_merge import trained_adapter
from tunesmith.methods.merge import merge_run
from tunesmith.methods.registry import load_trained

PROBES = ["a contract between two parties", "zebra 12345 !?", "x"]
DRIFT_TOLERANCE = 1e-4  # fp32 logits of a 2-layer tiny model: rounding only (measured ~1e-6)
WEIGHT_TOLERANCE = 1e-6


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits.float()[batch["attention_mask"].bool()]


def _peft_folder(adapter_dir):
    return next(p.parent for p in adapter_dir.rglob("adapter_config.json"))


def test_qlora_merge_drift_on_the_reloaded_model(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    # fp32 compute: the tolerances here are for fp32 rounding, whatever bf16 support this machine has
    adapter = trained_adapter("qlora", tiny_model_dir, tmp_path / "adapter",
                              {"lora": {"r": 4, "dropout": 0.0}, "quant": {"compute_dtype": "float32"}})
    unmerged, tokenizer, _ = load_trained(adapter, log=lambda _: None)
    # The trained model's forward as training ran it. (bitsandbytes >= 0.48, in eval mode on a CPU with AVX512-BF16,
    # repacks the 4-bit weights in place and multiplies in bf16; train mode, with dropout 0, keeps the fp32 path.)
    unmerged.train()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    report = merge_run(adapter, tmp_path / "merged", log=lambda _: None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      str(_peft_folder(adapter)))
    drift = (_logits(reloaded, tokenizer) - _logits(unmerged, tokenizer)).abs().max().item()
    quantization_error = (_logits(reloaded, tokenizer) - _logits(plain, tokenizer)).abs().max().item()
    print(f"\nqlora merge, reloaded from disk: drift vs quantized base + adapter = {drift:.3g} "
          f"(merge_run reported {report['max_abs_logit_diff']:.3g}); vs fp32 base + adapter = {quantization_error:.3g}")
    assert drift <= DRIFT_TOLERANCE
    assert quantization_error > 100 * max(drift, 1e-7)  # the comparison can tell the two bases apart

    # independent computation of every merged weight from the 4-bit base and the saved adapter
    peft_dir = _peft_folder(adapter)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(str(peft_dir / "adapter_model.safetensors"))
    merged = dict(reloaded.named_parameters())
    quantized = unmerged.get_base_model()
    checked = 0
    for name, module in quantized.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = module.weight.quant_state
        base_weight = bnbf.dequantize_4bit(module.weight.data, state).float()
        name = name.removesuffix(".base_layer")  # peft wraps each target: q_proj.base_layer is the 4-bit Linear
        key = f"base_model.model.{name}"
        a, b = lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"]
        expected = base_weight + scale * (b.float() @ a.float())
        assert (merged[f"{name}.weight"] - expected).abs().max().item() <= WEIGHT_TOLERANCE, name
        checked += 1
    assert checked == 14  # 7 linear layers x 2 blocks of the tiny Llama, all LoRA targets
