"""The common contract over all six methods, on tiny random models (hidden 64, 2 layers).

apply → trainable count equal to the closed form (and to peft's own count where peft implements the method);
save → load onto a fresh base gives identical logits; an optimiser step leaves frozen weights bit-identical;
a few steps lower the loss on a memorisable batch; zero-initialised methods start equal to the base model.
Expected counts are closed forms computed from the tiny configs (see each method module's docstring).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.config import MethodConfig
from tunesmith.methods.registry import available_methods, get_method
from tunesmith.models.load import keep_4bit_kernels

METHODS = ["full", "lora", "qlora", "prefix", "prompt", "adapters"]
OPTIONS = {
    "lora": {"lora": {"r": 4, "dropout": 0.0}},
    "qlora": {"lora": {"r": 4, "dropout": 0.0}},
    "prefix": {"prefix": {"num_virtual_tokens": 4}},
    "prompt": {"prompt": {"num_virtual_tokens": 4}},
    "adapters": {"adapters": {"reduction_factor": 4}},
    "full": {},
}
LEARNING_RATE = {"full": 1e-3, "lora": 1e-2, "qlora": 1e-2, "prefix": 3e-2, "prompt": 3e-2, "adapters": 1e-2}


def method_config(name: str) -> MethodConfig:
    return MethodConfig.model_validate({"name": name, **OPTIONS[name]})


def load_base(directory, name: str):
    method = get_method(name)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, **method.base_load_kwargs(method_config(name))
    )
    keep_4bit_kernels(model)  # as models.load does: one 4-bit kernel on CPUs with native bf16
    return model


def applied(directory, name: str):
    method = get_method(name)
    return method, method.apply(load_base(directory, name), method_config(name))


def batch(seed: int = 0, size: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (size, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_of(method, model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return method.align_logits(model(**inputs).logits, inputs["input_ids"])


def loss_of(method, model, inputs) -> torch.Tensor:
    logits = method.align_logits(model(**inputs).logits, inputs["input_ids"])
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), inputs["input_ids"][:, 1:].reshape(-1)
    )


def perturb_trainable(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move trainable weights away from their initialisation, so zero-initialised parts matter in comparisons."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * scale)


def expected_count(name: str, model) -> int:
    """Closed forms on the tiny config (d=64, 2 layers, 4 heads of 16, 2 kv heads, vocab V, ffn f)."""
    config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    d, layers, f = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    if name in ("lora", "qlora"):
        r = 4  # q,k,v,o,gate,up,down: r * (in + out) each
        per_layer = r * ((d + d) + (d + kv) * 2 + (d + d) + (d + f) * 2 + (f + d))
        return layers * per_layer
    if name == "prefix":
        return 4 * layers * 2 * kv
    if name == "prompt":
        return 4 * d
    if name == "adapters":
        m = d // 4
        return layers * 2 * (d * m + m + m * d + d)
    if name == "full":
        return sum(p.numel() for p in model.parameters())
    raise AssertionError(name)


def test_every_method_is_registered():
    assert sorted(available_methods()) == sorted(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_trainable_count_matches_closed_form_planner_and_peft(name, tiny_model_dir):
    method, model = applied(tiny_model_dir, name)
    count = method.trainable_parameter_count(model)
    assert count == expected_count(name, model)
    from tunesmith.models.facts import model_facts
    from tunesmith.plan.counts import trainable_params

    planned = trainable_params(model_facts(str(tiny_model_dir)), method_config(name))
    assert count == planned.trainable_params, planned.formula  # the planner's formula agrees with the model
    if hasattr(model, "get_nb_trainable_parameters"):  # peft implements lora, qlora, prefix, prompt
        assert count == model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("name", METHODS)
def test_save_load_roundtrip_gives_identical_logits(name, tiny_model_dir, tmp_path):
    method, model = applied(tiny_model_dir, name)
    perturb_trainable(model)
    model.eval()
    inputs = batch()
    before = logits_of(method, model, inputs)
    method.save(model, tmp_path / "adapter", method_config(name), str(tiny_model_dir))
    assert (tmp_path / "adapter" / "tunesmith_method.json").exists()
    assert list((tmp_path / "adapter").glob("*.safetensors")), "state must be saved as safetensors"
    loaded = method.load(load_base(tiny_model_dir, name), tmp_path / "adapter")
    after = logits_of(method, loaded, inputs)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_step_keeps_frozen_weights_and_memorisation_lowers_loss(name, tiny_model_dir):
    method, model = applied(tiny_model_dir, name)
    torch.manual_seed(0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and (name == "full" or frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE[name])
    inputs = batch(size=2, length=10)
    model.train()
    losses = []
    for _ in range(8):
        loss = loss_of(method, model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for parameter_name, parameter in model.named_parameters():
        if parameter_name in frozen:
            assert torch.equal(parameter.detach(), frozen[parameter_name]), parameter_name
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p.detach(), trainable[n])]
    assert len(moved) == len(trainable)


@pytest.mark.parametrize("name", ["lora", "qlora", "adapters", "full"])
def test_first_forward_equals_base(name, tiny_model_dir):
    """LoRA's B and the adapters' up-projection start at zero: the wrapped model is the base model."""
    method = get_method(name)
    base = load_base(tiny_model_dir, name)
    inputs = batch()
    with torch.no_grad():
        expected = base(**inputs).logits
    model = method.apply(copy.deepcopy(base) if name != "qlora" else load_base(tiny_model_dir, name), method_config(name))
    torch.testing.assert_close(logits_of(method, model, inputs), expected, rtol=0, atol=1e-6)


def test_full_freezing_options_freeze_embeddings_and_first_layers(tiny_model_dir):
    method = get_method("full")
    config = MethodConfig.model_validate({"name": "full", "full": {"freeze_embeddings": True, "freeze_first_layers": 1}})
    model = method.apply(load_base(tiny_model_dir, "full"), config)
    embedding = model.get_input_embeddings().weight
    layer0 = sum(p.numel() for p in model.model.layers[0].parameters())
    assert not embedding.requires_grad and model.lm_head.weight is embedding  # the tied head stays frozen too
    total = sum(p.numel() for p in model.parameters())
    assert method.trainable_parameter_count(model) == total - embedding.numel() - layer0
    too_many = MethodConfig.model_validate({"name": "full", "full": {"freeze_first_layers": 5}})
    with pytest.raises(ValueError, match="freeze_first_layers=5"):
        method.apply(load_base(tiny_model_dir, "full"), too_many)


def test_prompt_learning_refuses_packing_and_prefix_refuses_checkpointing(tiny_model_dir):
    assert not get_method("prefix").supports_packing and not get_method("prompt").supports_packing
    assert all(get_method(n).supports_packing for n in ("full", "lora", "qlora", "adapters"))
    method, model = applied(tiny_model_dir, "prefix")
    with pytest.raises(ValueError, match="gradient checkpointing is not supported"):
        method.enable_gradient_checkpointing(model)


def test_prompt_align_logits_drops_virtual_positions(tiny_model_dir):
    method, model = applied(tiny_model_dir, "prompt")
    inputs = batch(length=7)
    raw = model(**inputs).logits
    assert raw.shape[1] == 7 + 4
    aligned = method.align_logits(raw, inputs["input_ids"])
    assert aligned.shape[1] == 7 and torch.equal(aligned, raw[:, 4:])


def test_prompt_init_from_text_copies_the_text_embeddings(tiny_model_dir):
    method = get_method("prompt")
    config = MethodConfig.model_validate(
        {"name": "prompt", "prompt": {"num_virtual_tokens": 4, "init": "text", "init_text": "abcd"}}
    )
    model = method.apply(load_base(tiny_model_dir, "prompt"), config)
    soft = model.prompt_encoder["default"].embedding.weight
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("abcd", add_special_tokens=False)["input_ids"]
    expected = model.get_base_model().get_input_embeddings().weight[ids]
    torch.testing.assert_close(soft.detach(), expected.detach())
    with pytest.raises(ValueError, match="init_text"):
        method.apply(load_base(tiny_model_dir, "prompt"), MethodConfig.model_validate(
            {"name": "prompt", "prompt": {"init": "text"}}))


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_adapter_placement_semantics_against_a_plain_reference(placement, tiny_model_dir):
    """serial: y = f(x) + A(f(x)); parallel: y = f(x) + s*A(x) — checked on one layer's mlp by hand."""
    method = get_method("adapters")
    config = MethodConfig.model_validate(
        {"name": "adapters", "adapters": {"reduction_factor": 4, "placement": placement, "scaling": 2.0}}
    )
    model = method.apply(load_base(tiny_model_dir, "adapters"), config)
    perturb_trainable(model, scale=0.2)
    mlp = model.model.layers[0].mlp
    adapter = mlp.bottleneck_adapters["default"]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        f = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        inner = f if placement == "serial" else x
        expected = f + 2.0 * adapter.up(torch.relu(adapter.down(inner)))
        torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)
        assert (mlp(x) - f).abs().max() > 1e-3  # the adapter does contribute


