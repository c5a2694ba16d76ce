"""Trainer callbacks: hooks that measure or decide at evaluation time.

A callback is any object with these optional methods (all receive the live `TrainState`):
- `on_train_begin(state, model, tokenizer)`: before the first optimizer step (the model equals the base for
  LoRA, adapters and full fine-tuning; prompt-learning methods can use `model.disable_adapter()`).
- `on_evaluate(state, model, tokenizer) -> dict[str, float]`: after each evaluation; the returned measures are
  written beside `eval_loss` in metrics.jsonl. Set `state.should_stop = True` and `state.stop_reason` to stop.
- `on_train_end(state, model, tokenizer)`: after the best checkpoint is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: float = 0.0
    tokens_seen: int = 0  # non-padding tokens fed to the model
    target_tokens_seen: int = 0  # tokens that carried loss
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    should_stop: bool = False
    stop_reason: str | None = None
    max_steps: int = 0  # optimizer steps this run will take (set by the loop)


class Callback(Protocol):
    def on_train_begin(self, state: TrainState, model, tokenizer) -> None: ...

    def on_evaluate(self, state: TrainState, model, tokenizer) -> dict[str, float]: ...

    def on_train_end(self, state: TrainState, model, tokenizer) -> None: ...


def call(callbacks: list[Any], hook: str, *args) -> dict[str, float]:
    """Run `hook` on every callback that has it; merge the measures they return."""
    measures: dict[str, float] = {}
    for callback in callbacks:
        function = getattr(callback, hook, None)
        if function is not None:
            measures.update(function(*args) or {})
    return measures
