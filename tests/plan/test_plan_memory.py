"""Memory terms: each checked against an independent truth (bitsandbytes' own tensors, autograd's saved tensors,
byte arithmetic done by hand), plus the field's seed figures for a 70B model."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config import MethodConfig
from tunesmith.methods.qlora import constant_bits_per_param as nf4_constant_bits_per_param
from tunesmith.models.facts import facts_from_config, model_facts
from tunesmith.plan.activations import activation_estimate
from tunesmith.plan.memory import GiB, TrainSetup, estimate_memory, gpus_needed

LLAMA70 = "meta-llama/Llama-3.1-70B"


def test_nf4_constant_bits_match_bitsandbytes_tensors():
    bnb = pytest.importorskip("bitsandbytes")
    n = 64 * 256 * 4  # whole blocks at both levels
    assert nf4_constant_bits_per_param(False) == 0.5
    assert nf4_constant_bits_per_param(True) == 8 / 64 + 32 / (64 * 256) == 0.126953125
    for double in (False, True):
        p = bnb.nn.Params4bit(torch.randn(n // 64, 64), requires_grad=False, quant_type="nf4", compress_statistics=double)
        p = p._quantize("cpu")
        state = p.quant_state
        constants = state.absmax.numel() * state.absmax.element_size()
        if double:
            constants += state.state2.absmax.numel() * state.state2.absmax.element_size()
        assert p.numel() * p.element_size() * 8 / n == 4  # packed NF4: half a byte per weight
        assert constants * 8 / n == nf4_constant_bits_per_param(double)


def test_terms_by_hand_lora_8b():
    facts = model_facts("meta-llama/Llama-3.1-8B")
    method = MethodConfig(name="lora", lora={"r": 16, "target_modules": ["q_proj", "v_proj"]})
    est = estimate_memory(facts, method, TrainSetup(batch_size=1, seq_len=512))
    n = 6_815_744  # 32 layers x 16 x ((4096+4096) + (4096+1024))
    assert est.trainable_params == n
    assert est.weights == 8_030_261_248 * 2  # bf16 base
    assert est.trainable == est.gradients == n * 4  # fp32 adapters
    assert est.optimizer == n * 8
    assert est.master_weights == 0
    eight_bit = estimate_memory(facts, method, TrainSetup(batch_size=1, seq_len=512, optimizer="paged_adamw_8bit"))
    assert eight_bit.optimizer == n * 2
    assert est.total == est.weights + est.trainable + est.optimizer + est.overhead + max(est.activations, est.gradients)


def test_full_master_weights_and_frozen_embeddings():
    facts = model_facts("HuggingFaceTB/SmolLM2-135M-Instruct")
    setup = TrainSetup(batch_size=1, seq_len=128, master_weights=True)
    est = estimate_memory(facts, MethodConfig(name="full"), setup)
    assert est.trainable == est.gradients == 134_515_008 * 2 and est.master_weights == 134_515_008 * 4
    assert est.weights == 0
    frozen = estimate_memory(facts, MethodConfig(name="full", full={"freeze_embeddings": True}), setup)
    assert frozen.weights == 49152 * 576 * 2  # the tied embedding stays, frozen, in bf16
    assert frozen.trainable_params == 134_515_008 - 49152 * 576


def test_qlora_weights_by_hand_70b():
    facts = model_facts(LLAMA70)
    est = estimate_memory(facts, MethodConfig(name="qlora"), TrainSetup(batch_size=1, seq_len=1024, gradient_checkpointing=True))
    per_layer_linear = 8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672
    quantized = 80 * per_layer_linear
    other = 70_553_706_496 - quantized  # embeddings, lm_head, norms in bf16
    assert est.weights == int(quantized * (4 + 0.126953125) / 8 + other * 2)
    assert est.quant_constant_bits_per_param == 0.126953125
    no_dq = estimate_memory(facts, MethodConfig(name="qlora", quant={"double_quant": False}), TrainSetup(batch_size=1, seq_len=1024))
    assert no_dq.weights - est.weights == int(quantized * 4.5 / 8) - int(quantized * 4.126953125 / 8)


def test_seed_figures_70b():
    """FIELD seed: full FT in 16-bit ~600-800 GB plus activations, LoRA ~140 GB, QLoRA ~36-48 GB (GiB here),
    at micro-batch 1 x 2048 with gradient checkpointing."""
    facts = model_facts(LLAMA70)
    setup = TrainSetup(batch_size=1, seq_len=2048, gradient_checkpointing=True)
    full = estimate_memory(facts, MethodConfig(name="full"), setup)
    states = full.weights + full.trainable + full.gradients + full.optimizer
    assert 600 * GiB <= states <= 800 * GiB
    assert full.total >= states
    lora = estimate_memory(facts, MethodConfig(name="lora"), setup)
    assert 125 * GiB <= lora.total <= 160 * GiB
    qlora = estimate_memory(facts, MethodConfig(name="qlora"), setup)
    assert 36 * GiB <= qlora.total <= 48 * GiB


def test_gpus_needed_sharding():
    facts = model_facts(LLAMA70)
    est = estimate_memory(facts, MethodConfig(name="full"), TrainSetup(batch_size=1, seq_len=2048, gradient_checkpointing=True))
    assert gpus_needed(est, 80 * GiB, sharded=False) is None  # no single GPU holds 700+ GiB
    n = gpus_needed(est, 80 * GiB, sharded=True)
    shardable = est.weights + est.trainable + est.gradients + est.optimizer
    room = 80 * GiB * 0.92 - est.activations - est.overhead
    assert n == -(-shardable // room) and 10 <= n <= 14
    qlora = estimate_memory(facts, MethodConfig(name="qlora"), TrainSetup(batch_size=1, seq_len=2048, gradient_checkpointing=True))
    assert gpus_needed(qlora, 80 * GiB, sharded=False) == 1
    assert gpus_needed(qlora, 24 * GiB, sharded=False) is None


def _count_saved(model, forward) -> int:
    """Bytes of unique storages autograd saves while `forward()` runs, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def _saved_bytes(model, batch, seq, vocab) -> int:
    """Bytes of unique storages autograd saves in one forward pass, parameters excluded."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return _count_saved(model, lambda: model(input_ids=ids, labels=ids))


def _widths_model(vocab: int = 200):
    """A 6-layer llama whose hidden, heads*head_dim, kv width and intermediate all differ, and its facts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model("llama", hidden_size=48, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, num_hidden_layers=6, vocab_size=vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    return model, facts_from_config(model.config.to_dict())


CASES = [
    ("full", {}, False),
    ("lora", {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}, False),
    ("lora", {"lora": {"r": 4, "target_modules": "all-linear", "dropout": 0.0}}, False),
    ("lora", {"lora": {"r": 8, "target_modules": "all-linear"}}, False),
    ("prompt", {"prompt": {"num_virtual_tokens": 4}}, False),
    ("prefix", {"prefix": {"num_virtual_tokens": 4}}, False),
    ("adapters", {"adapters": {"reduction_factor": 4}}, False),
    ("full", {}, True),
    ("lora", {"lora": {"r": 8, "target_modules": "all-linear"}}, True),
]


@pytest.mark.parametrize("name,options,ckpt", CASES, ids=lambda v: str(v)[:40])
def test_activation_formula_matches_saved_tensors(name, options, ckpt):
    """Widths chosen so that hidden, heads*head_dim, kv width and intermediate all differ (6 layers, 2 x 24).
    Bottleneck adapters come from tunesmith's own method (skipped until it is registered)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    model, facts = _widths_model()
    method = MethodConfig.model_validate({"name": name, **options})
    if name == "lora":  # the method's own apply: peft + its CPU dropout (methods/dropout.py)
        from tunesmith.methods.registry import get_method

        model = get_method("lora").apply(model, method)
    elif name == "prompt":
        model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    elif name == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    elif name == "adapters":
        registry = pytest.importorskip("tunesmith.methods.registry")
        try:
            adapters = registry.get_method("adapters")
        except Exception as exc:  # the method may not be registered in this checkout
            pytest.skip(f"adapters method unavailable: {exc}")
        model = adapters.apply(model, method)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    batch, seq = 2, 24
    measured = _saved_bytes(model, batch, seq, 200)
    est = activation_estimate(facts, method, batch, seq, 4, ckpt)
    tokens = batch * est.seq_effective
    predicted = est.saved_bytes + tokens * 200 * 4  # + the saved log-softmax output (part of the logits term)
    assert predicted == pytest.approx(measured, rel=0.08)


def test_checkpointing_cuts_activations():
    facts = model_facts("meta-llama/Llama-3.1-8B")
    method = MethodConfig(name="lora")
    plain = activation_estimate(facts, method, 4, 2048, 2, False)
    ckpt = activation_estimate(facts, method, 4, 2048, 2, True)
    # layer inputs + final norm output + packing's (batch, 1, seq, seq) bf16 block-diagonal mask
    assert ckpt.saved_bytes == 32 * 4 * 2048 * 4096 * 2 + 4 * 2048 * 1 * 4096 * 2 + 4 * 2048 * 2048 * 2
    assert ckpt.peak_bytes < plain.peak_bytes / 3
    # selective logits at every position (the upper bound): saved log-softmax, its gradient, the logits' gradient
    # (3 x fp32) + the gradient cast back to bf16 (2 bytes)
    assert plain.logits_bytes == ckpt.logits_bytes == 4 * 2048 * 128256 * 14
    half = activation_estimate(facts, method, 4, 2048, 2, True, labelled_fraction=0.5)
    assert half.logits_bytes == 2 * 2048 * 128256 * 14
    prompt = activation_estimate(facts, MethodConfig(name="prompt"), 4, 2048, 2, True, labelled_fraction=0.5)
    assert prompt.logits_bytes == 4 * (2048 + 20) * 128256 * 14  # full-logits path: every position, always


def _status_bytes(name: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(name))


@pytest.mark.parametrize("batch", [1, 2])
def test_full_logits_path_holds_three_fp32_copies(batch):
    """The planner's full-logits term in fp32 (3 x 4 bytes per logit) against the peak RSS of the trainer's own loss
    path (prompt tuning: align_logits, then causal_lm_loss_sum) on a frozen head. Each (batch, seq, vocab) buffer is
    >= 100 MiB, which glibc always maps on its own (its mmap threshold is at most 32 MiB), so the peak RSS above the
    start counts the buffers resident at once: measured 2.8-3.0 copies (batch 2 makes a shifted copy in the forward
    pass, beside the logits and the log-softmax output: still 3)."""
    from pathlib import Path

    from tunesmith.methods.registry import get_method
    from tunesmith.train.loop import causal_lm_loss_sum

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    facts = model_facts("HuggingFaceTB/SmolLM2-135M-Instruct")
    seq, virtual = 512, 20
    planned = activation_estimate(facts, MethodConfig(name="prompt", prompt={"num_virtual_tokens": virtual}), batch,
                                  seq, 4, False)
    unit = batch * (seq + virtual) * facts.vocab_size * 4  # one fp32 (batch, seq + virtual, vocab) buffer
    assert planned.seq_effective == seq + virtual and planned.logits_bytes == 3 * unit
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, facts.vocab_size, bias=False).requires_grad_(False)
    hidden = torch.randn(batch, seq + virtual, 64, generator=generator, requires_grad=True)
    labels = torch.randint(0, facts.vocab_size, (batch, seq), generator=generator)
    labels[:, : seq // 3] = -100
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak RSS starts again from the current RSS
    start = _status_bytes("VmRSS")
    loss, _ = causal_lm_loss_sum(get_method("prompt").align_logits(head(hidden), labels), labels)
    loss.backward()
    copies = (_status_bytes("VmHWM") - start) / unit
    assert abs(copies - 3) <= 0.3, copies


AUTOCAST_CASES = [
    ("full", {}, False),
    ("lora", {"lora": {"r": 8, "target_modules": "all-linear"}}, False),
    ("lora", {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}}, False),
    ("prompt", {"prompt": {"num_virtual_tokens": 4}}, False),
    ("prefix", {"prefix": {"num_virtual_tokens": 4}}, False),
    ("adapters", {"adapters": {"reduction_factor": 4}}, False),
    ("full", {}, True),
    ("lora", {"lora": {"r": 8, "target_modules": "all-linear"}}, True),
]


SEGMENT_CASES = [(name, options, ckpt, segments) for name, options, ckpt in AUTOCAST_CASES
                 for segments in (False, True) if not (segments and name in ("prompt", "prefix"))]


@pytest.mark.parametrize("name,options,ckpt,segments", SEGMENT_CASES, ids=lambda v: str(v)[:40])
def test_autocast_formula_matches_saved_tensors(name, options, ckpt, segments):
    """fp32 weights under CPU bf16 autocast, as `tunesmith train` runs on CPUs with native bf16: the tensors
    autograd keeps through the trainer's own forward_loss (selective logits, packing's 4-D mask where the method
    packs, or with `segments` per-example attention over rows of two examples, as the trainer runs packed rows on
    CPUs), counted by saved_tensors_hooks (unique storages, parameters excluded, so the 16-bit weight casts count)
    against activation_estimate(autocast=True): saved + weight casts + the saved log-softmax output."""
    import contextlib

    from tunesmith.data.pack import Pack, collate
    from tunesmith.data.render import Example
    from tunesmith.methods.registry import get_method
    from tunesmith.models.attention import segment_attention
    from tunesmith.train.loop import forward_loss

    vocab, batch, seq = 200, 2, 40
    model, facts = _widths_model(vocab)
    method = MethodConfig.model_validate({"name": name, **options})
    owner = get_method(name)
    model = owner.apply(model, method)
    if ckpt:
        owner.enable_gradient_checkpointing(model)
    model.train()
    generator = torch.Generator().manual_seed(0)
    labelled = seq - int(0.7 * seq)
    packs = []
    for _ in range(batch):
        ids = torch.randint(0, vocab, (seq,), generator=generator).tolist()
        if segments:  # two examples per row, each with its labelled tail
            half = seq // 2
            packs.append(Pack([Example(part, [-100] * (half - labelled // 2) + part[half - labelled // 2:])
                               for part in (ids[:half], ids[half:])]))
        else:
            packs.append(Pack([Example(ids, [-100] * (seq - labelled) + ids[seq - labelled:])]))
    if segments:
        inputs = collate(packs, 0, block_mask=False, segments=True)
    else:
        inputs = collate(packs, 0, block_mask=owner.supports_packing)
    with segment_attention(model) if segments else contextlib.nullcontext():
        measured = _count_saved(model, lambda: forward_loss(model, owner, inputs, "bf16", torch.device("cpu")))
    share = (labelled - 1) / seq  # the first label of every example is dropped (pack.collate)
    if segments:
        share = (labelled - 2) / seq
    est = activation_estimate(facts, method, batch, seq, 2, ckpt, labelled_fraction=share, autocast=True,
                              segment_attention=segments, fused_head=owner.selective_logits)
    if owner.selective_logits:  # the chunked head loss (train/head_loss.py): no saved log-softmax, and the head's
        log_softmax = 0         # 16-bit weight cast is made and dropped inside its forward (not kept by autograd)
        head_cast = 2 * 48 * vocab
    else:
        log_softmax = batch * (est.seq_effective - 1) * vocab * 4
        head_cast = 0
    predicted = est.saved_bytes + est.weight_cast_bytes - head_cast + log_softmax
    if ckpt:  # the hooks see the forward pass: not the recomputed layer's mask cast and weight casts (backward)
        predicted -= (0 if segments else batch * seq * seq * (4 + 2)) + 2 * 25344
    assert predicted == pytest.approx(measured, rel=0.08)
    # fp32 weights under autocast keep 16-bit casts of every matmul weight (decoder Linears + head), ckpt: head + 1
    assert est.weight_cast_bytes == 2 * ((48 * 200) + (25344 if ckpt else 6 * 25344))


def test_qlora_autocast_formula_matches_saved_tensors(tmp_path):
    """QLoRA on the CPU under bf16 autocast (bitsandbytes' CPU 4-bit path): LoRA's terms + the MLP kept in fp32
    (4-bit layers return their input's dtype), and only the head's weight cast."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.config import ModelConfig
    from tunesmith.data.pack import Pack, collate
    from tunesmith.data.render import Example
    from tunesmith.methods.registry import get_method
    from tunesmith.models.load import load_model
    from tunesmith.train.loop import forward_loss

    vocab, batch, seq = 256, 2, 40
    hf = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=24, num_hidden_layers=4, vocab_size=vocab, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf, dtype=torch.float32).save_pretrained(tmp_path)
    method = MethodConfig.model_validate({"name": "qlora", "lora": {"r": 8}})
    owner = get_method("qlora")
    model = owner.apply(load_model(ModelConfig(name_or_path=str(tmp_path), dtype="float32"), log=lambda *a: None,
                                   **owner.base_load_kwargs(method)), method)
    model.train()
    facts = facts_from_config(hf.to_dict())
    generator = torch.Generator().manual_seed(0)
    labelled = seq - int(0.7 * seq)
    packs = [Pack([Example(ids, [-100] * (seq - labelled) + ids[seq - labelled:])])
             for ids in (torch.randint(0, vocab, (seq,), generator=generator).tolist() for _ in range(batch))]
    inputs = collate(packs, 0, block_mask=True)
    measured = _count_saved(model, lambda: forward_loss(model, owner, inputs, "bf16", torch.device("cpu")))
    share = (labelled - 1) / seq
    est = activation_estimate(facts, method, batch, seq, 2, False, labelled_fraction=share, autocast=True,
                              fused_head=True)
    assert est.weight_cast_bytes == 2 * vocab * 64  # the (tied) head only
    # the chunked head loss (train/head_loss.py) keeps neither the log-softmax nor the head's cast for autograd
    predicted = est.saved_bytes
    assert predicted == pytest.approx(measured, rel=0.08)


def test_cpu_plans_follow_the_trainers_precision(monkeypatch):
    """A CPU plan plans what `tunesmith train` does on this CPU: bf16 autocast on fp32 weights where bf16 is native
    (fewer activation bytes, + the weight casts), fp32 elsewhere; GPU plans are unchanged (bf16 weights)."""
    from tunesmith.models import hardware
    from tunesmith.plan.solve import Budget, Knobs, Start, evaluate, train_dtypes

    facts = model_facts("HuggingFaceTB/SmolLM2-135M-Instruct")
    knobs = Knobs(False, 1, 1, "adamw", 512, "single", 1)
    peaks = {}
    for native in (True, False):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        assert train_dtypes("cpu") == ("fp32", "bf16" if native else "fp32")
        assert train_dtypes("cpu", precision="fp32") == ("fp32", "fp32")
        assert train_dtypes("cuda") == ("bf16", "bf16")
        est, peak, _ = evaluate(facts, MethodConfig(name="lora"), knobs, Budget("cpu", 64 * GiB), Start(seq_len=512))
        peaks[native] = est
    casts = 2 * (49152 * 576 + sum(m.weight_params for m in facts.decoder_linears()))
    autocast = activation_estimate(facts, MethodConfig(name="lora"), 1, 512, 2, False, autocast=True)
    assert autocast.weight_cast_bytes == casts
    # mixed 16/32-bit layer activations take less than fp32 ones; the casts come on top
    assert peaks[True].activations - casts < peaks[False].activations
    assert peaks[True].activations > casts


def test_cpu_total_adds_heap_retention_gpu_does_not():
    """CPU budgets are whole-process RSS under glibc malloc: + ALLOCATOR_RETENTION x the forward pass's layer
    allocations, and the optimizer-step branch keeps the saved activations' heap; GPU plans add neither."""
    from tunesmith.plan.memory import ALLOCATOR_RETENTION

    facts = model_facts("HuggingFaceTB/SmolLM2-135M-Instruct")
    method = MethodConfig(name="full")
    cpu = TrainSetup(batch_size=1, seq_len=256, weight_dtype="fp32", compute_dtype="bf16", device="cpu")
    est = estimate_memory(facts, method, cpu)
    # CPU training attends packed rows per example (models/attention.py): no 4-D mask, key/value heads not repeated;
    # head and loss run in chunks (train/head_loss.py)
    act = activation_estimate(facts, method, 1, 256, 2, False, autocast=True, segment_attention=True, fused_head=True)
    assert act.forward_layer_bytes == 30 * 256 * get_method_bytes(facts, method, mask_4d=False)
    assert est.allocator_retention == int(ALLOCATOR_RETENTION["cpu"] * act.forward_layer_bytes) > 0
    persistent = est.weights + est.trainable + est.optimizer + est.overhead
    branch = max(est.activations + est.head_gradient, est.gradients + est.step_temporaries + act.saved_bytes)
    assert est.total == persistent + branch + est.allocator_retention
    gpu = estimate_memory(facts, method, TrainSetup(batch_size=1, seq_len=256))
    assert gpu.allocator_retention == 0
    assert gpu.total == gpu.weights + gpu.trainable + gpu.optimizer + gpu.overhead + max(
        gpu.activations + gpu.head_gradient, gpu.gradients + gpu.step_temporaries)
    lora = MethodConfig(name="lora")
    ckpt = dict(batch_size=1, seq_len=256, gradient_checkpointing=True)
    assert any("varies from run to run" in n for n in estimate_memory(facts, lora, TrainSetup(**ckpt, device="cpu")).notes)
    assert not any("varies" in n for n in estimate_memory(facts, lora, TrainSetup(**ckpt)).notes)  # GPU: no such note


def get_method_bytes(facts, method, mask_4d: bool = True) -> float:
    from tunesmith.methods.registry import get_method

    return get_method(method.name).layer_autocast_bytes(facts, method, mask_4d=mask_4d)


def test_cpu_fp32_step_branch_keeps_no_activation_heap_and_shares_by_method_and_checkpointing():
    """fp32 compute on a CPU (no native bf16): the optimizer-step branch is gradients + AdamW's scratch only (the
    fit set's fp32 full fine-tuning peaks match without the freed activation heap); fp32 runs without checkpointing
    take their method's own fitted share of the forward pass's layer allocations (the pooled share for a method that
    states none), checkpointed runs one share. Under autocast none of this changes."""
    from tunesmith.methods.registry import all_methods, get_method, register_method, unregister_method
    from tunesmith.plan.memory import (
        ALLOCATOR_RETENTION,
        CPU_FP32_CHECKPOINT_RETENTION,
        CPU_FP32_RETENTION,
        retention_share,
    )

    facts = model_facts("HuggingFaceTB/SmolLM2-135M-Instruct")
    full = MethodConfig(name="full")
    fp32 = dict(weight_dtype="fp32", compute_dtype="fp32", device="cpu")
    est = estimate_memory(facts, full, TrainSetup(batch_size=1, seq_len=256, **fp32))
    act = activation_estimate(facts, full, 1, 256, 4, False, segment_attention=True, fused_head=True)
    share = get_method("full").cpu_fp32_heap_share
    assert est.allocator_retention == int(share * act.forward_layer_bytes) > 0
    persistent = est.weights + est.trainable + est.optimizer + est.overhead
    step = est.gradients + est.step_temporaries
    assert step > est.activations + est.head_gradient  # this shape peaks at the step: the branch that changed
    assert est.total == persistent + step + est.allocator_retention
    # every built-in method states its own fp32 share; they differ (adapters keep the most heap, LoRA little)
    shares = {m.name: m.cpu_fp32_heap_share for m in all_methods()}
    assert all(0 < v < 1 for v in shares.values()), shares
    assert shares["adapters"] > 2 * shares["lora"]
    # fp32 with checkpointing: one share for all; autocast keeps the Xeon's, whatever the method
    assert retention_share("cpu", False, True, 0.9) == CPU_FP32_CHECKPOINT_RETENTION != ALLOCATOR_RETENTION["cpu"]
    assert retention_share("cpu", False, False, 0.9) == 0.9
    assert retention_share("cpu", False, False) == CPU_FP32_RETENTION != ALLOCATOR_RETENTION["cpu"]
    assert retention_share("cpu", True, True, 0.9) == retention_share("cpu", True, False, 0.9) == ALLOCATOR_RETENTION["cpu"]
    assert retention_share("cuda", False, True) == retention_share("cuda", False, False, 0.9) == 0.0
    lora = MethodConfig(name="lora")
    ck = estimate_memory(facts, lora, TrainSetup(batch_size=1, seq_len=256, gradient_checkpointing=True, **fp32))
    ck_act = activation_estimate(facts, lora, 1, 256, 4, True, segment_attention=True, fused_head=True)
    assert ck.allocator_retention == int(CPU_FP32_CHECKPOINT_RETENTION * ck_act.forward_layer_bytes) > 0
    # a method that states no share gets the pooled one
    import copy

    plain = copy.copy(get_method("lora"))
    plain.name, plain.cpu_fp32_heap_share = "lora-pooled-share", None
    register_method(plain)
    try:
        pooled = estimate_memory(facts, MethodConfig(name="lora-pooled-share"), TrainSetup(batch_size=1, seq_len=256, **fp32))
    finally:
        unregister_method("lora-pooled-share")
    lora_act = activation_estimate(facts, lora, 1, 256, 4, False, segment_attention=True, fused_head=True)
    assert pooled.allocator_retention == int(CPU_FP32_RETENTION * lora_act.forward_layer_bytes)
