"""Decision step and hyperparameter rules (FIELD.md), one fact per assertion."""

from __future__ import annotations

import pytest

from tunesmith.plan.advice import decide, hyperparameters, learning_rate_range, size_band


@pytest.mark.parametrize(
    "kwargs,choice",
    [
        (dict(examples=8000, knowledge_changes_often=True), "rag"),
        (dict(examples=8000, needs_citations=True), "rag"),
        (dict(examples=49), "few-shot prompting"),
        (dict(examples=8000, prompting_good_enough=True), "prompting"),
        (dict(examples=8000, base_too_weak=True), "larger base model"),
        (dict(examples=50), "fine-tune"),
    ],
)
def test_decision_step(kwargs, choice):
    decision = decide(**kwargs)
    assert decision.choice == choice
    assert decision.fine_tune == (choice == "fine-tune")
    assert decision.reasons and all(isinstance(r, str) and r for r in decision.reasons)


def test_decision_order_rag_before_few_shot():
    assert decide(examples=10, needs_citations=True).choice == "rag"


@pytest.mark.parametrize(
    "params,band,full_range",
    [
        (134_515_008, "<1B", (1e-5, 5e-5)),
        (8_030_261_248, "1-10B", (5e-6, 2e-5)),
        (70_553_706_496, "10-70B", (1e-6, 1e-5)),  # a "70B" model is in the 10-70B band
        (405_000_000_000, ">70B", (5e-7, 5e-6)),
    ],
)
def test_learning_rate_by_size(params, band, full_range):
    assert size_band(params) == band
    assert learning_rate_range(params, "full") == full_range
    low, high = learning_rate_range(params, "lora")
    assert low == pytest.approx(full_range[0] * 10) and high == pytest.approx(full_range[1] * 10)
    assert learning_rate_range(params, "prompt")[0] >= 1e-3


@pytest.mark.parametrize("task,rank", [("format", 8), ("style", 8), ("extraction", 16), ("classification", 16), ("domain", 64)])
def test_rank_by_task_and_alpha(task, rank):
    hp = hyperparameters(8_030_261_248, "lora", task, 5000)
    assert hp.rank == rank and hp.alpha == 2 * rank
    assert hp.rank_range[0] <= hp.rank <= hp.rank_range[1]
    assert 1 <= hp.epochs <= 3 and 0.03 <= hp.warmup_ratio <= 0.10
    assert hp.learning_rate_range[0] <= hp.learning_rate <= hp.learning_rate_range[1]


def test_full_has_no_rank_and_lower_lr():
    full = hyperparameters(8_030_261_248, "full", "instruction", 20000)
    lora = hyperparameters(8_030_261_248, "lora", "instruction", 20000)
    assert full.rank is None and full.alpha is None
    assert lora.learning_rate == pytest.approx(10 * full.learning_rate, rel=0.5)


def test_data_advice_by_task():
    few = hyperparameters(134_515_008, "lora", "instruction", 1000)
    assert few.examples_typical == (5000, 50000) and "below" in few.data_note and few.epochs == 3
    many = hyperparameters(134_515_008, "lora", "format", 800)
    assert many.examples_typical == (100, 500) and many.epochs == 1


def test_unknown_task_names_flag():
    with pytest.raises(ValueError, match="--task"):
        hyperparameters(1, "lora", "poetry", 10)
