"""Synthetic loss curves of every class are classified correctly; healthy noise does not read as overfitting.

Curves: exponential decays toward a floor (healthy), a falling train curve with an eval curve that turns up
(overfitting), flat curves (rate too low), a noisy zig-zag without progress (rate too high), a healthy run with a
one-step spike after warm-up (late spike) and during warm-up (still healthy). Noise is Gaussian, relative to the
level, with fixed seeds.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from tunesmith.eval.diagnose import diagnose, diagnose_file, format_diagnosis

STEPS = 300
EVAL_EVERY = 20


def curve(train_fn, eval_fn, seed=0, train_noise=0.03, eval_noise=0.005, warmup=15, spikes=None):
    rng = random.Random(seed)
    records = []
    for step in range(1, STEPS + 1):
        value = train_fn(step) * (1 + rng.gauss(0, train_noise))
        value *= (spikes or {}).get(step, 1.0)
        lr = 2e-4 * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        records.append({"step": step, "train_loss": value, "lr": lr})
        if step % EVAL_EVERY == 0:
            records.append({"step": step, "eval_loss": eval_fn(step) * (1 + rng.gauss(0, eval_noise))})
    return records


def healthy_train(s):
    return 1.0 + 2.0 * math.exp(-s / 80)


def healthy_eval(s):
    return 1.1 + 2.0 * math.exp(-s / 80)


def test_healthy():
    result = diagnose(curve(healthy_train, healthy_eval))
    assert result["diagnosis"] == "healthy"
    assert result["spikes"] == []
    assert result["best_step"] in (280, 300)


def test_overfitting_reports_best_step_and_gap():
    records = curve(lambda s: 0.1 + 2.0 * math.exp(-s / 50), lambda s: 1.0 + 1.5 * math.exp(-s / 30) + 0.002 * s)
    result = diagnose(records)
    assert result["diagnosis"] == "overfitting"
    # d/ds [1.5 e^{-s/30} + 0.002 s] = 0 at s = 30 ln(25) ~ 96.6: the lowest eval is at step 100 (or a neighbour)
    assert result["best_step"] in (80, 100, 120)
    assert result["gap"] > 0.5
    assert any("best eval step" in a for a in result["advice"])


def test_overfitting_with_flat_eval():
    records = curve(lambda s: 2.0 - 0.005 * s, lambda s: 1.9 if s > 100 else 2.0 - 0.001 * s)
    assert diagnose(records)["diagnosis"] == "overfitting"


def test_lr_too_low():
    result = diagnose(curve(lambda s: 2.0 - 0.0001 * s, lambda s: 2.05 - 0.00005 * s))
    assert result["diagnosis"] == "lr_too_low"
    assert any("raise the learning rate" in a for a in result["advice"])


def test_lr_too_high_oscillating():
    rng = random.Random(5)
    records = curve(lambda s: 2.0 + 0.6 * abs(rng.gauss(0, 1)), lambda s: 2.2 + 0.3 * (-1) ** (s // 20) * rng.random())
    assert diagnose(records)["diagnosis"] == "lr_too_high"


def test_lr_too_high_diverging():
    records = curve(lambda s: 2.0 + 0.01 * s, lambda s: 2.0 + 0.01 * s)
    assert diagnose(records)["diagnosis"] == "lr_too_high"


def test_late_spike_named_warmup_spike_ignored():
    result = diagnose(curve(healthy_train, healthy_eval, spikes={200: 2.5}))
    assert result["diagnosis"] == "late_spike"
    assert [(s["step"], s["kind"]) for s in result["spikes"]] == [(200, "late")]
    assert any("200" in a for a in result["advice"])
    warm = diagnose(curve(healthy_train, healthy_eval, spikes={8: 2.0}))
    assert warm["diagnosis"] == "healthy"
    assert [(s["step"], s["kind"]) for s in warm["spikes"]] == [(8, "warmup")]


@pytest.mark.parametrize("seed", range(8))
def test_borderline_noise_stays_healthy(seed):
    # nearly converged by the end, noisy train (5%) and eval (1.5%) curves: the eval minimum moves around with the
    # noise, but the rise after it is within noise, so this must not read as overfitting
    records = curve(healthy_train, healthy_eval, seed=seed, train_noise=0.05, eval_noise=0.015)
    assert diagnose(records)["diagnosis"] == "healthy"


def test_insufficient_and_file(tmp_path):
    assert diagnose([{"step": 1, "train_loss": 2.0}])["diagnosis"] == "insufficient_data"
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in curve(healthy_train, healthy_eval)) + "\n")
    result = diagnose_file(tmp_path)
    assert result["diagnosis"] == "healthy" and result["source"] == str(path)
    assert "diagnosis: healthy" in format_diagnosis(result)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        diagnose_file(tmp_path / "nope")


def test_overfitting_eval_creeping_while_train_plunges():
    # shape of a real over-trained LoRA run on SmolLM2 (tests/eval/test_eval_reference.py): train 1.5 -> 0.12,
    # eval 0.39 -> 0.376 with a bump; the eval still inches down, but the gap widens 10x faster
    records = curve(lambda s: 0.1 + 1.4 * math.exp(-s / 40), lambda s: 0.38 + 0.03 * math.exp(-s / 100))
    assert diagnose(records)["diagnosis"] == "overfitting"


def test_overfitting_eval_at_its_floor_from_the_first_evaluation():
    # the measured over-trained SmolLM2 run: eval 0.388 at the first evaluation and 0.376-0.393 after it, while
    # the train loss fell from 0.59 to 0.15 over the same steps
    train = [1.562, 1.564, 0.838, 0.591, 0.478, 1.198, 0.334, 0.564, 0.384, 0.649, 0.205, 0.195, 0.154, 0.354, 0.148,
             0.167, 0.175, 0.19, 0.14, 0.216, 0.149, 0.137, 0.172, 0.184, 0.137, 0.133, 0.17, 0.177, 0.161, 0.132,
             0.177, 0.124]
    evals = {4: 0.387517, 8: 0.512881, 12: 0.400557, 16: 0.394381, 20: 0.375077, 24: 0.39327, 28: 0.381967,
             32: 0.376265}
    records = []
    for step, value in enumerate(train, start=1):
        records.append({"step": step, "train_loss": value, **({"eval_loss": evals[step]} if step in evals else {})})
    result = diagnose(records)
    assert result["diagnosis"] == "overfitting" and result["best_step"] == 20


# "healthy" must mean the training loss fell. These curves never fall below their start; each once read as healthy
# because the eval loss improved a little (flat) or the noise hid the lack of progress (oscillating).
def test_flat_train_with_improving_eval_is_not_healthy():
    # train flat at 2.0 (3% noise); eval improves 6% (e.g. the format is learned from the prompt alone)
    result = diagnose(curve(lambda s: 2.0, lambda s: 2.1 - 0.0004 * s))
    assert result["diagnosis"] == "lr_too_low"
    assert result["measures"]["train_loss_fell"] is False
    assert "never fell below its start" in result["advice"][0]
    assert any("raise the learning rate" in a for a in result["advice"])


@pytest.mark.parametrize("seed", range(4))
def test_oscillating_widely_around_the_start_is_lr_too_high(seed):
    # train loss swings +-20% around its starting level for the whole run; the eval curve drifts down smoothly
    # (no zig-zag), so only the training curve shows it
    result = diagnose(curve(lambda s: 2.0, lambda s: 2.1 - 0.0004 * s, seed=seed, train_noise=0.2))
    assert result["diagnosis"] == "lr_too_high"
    assert result["measures"]["train_loss_fell"] is False
    assert any("lower the learning rate" in a for a in result["advice"])


def test_moderately_noisy_flat_train_without_eval_is_not_healthy():
    # 8% noise around a flat level, no eval: below the oscillation threshold, so "rate too low"
    records = [r for r in curve(lambda s: 2.0, lambda s: 2.0, train_noise=0.08) if "train_loss" in r]
    result = diagnose(records)
    assert result["diagnosis"] == "lr_too_low"
    assert result["measures"]["train_loss_fell"] is False


def test_small_but_real_fall_stays_healthy():
    # a 10% fall with 3% noise over 300 steps is real progress (far above the medians' standard error)
    result = diagnose(curve(lambda s: 2.0 - 0.2 * (1 - math.exp(-s / 60)), lambda s: 2.1 - 0.2 * (1 - math.exp(-s / 60))))
    assert result["diagnosis"] == "healthy"
    assert result["measures"]["train_loss_fell"] is True
