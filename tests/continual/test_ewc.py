"""EWC: penalty value, zero at theta*, gradient (gradcheck, float64), Fisher storage and estimation (train/ewc.py)."""

from __future__ import annotations

import pytest
import torch

from tunesmith.train.ewc import EwcError, EwcPenalty, EwcState, EwcTerm, estimate_fisher, ewc_penalty, trainable_values


def _term(seed: int, shapes: dict[str, tuple[int, ...]], dtype=torch.float64) -> EwcTerm:
    g = torch.Generator().manual_seed(seed)
    return EwcTerm({n: torch.rand(s, generator=g, dtype=dtype) for n, s in shapes.items()},
                   {n: torch.randn(s, generator=g, dtype=dtype) for n, s in shapes.items()}, f"task{seed}")


SHAPES = {"a": (3, 2), "b": (4,)}


def test_penalty_equals_hand_computation():
    term = _term(0, SHAPES)
    theta = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64),
             "b": torch.tensor([0.5, -0.5, 1.5, 0.0], dtype=torch.float64)}
    lam = 0.7
    by_hand = 0.0
    for name in SHAPES:
        f = term.fisher[name].flatten().tolist()
        t = theta[name].flatten().tolist()
        a = term.anchor[name].flatten().tolist()
        by_hand += sum(fi * (ti - ai) ** 2 for fi, ti, ai in zip(f, t, a, strict=True))
    by_hand *= lam / 2
    assert float(ewc_penalty(theta, [term], lam)) == pytest.approx(by_hand, rel=1e-12)
    # two terms (sum mode) add
    other = _term(1, SHAPES)
    both = float(ewc_penalty(theta, [term, other], lam))
    assert both == pytest.approx(by_hand + float(ewc_penalty(theta, [other], lam)), rel=1e-12)


def test_penalty_is_zero_at_anchor_and_positive_elsewhere():
    term = _term(2, SHAPES)
    at_anchor = {n: v.clone() for n, v in term.anchor.items()}
    assert float(ewc_penalty(at_anchor, [term], 3.0)) == 0.0
    moved = {n: v + 0.1 for n, v in at_anchor.items()}
    assert float(ewc_penalty(moved, [term], 3.0)) > 0


def test_penalty_gradient_gradcheck():
    """Analytic d/dtheta = lam * F * (theta - theta*) checked by finite differences in float64."""
    term = _term(3, SHAPES)
    names = list(SHAPES)

    def f(*tensors):
        return ewc_penalty(dict(zip(names, tensors, strict=True)), [term], 1.3)

    inputs = tuple(torch.randn(SHAPES[n], dtype=torch.float64, requires_grad=True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)
    grads = torch.autograd.grad(f(*inputs), inputs)
    for name, x, g in zip(names, inputs, grads, strict=True):
        torch.testing.assert_close(g, 1.3 * term.fisher[name] * (x.detach() - term.anchor[name]))


def test_fisher_reloads_bit_identical(tmp_path):
    first, second = _term(4, SHAPES, torch.float32), _term(5, SHAPES, torch.float32)
    state = EwcState(online=False).accumulate(first.fisher, first.anchor, "a", 16)
    state = state.accumulate(second.fisher, second.anchor, "b", 16)
    state.save(tmp_path / "ewc.safetensors")
    again = EwcState.load(tmp_path / "ewc.safetensors")
    assert (again.examples, again.online, again.gamma) == (16, False, 1.0)
    assert [t.task for t in again.terms] == ["a", "b"]
    for mine, theirs in zip(state.terms, again.terms, strict=True):
        for name in SHAPES:
            assert torch.equal(mine.fisher[name], theirs.fisher[name])
            assert torch.equal(mine.anchor[name], theirs.anchor[name])
            assert mine.fisher[name].numpy().tobytes() == theirs.fisher[name].numpy().tobytes()
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(EwcError, match="no stored Fisher"):
        EwcState.load(tmp_path / "missing.safetensors")


def test_online_accumulation_sums_fishers_and_moves_anchor():
    one, two = _term(6, SHAPES), _term(7, SHAPES)
    state = EwcState(online=True, gamma=0.5).accumulate(one.fisher, one.anchor, "a", 8)
    state = state.accumulate(two.fisher, two.anchor, "b", 8)
    (term,) = state.terms
    for name in SHAPES:
        torch.testing.assert_close(term.fisher[name], (0.5 * one.fisher[name] + two.fisher[name]).float())
        torch.testing.assert_close(term.anchor[name], two.anchor[name].float())
    assert term.task == "a+b"


def test_estimate_fisher_matches_per_example_gradients(tiny_model_and_tokenizer):
    """The estimate equals mean_n (grad of example n's mean token loss)^2, computed here independently."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.data.formats import Conversation
    from tunesmith.data.render import render_dataset
    from tunesmith.methods.registry import get_method

    model, tokenizer = tiny_model_and_tokenizer
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    conversations = [Conversation([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}])
                     for i in range(4)]
    examples, _ = render_dataset(tokenizer, conversations, 64, "error")
    method = get_method("lora")
    fisher, used = estimate_fisher(model, method, examples, tokenizer.pad_token_id, max_examples=3)
    assert used == 3
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for example in examples[:3]:
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor([example.labels])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = labels[0, 1:]
        keep = targets != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        for (name, _), g in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads, strict=True):
            expected[name] += g ** 2 / 3
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())

    # the penalty plugs into the loop's loss terms and refuses a model that does not train the stored names
    state = EwcState().accumulate(fisher, trainable_values(model), "t", used)
    penalty = EwcPenalty(state, lam=10.0)
    penalty.check(model)
    name, value = penalty(model)
    assert name == "ewc_penalty" and float(value.detach()) == 0.0
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(EwcError, match="does not train"):
        penalty.check(model)