def test_adapters_work_on_qwen2(tiny_qwen_dir):
    method, model = applied(tiny_qwen_dir, "adapters")
    assert method.trainable_parameter_count(model) == expected_count("adapters", model)
    loss = loss_of(method, model, batch())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_prefix_projection_count_matches_peft_and_the_planner(tiny_model_dir):
    """With the reparameterisation MLP: n*kv + (kv*h + h) + (h*2*L*kv + 2*L*kv), kv = 2 heads x 16 = 32."""
    from tunesmith.models.facts import model_facts
    from tunesmith.plan.counts import trainable_params

    config = MethodConfig.model_validate(
        {"name": "prefix", "prefix": {"num_virtual_tokens": 4, "projection": True, "projection_hidden": 16}}
    )
    model = get_method("prefix").apply(load_base(tiny_model_dir, "prefix"), config)
    expected = 4 * 32 + (32 * 16 + 16) + (16 * 2 * 2 * 32 + 2 * 2 * 32)
    assert model.get_nb_trainable_parameters()[0] == expected
    assert trainable_params(model_facts(str(tiny_model_dir)), config).trainable_params == expected


@pytest.mark.parametrize("name", ["adapters", "prompt"])
def test_gradient_checkpointing_gives_the_same_gradients(name, tiny_model_dir):
    """The adapters' forward hooks and the soft prompt survive activation recomputation: same grads, fp32."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same initialisation of the adapter's down-projection / the soft prompt
        method, model = applied(tiny_model_dir, name)
        perturb_trainable(model)
        if checkpointing:
            method.enable_gradient_checkpointing(model)
        model.train()
        loss_of(method, model, batch()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads[0].values())
