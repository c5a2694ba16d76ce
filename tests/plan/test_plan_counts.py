"""Trainable-parameter counts: formula vs peft's own count on tiny models, and catalogue totals vs meta device.

Expected totals are the published sizes of each model (8.03B, 70.55B, ...); the exact integers were produced by
instantiating each config on the meta device (the second test recomputes them that way).
"""

from __future__ import annotations

import pytest
import torch

from tunesmith.config import MethodConfig
from tunesmith.methods.adapters import adapter_trainable_params
from tunesmith.methods.full import full_trainable_params
from tunesmith.methods.lora import lora_targets, lora_trainable_params
from tunesmith.methods.prefix import prefix_trainable_params
from tunesmith.methods.prompt import prompt_trainable_params
from tunesmith.models.facts import facts_from_config, model_facts
from tunesmith.plan.counts import trainable_params

KNOWN_TOTALS = {
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
}


@pytest.mark.parametrize("hub_id", sorted(KNOWN_TOTALS))
def test_catalogue_formula_equals_meta_device(hub_id):
    formula = model_facts(hub_id)
    meta = model_facts(hub_id, force_meta=True)
    assert formula.counted_by == "formula" and meta.counted_by == "meta-device"
    assert formula.params_total == meta.params_total == KNOWN_TOTALS[hub_id]
    assert formula.norm_params == meta.norm_params
    assert formula.layer_params == meta.layer_params
    shapes = lambda f: sorted((m.name, m.kind, m.in_features, m.out_features, m.bias) for m in f.modules)  # noqa: E731
    assert shapes(formula) == shapes(meta)


def test_published_sizes_round_to_known_figures():
    rounded = {k: round(v / 1e9, 2) for k, v in KNOWN_TOTALS.items()}
    assert rounded["meta-llama/Llama-3.1-70B"] == 70.55 and rounded["Qwen/Qwen2.5-7B"] == 7.62
    assert round(KNOWN_TOTALS["HuggingFaceTB/SmolLM2-135M-Instruct"] / 1e6, 1) == 134.5


def _peft_count(model_dir, config) -> int:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainable, _total = get_peft_model(model, config).get_nb_trainable_parameters()
    return trainable


LORA_CASES = [
    dict(r=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, target_modules=["k_proj", "v_proj", "down_proj"]),
    dict(r=16, target_modules="all-linear"),
    dict(r=2, target_modules="all-linear", bias="all"),
    dict(r=8, target_modules=["q_proj", "k_proj"], bias="lora_only"),
    dict(r=4, target_modules=["o_proj", "up_proj"], use_dora=True),
    dict(r=4, target_modules=r".*\.layers\.1\.mlp\.(gate|up)_proj"),
    dict(r=4, target_modules=["q_proj", "embed_tokens"]),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: f"r{c['r']}-{c['target_modules']}-{c.get('bias', '')}{c.get('use_dora', '')}")
def test_lora_count_equals_peft(arch, case, tiny_model_dir, tiny_qwen_dir):
    from peft import LoraConfig

    model_dir = tiny_model_dir if arch == "llama" else tiny_qwen_dir
    facts = model_facts(str(model_dir))
    expected = _peft_count(model_dir, LoraConfig(task_type="CAUSAL_LM", **case))
    got = lora_trainable_params(
        facts, case["r"], case["target_modules"], bias=case.get("bias", "none"), use_dora=case.get("use_dora", False)
    )
    assert got == expected


def test_lora_modules_to_save_untied_head(tiny_qwen_dir):
    from peft import LoraConfig

    facts = model_facts(str(tiny_qwen_dir))
    expected = _peft_count(tiny_qwen_dir, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert lora_trainable_params(facts, 4, ["q_proj"], modules_to_save=["lm_head"]) == expected


def test_gqa_kv_projections_are_narrower(tiny_model_dir):
    facts = model_facts(str(tiny_model_dir))  # hidden 64, 4 heads, 2 kv heads -> kv width 32
    assert facts.kv_width == 32 < facts.hidden_size
    r = 8
    assert lora_trainable_params(facts, r, ["q_proj"]) == facts.num_layers * r * (64 + 64)
    assert lora_trainable_params(facts, r, ["k_proj"]) == facts.num_layers * r * (64 + 32)


def test_all_linear_excludes_tied_and_untied_head(tiny_model_dir, tiny_qwen_dir):
    for d in (tiny_model_dir, tiny_qwen_dir):
        facts = model_facts(str(d))
        names = {m.short for m in lora_targets(facts, "all-linear")}
        assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert len(lora_targets(facts, "all-linear")) == 7 * facts.num_layers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tokens,projection,hidden", [(5, False, 0), (12, False, 0), (5, True, 24), (7, True, 40)])
def test_prefix_count_equals_peft(arch, tokens, projection, hidden, tiny_model_dir, tiny_qwen_dir):
    from peft import PrefixTuningConfig

    model_dir = tiny_model_dir if arch == "llama" else tiny_qwen_dir
    facts = model_facts(str(model_dir))
    kwargs = dict(prefix_projection=True, encoder_hidden_size=hidden) if projection else {}
    expected = _peft_count(model_dir, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, **kwargs))
    assert prefix_trainable_params(facts, tokens, projection, hidden) == expected
    if not projection:  # GQA: the prefix is kv width (2 heads x 16), not hidden (64), per layer and per k/v
        assert expected == tokens * facts.num_layers * 2 * 32


@pytest.mark.parametrize("tokens", [1, 20])
def test_prompt_count_equals_peft(tokens, tiny_model_dir):
    from peft import PromptTuningConfig

    facts = model_facts(str(tiny_model_dir))
    expected = _peft_count(tiny_model_dir, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
    assert prompt_trainable_params(facts, tokens) == expected == tokens * 64


def test_adapters_formula_by_hand():
    facts = model_facts("HuggingFaceTB/SmolLM2-135M-Instruct")
    d, m = 576, 576 // 16
    assert adapter_trainable_params(facts, 16) == 30 * 2 * (d * m + m + m * d + d) == 2_525_040


def test_full_counts_with_freezing(tiny_model_and_tokenizer, tiny_qwen_dir):
    from transformers import AutoModelForCausalLM

    model, _tok = tiny_model_and_tokenizer
    facts = facts_from_config(model.config.to_dict())
    assert full_trainable_params(facts) == sum(p.numel() for p in model.parameters())
    # Freeze the input embedding (tied: the head goes with it) and the first layer, count what is left by hand.
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    truth = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert full_trainable_params(facts, freeze_embeddings=True, freeze_first_layers=1) == truth
    qwen = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    qfacts = model_facts(str(tiny_qwen_dir))
    qwen.model.embed_tokens.weight.requires_grad_(False)  # untied: lm_head stays trainable
    assert full_trainable_params(qfacts, freeze_embeddings=True) == sum(p.numel() for p in qwen.parameters() if p.requires_grad)


def test_trainable_params_dispatch_names_formula():
    facts = model_facts("meta-llama/Llama-3.1-8B")
    count = trainable_params(facts, MethodConfig(name="lora", lora={"r": 16, "target_modules": ["q_proj", "v_proj"]}))
    # q: 4096 -> 4096, v: 4096 -> 1024 (8 kv heads x 128), 32 layers
    assert count.trainable_params == 32 * 16 * ((4096 + 4096) + (4096 + 1024)) == 6_815_744
    assert "64 modules" in count.formula
    assert trainable_params(facts, MethodConfig(name="prompt")).trainable_params == 20 * 4096
