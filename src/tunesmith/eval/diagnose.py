"""Loss-curve diagnosis: classify a run's train/eval curves and say what the field recommends.

Classes (checked in this order; the first that holds wins):
1. lr_too_high  — the training loss diverged (ends higher than it started, or went non-finite), or the curves
                  oscillate: eval loss zig-zags by more than 3% of its level and the training loss is noisy
                  (robust residual > 12% of its level) or makes no progress.
2. overfitting  — the training loss keeps falling (>= 3% after the best eval step) while the smoothed eval loss
                  rises from its minimum by more than max(3%, 2 noise sigmas), or stays flat: over the second half
                  of the evaluations the training loss falls by > 15% while the eval loss improves by less than
                  max(1%, a tenth of the training drop); or, since the first evaluation, the training loss falls by
                  > 30% while the eval loss (first value vs median of the last three) improves by < max(2%, a tenth).
3. lr_too_low   — both curves flat from the start: train improves < 5% (head vs tail medians) and eval < 3%.
4. not falling  — before a run may be called healthy (or late_spike), its training loss must actually have fallen:
                  the tail median below the head median by more than FLAT_TRAIN (5%) and by more than three
                  standard errors of those medians. A run that never falls below its start is lr_too_high when it
                  oscillates widely around it (robust residual > NOISY_TRAIN of its level: steps too large to settle)
                  and lr_too_low otherwise (flat: steps too small to move it), whatever the eval curve did.
5. late_spike   — a training-loss spike after warm-up that recovered (a bad batch); its step is named.
6. healthy      — otherwise: the training loss fell. Spikes during warm-up are listed in `spikes` but do not
                  change this.
"insufficient_data" is returned when fewer than 5 training-loss points exist (nothing can be judged).

All thresholds are relative to the loss level and to a robust noise estimate (median absolute deviation of
residuals around a running median), so the classes do not depend on the loss scale, and per-step noise of a
healthy run does not read as overfitting (tests check several noise seeds).
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import median
from typing import Any

from tunesmith.eval.plots import series
from tunesmith.records.metrics import read_metrics

SPIKE_RELATIVE = 0.3  # a spike is > 30% above the surrounding level ...
SPIKE_SIGMAS = 5.0  # ... and > 5 robust noise sigmas above it
NOISY_TRAIN = 0.12  # train residual sigma / level above this = oscillating
EVAL_ZIGZAG = 0.03  # median |Δ eval| / level above this, with frequent direction changes = oscillating
OVERFIT_RISE = 0.03
FLAT_TRAIN, FLAT_EVAL = 0.05, 0.03

ADVICE = {
    "healthy": [
        "continue: train and eval loss fall together",
        "judge usefulness by the task metrics (tunesmith eval), not the loss alone",
    ],
    "overfitting": [
        "stop at the best eval step {best_step} (train.load_best_at_end, train.early_stopping_patience)",
        "lower the learning rate (train.learning_rate) or train fewer epochs (1-3)",
        "regularise: train.weight_decay 0.01-0.1, method.lora.dropout 0.05-0.1",
        "reduce the LoRA rank (method.lora.r) or the trained modules",
        "get more, and more diverse, training data",
    ],
    "lr_too_low": [
        "raise the learning rate (LoRA 1e-4 to 2e-4; full fine-tuning 1e-5 to 5e-5 below 1B parameters)",
        "audit the data for label noise, duplicates and mismatched formats (tunesmith data prepare)",
    ],
    "lr_too_high": [
        "lower the learning rate 3-10x (train.learning_rate)",
        "raise the effective batch (train.gradient_accumulation_steps)",
        "keep a warm-up (train.warmup_ratio 0.03-0.1) and gradient clipping (train.max_grad_norm 1.0)",
    ],
    "late_spike": [
        "inspect the training examples of step(s) {late_steps}: a bad batch (corrupt, duplicated or mislabelled)",
        "keep gradient clipping on (train.max_grad_norm) and resume from the checkpoint before the spike if needed",
    ],
    "insufficient_data": ["log more steps (train.logging_steps) and evaluate at least 3 times (train.eval_steps)"],
}


def _running_median(values: list[float], half: int) -> list[float]:
    return [median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def _robust_sigma(values: list[float]) -> float:
    """1.4826 * MAD: the standard deviation for Gaussian noise, unmoved by a few outliers."""
    if not values:
        return 0.0
    center = median(values)
    return 1.4826 * median(abs(v - center) for v in values)


def _head_tail(values: list[float]) -> tuple[float, float]:
    k = max(2, len(values) // 10)
    return median(values[:k]), median(values[-k:])


def _warmup_end(records: list[dict[str, Any]], last_step: float) -> float:
    """Step where the learning rate peaks (end of warm-up); 10% of the run when no rate was logged."""
    steps, rates = series(records, "lr")
    if len(rates) >= 2 and max(rates) > rates[0]:
        return max(steps[rates.index(max(rates))], 0.1 * last_step)
    return 0.1 * last_step


def find_spikes(steps: list[float], values: list[float], warmup_end: float) -> list[dict[str, Any]]:
    """Points > SPIKE_RELATIVE above both the level before (median of up to 5 earlier points; needs 2) and after
    (median of up to 5 later points) and > SPIKE_SIGMAS noise sigmas above it. Consecutive points merge into one."""
    level = _running_median(values, 4)
    sigma = _robust_sigma([v - s for v, s in zip(values, level, strict=True)])
    spikes: list[dict[str, Any]] = []
    for i in range(2, len(values) - 1):
        before, after = median(values[max(0, i - 5) : i]), median(values[i + 1 : i + 6])
        baseline = max(before, after)
        excess = values[i] - baseline
        if excess > SPIKE_RELATIVE * baseline and excess > SPIKE_SIGMAS * sigma:
            spike = {"step": int(steps[i]), "loss": round(values[i], 6), "baseline": round(baseline, 6),
                     "ratio": round(values[i] / baseline, 3) if baseline else None,
                     "kind": "warmup" if steps[i] <= warmup_end else "late",
                     "recovered": after <= before * (1 + SPIKE_RELATIVE / 2)}
            if spikes and spikes[-1]["_index"] == i - 1:
                if values[i] > spikes[-1]["loss"]:
                    spike["_index"] = i
                    spikes[-1] = spike
                else:
                    spikes[-1]["_index"] = i
                continue
            spike["_index"] = i
            spikes.append(spike)
    for spike in spikes:
        spike.pop("_index")
    return spikes


def _eval_features(steps: list[float], values: list[float], train_steps: list[float],
                   train_smooth: list[float]) -> dict[str, Any]:
    """Smoothed eval minimum, rise after it, zig-zag amplitude, flatness over the second half."""
    n = len(values)
    smooth = [sum(values[max(0, i - 1) : i + 2]) / len(values[max(0, i - 1) : i + 2]) for i in range(n)] if n >= 5 else values
    level = median(values)
    diffs = [b - a for a, b in zip(values, values[1:], strict=False)]
    sign_changes = sum(1 for a, b in zip(diffs, diffs[1:], strict=False) if a * b < 0)
    noise = _robust_sigma([v - s for v, s in zip(values, smooth, strict=True)]) if n >= 5 else 0.0
    best_smooth = min(range(n), key=smooth.__getitem__)

    def train_at(step: float) -> float:
        index = min(range(len(train_steps)), key=lambda i: abs(train_steps[i] - step))
        return train_smooth[index]

    half = n // 2
    return {
        "level": level,
        "rise": (smooth[-1] - smooth[best_smooth]) / smooth[best_smooth] if smooth[best_smooth] else 0.0,
        "rise_noise": 2 * noise / smooth[best_smooth] if smooth[best_smooth] else 0.0,
        "best_smooth_step": steps[best_smooth],
        "train_drop_after_best": 1 - train_at(steps[-1]) / train_at(steps[best_smooth]) if train_at(steps[best_smooth]) else 0.0,
        "zigzag": median(abs(d) for d in diffs) / level if diffs and level else 0.0,
        "sign_change_share": sign_changes / max(1, len(diffs) - 1),
        "progress": (values[0] - min(values)) / values[0] if values[0] else 0.0,
        "second_half_gain": (smooth[half] - min(smooth[half:])) / smooth[half] if n >= 4 and smooth[half] else None,
        "train_drop_second_half": 1 - train_at(steps[-1]) / train_at(steps[half]) if n >= 4 and train_at(steps[half]) else None,
        "gain_since_first": (values[0] - median(values[-3:])) / values[0] if values[0] else 0.0,
        "train_drop_since_first": 1 - train_at(steps[-1]) / train_at(steps[0]) if train_at(steps[0]) else 0.0,
    }


def train_loss_fell(train_progress: float, train_noise: float, window: int) -> bool:
    """The head-to-tail drop exceeds FLAT_TRAIN and three standard errors of the two medians' difference.

    A median of `window` Gaussian points has a standard error of ~1.2533 sigma / sqrt(window); the difference of
    two such medians sqrt(2) times that."""
    standard_error = math.sqrt(2) * 1.2533 * train_noise / math.sqrt(max(1, window))
    return train_progress >= max(FLAT_TRAIN, 3 * standard_error)


def _classify(train_progress: float, train_noise: float, diverged: bool, ev: dict[str, Any] | None,
              late_spikes: list[dict[str, Any]], fell: bool = True) -> str:
    oscillating_eval = ev is not None and ev["zigzag"] > EVAL_ZIGZAG and ev["sign_change_share"] >= 0.5
    if diverged or (oscillating_eval and (train_noise > NOISY_TRAIN or train_progress < 0.1)) or (
        ev is None and train_noise > NOISY_TRAIN and train_progress < train_noise
    ):
        return "lr_too_high"
    if ev is not None and ev["train_drop_after_best"] >= 0.03 and ev["rise"] > max(OVERFIT_RISE, ev["rise_noise"]):
        return "overfitting"
    # "eval flat": the train loss falls a lot while the eval loss barely moves, so the gap widens (memorising).
    # Two windows: the second half of the evaluations, and everything since the first evaluation (the eval loss
    # may have reached its floor before the first half ended).
    if ev is not None:
        half_drop = ev["train_drop_second_half"] or 0.0
        if ev["second_half_gain"] is not None and half_drop > 0.15 and ev["second_half_gain"] < max(0.01, 0.1 * half_drop):
            return "overfitting"
        if ev["train_drop_since_first"] > 0.3 and ev["gain_since_first"] < max(0.02, 0.1 * ev["train_drop_since_first"]):
            return "overfitting"
    if train_progress < FLAT_TRAIN and (ev is None or ev["progress"] < FLAT_EVAL):
        return "lr_too_low"
    if not fell:  # "healthy" means the training loss fell; a noisy eval improvement does not make up for it
        return "lr_too_high" if train_noise > NOISY_TRAIN else "lr_too_low"
    if late_spikes:
        return "late_spike"
    return "healthy"


def diagnose(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Classify metrics.jsonl records. Returns {"diagnosis", "spikes", "best_step", "best_eval_loss", "gap",
    "advice", "measures"}; `gap` = final eval loss - final train loss (smoothed), reported with overfitting."""
    train_steps, train_loss = series(records, "train_loss")
    eval_steps, eval_loss = series(records, "eval_loss")
    non_finite = [r["step"] for r in records if any(isinstance(r.get(k), float) and not math.isfinite(r[k])
                                                     for k in ("train_loss", "eval_loss"))]
    best_step = best_eval = None
    if eval_loss:
        best = min(range(len(eval_loss)), key=eval_loss.__getitem__)
        best_step, best_eval = int(eval_steps[best]), eval_loss[best]
    result: dict[str, Any] = {"diagnosis": "insufficient_data", "spikes": [], "best_step": best_step,
                              "best_eval_loss": best_eval, "gap": None, "advice": [], "measures": {}}
    if len(train_loss) < 5:
        result["advice"] = list(ADVICE["insufficient_data"])
        return result
    smooth = _running_median(train_loss, max(1, len(train_loss) // 20))
    head, tail = _head_tail(train_loss)
    progress = (head - tail) / head if head else 0.0
    noise = _robust_sigma([v - s for v, s in zip(train_loss, smooth, strict=True)]) / median(train_loss) if median(train_loss) else 0.0
    diverged = bool(non_finite) or tail > head * 1.05
    spikes = find_spikes(train_steps, train_loss, _warmup_end(records, train_steps[-1]))
    late = [s for s in spikes if s["kind"] == "late" and s["recovered"]]
    ev = _eval_features(eval_steps, eval_loss, train_steps, smooth) if len(eval_loss) >= 3 else None
    fell = train_loss_fell(progress, noise, max(2, len(train_loss) // 10))
    label = _classify(progress, noise, diverged, ev, late, fell)
    if ev is not None:
        result["gap"] = round(median(eval_loss[-2:]) - smooth[-1], 6)
    late_steps = ", ".join(str(s["step"]) for s in late)
    advice = [a.format(best_step=best_step, late_steps=late_steps) for a in ADVICE[label]]
    if not fell and label in ("lr_too_low", "lr_too_high"):
        advice.insert(0, f"the training loss never fell below its start (median of the first steps {head:.4f}, of the "
                         f"last {tail:.4f}, noise {100 * noise:.0f}% of its level): the run learned nothing yet")
    if late and label != "late_spike":
        advice += [a.format(best_step=best_step, late_steps=late_steps) for a in ADVICE["late_spike"][:1]]
    if ev is None:
        advice.append("no (or fewer than 3) eval-loss points: overfitting cannot be judged; set train.eval_steps")
    measures = {"train_progress": progress, "train_noise": noise, "train_loss_fell": fell, "diverged": diverged,
                "non_finite_steps": non_finite}
    if ev is not None:
        measures.update({f"eval_{k}": v for k, v in ev.items() if k != "level"})
    result.update(diagnosis=label, spikes=spikes, advice=advice,
                  measures={k: round(v, 6) if isinstance(v, float) else v for k, v in measures.items()})
    return result


def diagnose_file(path: str | Path) -> dict[str, Any]:
    """Diagnose a metrics.jsonl file, or the metrics.jsonl inside a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (give a run directory or a metrics.jsonl file)")
    result = diagnose(read_metrics(path))
    result["source"] = str(path)
    return result


def format_diagnosis(result: dict[str, Any]) -> str:
    lines = [f"diagnosis: {result['diagnosis']}"]
    if result.get("best_step") is not None:
        lines.append(f"best eval step: {result['best_step']} (eval loss {result['best_eval_loss']:.4f})"
                     + (f", final eval-train gap {result['gap']:.4f}" if result.get("gap") is not None else ""))
    for spike in result.get("spikes", []):
        lines.append(f"spike at step {spike['step']}: loss {spike['loss']:.4f} vs level {spike['baseline']:.4f} "
                     f"({spike['kind']}{', recovered' if spike['recovered'] else ', not recovered'})")
    lines += [f"  - {a}" for a in result.get("advice", [])]
    return "\n".join(lines)
