"""Exact trainable-parameter counts per fine-tuning method, from model facts alone (no weights).

Each method owns its formula (`Method.trainable_count` in its own module, e.g. methods/lora.py's
`lora_trainable_params`); this module only asks the registry. Where peft implements the method, tests hold the
count equal to peft's `get_nb_trainable_parameters()` on tiny models (tests/plan/test_plan_counts.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunesmith.methods.base import TrainableCount
from tunesmith.methods.registry import get_method
from tunesmith.models.facts import ModelFacts

if TYPE_CHECKING:
    from tunesmith.config import MethodConfig

__all__ = ["TrainableCount", "trainable_params"]


def trainable_params(facts: ModelFacts, method: MethodConfig) -> TrainableCount:
    """The exact trainable-parameter count of `method` (a MethodConfig) on the model, with the formula used."""
    return get_method(method.name).trainable_count(facts, method)
