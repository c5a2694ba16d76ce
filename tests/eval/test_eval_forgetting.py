"""Forgetting measures on tiny models: KL is 0 for identical models and > 0 for a perturbed one; retention of
the base model against itself is exactly 1; the callback caches the base and stops on low retention."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tunesmith.eval import forgetting as fg
from tunesmith.eval.lm_eval_adapter import LmEvalUnavailable, lm_eval_available, run_lm_eval
from tunesmith.train.callbacks import TrainState

PROMPTS = fg.load_general_prompts(6)


@pytest.fixture(scope="module")
def pair():
    from tunesmith.models.tiny import build_tiny_model

    model, tokenizer = build_tiny_model("llama")
    perturbed = copy.deepcopy(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, perturbed, tokenizer


def test_shipped_data_sizes_and_shapes():
    prompts = fg.load_general_prompts()
    probes = fg.load_probes()
    assert len(prompts) >= 250 and len(set(prompts)) == len(prompts)
    assert len(probes) >= 200
    assert {p["category"] for p in probes} >= {"facts", "arithmetic", "common_sense", "instructions"}
    for probe in probes:
        if probe["kind"] == "mc":
            assert 0 <= probe["answer"] < len(probe["choices"])
        else:
            assert probe["answers"]
    # arithmetic items are right: "What is a plus b?" etc.
    for probe in (p for p in probes if p["category"] == "arithmetic"):
        a, op, b = probe["question"][len("What is "):-1].split()
        value = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
        answer = probe["choices"][probe["answer"]] if probe["kind"] == "mc" else probe["answers"][0]
        assert answer == str(value)
    assert len(fg.load_general_text().split()) > 1500


def test_kl_zero_for_identical_positive_for_perturbed(pair):
    model, perturbed, tokenizer = pair
    same = fg.kl_drift(model, tokenizer, PROMPTS, base_model=copy.deepcopy(model), batch_size=4)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["positions"] > 6 * 20
    moved = fg.kl_drift(perturbed, tokenizer, PROMPTS, base_model=model, batch_size=4)
    assert moved["kl"] > 1e-4
    # the cached (top-k + rest bucket) KL is 0 for the base itself and a lower bound of the exact KL
    reference = fg.reference_distributions(model, tokenizer, PROMPTS, top_k=16, batch_size=4)
    assert fg.kl_from_reference(model, tokenizer, reference)["kl"] == pytest.approx(0.0, abs=1e-6)
    coarse = fg.kl_from_reference(perturbed, tokenizer, reference)["kl"]
    assert 0 < coarse <= moved["kl"] + 1e-6
    # with k = vocabulary size the cached KL is exact
    full = fg.reference_distributions(model, tokenizer, PROMPTS, top_k=10_000, batch_size=4)
    assert fg.kl_from_reference(perturbed, tokenizer, full)["kl"] == pytest.approx(moved["kl"], rel=1e-4)


def test_peft_base_view_and_retention_of_base_is_one(pair):
    from peft import LoraConfig, get_peft_model

    model, _, tokenizer = pair
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # make the adapter do something: B starts at zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    probes = fg.load_probes(8, kinds=("mc",))
    base = fg.probe_accuracy(model, tokenizer, probes, batch_size=8)
    with fg.base_view(peft_model) as disabled:
        assert fg.probe_accuracy(disabled, tokenizer, probes, batch_size=8)["items"] == base["items"]
    assert fg.kl_drift(peft_model, tokenizer, PROMPTS[:3])["kl"] > 1e-4  # base side = adapter disabled
    assert base["n"] == 8 and base["mc_accuracy"] == base["accuracy"]
    assert fg.retention(0.5, 0.0) is None and fg.retention(0.3, 0.6) == pytest.approx(0.5)


def test_measure_forgetting_of_base_against_itself(pair):
    model, _, tokenizer = pair
    result = fg.measure_forgetting(model, tokenizer, base_model=model, max_prompts=3, max_probes=10,
                                   max_text_tokens=600, log=lambda *_: None)
    assert result["kl_drift"] == pytest.approx(0.0, abs=1e-6)
    assert result["probe_accuracy"]["base"] == result["probe_accuracy"]["tuned"] > 0
    assert result["probe_retention"] == 1.0
    assert result["perplexity_ratio"] == pytest.approx(1.0)
    kinds = {item["kind"] for item in result["probes"]["tuned"]["items"]}
    assert kinds == {"mc", "short"} and result["probes"]["tuned"]["n"] == 10


def test_choice_scores_hand_checked(pair):
    model, _, tokenizer = pair
    probe = {"id": "x", "kind": "mc", "category": "facts", "question": "Q?", "choices": ["ab", "c"], "answer": 0}
    scores = fg.choice_scores(model, tokenizer, [probe])[0]
    # recompute by hand for choice "ab": log p(a | prompt) + log p(b | prompt a), divided by 2 characters
    from tunesmith.eval.generate import render_prompts

    prompt = render_prompts(tokenizer, [[{"role": "user", "content": "Q?"}]])[0]
    ids = prompt + tokenizer("ab", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = (lp[len(prompt) - 1, ids[len(prompt)]] + lp[len(prompt), ids[len(prompt) + 1]]).item() / 2
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_short_answer_matching():
    assert fg.short_answer_correct("Paris", ["Paris"]) == (True, True)
    assert fg.short_answer_correct("The capital of France is Paris.\nMore text", ["Paris"]) == (False, True)
    assert fg.short_answer_correct("Parisian food", ["Paris"]) == (False, False)
    assert fg.short_answer_correct("7 + 5 = 12", ["12"]) == (False, True)
    assert fg.short_answer_correct("112", ["12"]) == (False, False)


def test_perplexity_matches_loss(pair):
    model, _, tokenizer = pair
    text = "The river rose in spring and fell in summer."
    result = fg.perplexity(model, tokenizer, text, window=1000)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result["tokens"] == ids.shape[1] - 1


def test_callback_caches_base_and_stops_on_low_retention(pair):
    model, perturbed, tokenizer = pair
    callback = fg.ForgettingCallback(max_prompts=4, max_probes=8, retention_threshold=0.999, top_k=32)
    state = TrainState(step=0)
    callback.on_train_begin(state, model, tokenizer)
    same = callback.on_evaluate(state, model, tokenizer)
    assert same["kl_drift"] == pytest.approx(0.0, abs=1e-6)
    assert same["probe_accuracy"] == callback.base_probe_accuracy
    if callback.base_probe_accuracy:
        assert same["probe_retention"] == 1.0 and not state.should_stop
    # force a retention drop: the base scored 1.0 on every probe, the tuned model scores what it scores (< 1)
    callback.base_probe_accuracy = 2.0
    state.step = 7
    moved = callback.on_evaluate(state, perturbed, tokenizer)
    assert moved["kl_drift"] > 1e-4 and moved["probe_retention"] <= 0.5
    assert state.should_stop and "step 7" in state.stop_reason and "retention_threshold" in state.stop_reason


def test_lm_eval_clear_message(pair):
    model, _, tokenizer = pair
    if lm_eval_available():
        pytest.skip("lm-eval is installed here; the missing-harness message cannot be exercised")
    with pytest.raises(LmEvalUnavailable, match="pip install lm-eval"):
        run_lm_eval(model, tokenizer, ["mmlu", "gsm8k"])


def test_prompt_tuning_positions_and_callback_base(pair):
    from peft import PromptTuningConfig, get_peft_model

    model, _, tokenizer = pair
    prompted = get_peft_model(copy.deepcopy(model), PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    plain = fg.kl_drift(model, tokenizer, PROMPTS[:2], base_model=model)
    drift = fg.kl_drift(prompted, tokenizer, PROMPTS[:2])  # base = adapter disabled = no virtual tokens
    assert drift["positions"] == plain["positions"]  # the virtual tokens' logits are not counted
    assert drift["kl"] > 1e-5
    callback = fg.ForgettingCallback(max_prompts=2, max_probes=4)
    state = TrainState()
    callback.on_train_begin(state, prompted, tokenizer)  # caches the model without its random virtual tokens
    assert callback.on_evaluate(state, prompted, tokenizer)["kl_drift"] == pytest.approx(drift["kl"], rel=0.05)
