"""Advice: whether to fine-tune at all (the decision step), and starting hyperparameters from size and task.

Rules are the field's rules of thumb, collected in FIELD.md; each answer carries its reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TASK_KINDS = ("format", "style", "classification", "extraction", "instruction", "domain", "behaviour")

# Typical labelled examples by task kind (FIELD.md "How much data"); extraction is a format-bound instruction task.
TYPICAL_EXAMPLES = {
    "format": (100, 500), "style": (100, 500), "classification": (500, 5_000), "extraction": (1_000, 10_000),
    "instruction": (5_000, 50_000), "domain": (1_000, 10_000), "behaviour": (50_000, 500_000),
}
# LoRA rank by task kind: format/style 4-8, most tasks 16-32, domain adaptation 64-128 (start value first).
RANK_BY_TASK = {
    "format": (8, 4, 8), "style": (8, 4, 8), "classification": (16, 16, 32), "extraction": (16, 16, 32),
    "instruction": (16, 16, 32), "domain": (64, 64, 128), "behaviour": (64, 64, 128),
}
# Full fine-tuning learning rate by model size (parameters); PEFT uses ~10x these.
# Limits carry ~1.5% slack so that a model sold as "70B" (70.55B parameters) stays in the 10-70B band.
FULL_LR_BY_SIZE = [(1.015e9, (1e-5, 5e-5)), (10.15e9, (5e-6, 2e-5)), (71.05e9, (1e-6, 1e-5)), (float("inf"), (5e-7, 5e-6))]
FEW_SHOT_THRESHOLD = 50


@dataclass
class Decision:
    choice: str  # "rag" | "prompting" | "few-shot prompting" | "larger base model" | "fine-tune"
    fine_tune: bool
    reasons: list[str] = field(default_factory=list)


def decide(
    *,
    examples: int | None,
    knowledge_changes_often: bool = False,
    needs_citations: bool = False,
    prompting_good_enough: bool = False,
    base_too_weak: bool = False,
) -> Decision:
    """The decision step before any method, in the order the field applies it (FIELD.md "When not to fine-tune")."""
    if knowledge_changes_often:
        return Decision("rag", False, ["the knowledge changes often: retrieval (RAG) updates without retraining"])
    if needs_citations:
        return Decision("rag", False, ["answers must cite sources: knowledge in weights is not traceable; use RAG"])
    if examples is not None and examples < FEW_SHOT_THRESHOLD:
        return Decision("few-shot prompting", False, [
            f"{examples} labelled examples (< {FEW_SHOT_THRESHOLD}): too little signal to tune without overfitting; "
            "put them in the prompt as few-shot examples"])
    if prompting_good_enough:
        return Decision("prompting", False, ["prompting already meets the bar: fine-tuning adds cost and upkeep"])
    if base_too_weak:
        return Decision("larger base model", False, [
            "the base model lacks the ability: tuning teaches behaviour, not new capacity; try a larger base first"])
    reasons = ["none of the reasons against fine-tuning applies"]
    if examples is None:
        reasons.append("number of examples unknown (--examples): check you have at least 50, ideally the typical range")
    return Decision("fine-tune", True, reasons)


def size_band(params: int) -> str:
    limits = [limit for limit, _ in FULL_LR_BY_SIZE]
    return "<1B" if params < limits[0] else "1-10B" if params < limits[1] else "10-70B" if params < limits[2] else ">70B"


def learning_rate_range(params: int, method: str) -> tuple[float, float]:
    """Full fine-tuning's range by size, as the method adapts it (`Method.learning_rate_range`): full as is, LoRA-
    family and adapters 10x higher, prompt/prefix tuning 1e-2-3e-1 (FIELD.md)."""
    from tunesmith.methods.registry import get_method

    full = next(rng for limit, rng in FULL_LR_BY_SIZE if params < limit)
    return get_method(method).learning_rate_range(full)


@dataclass
class Hyperparameters:
    learning_rate: float
    learning_rate_range: tuple[float, float]
    size_band: str
    rank: int | None
    rank_range: tuple[int, int] | None
    alpha: int | None
    epochs: float
    warmup_ratio: float
    weight_decay: float
    lora_dropout: float
    examples_typical: tuple[int, int]
    data_note: str
    reasons: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def hyperparameters(params: int, method: str, task: str, examples: int | None) -> Hyperparameters:
    """Starting hyperparameters: LR by size (10x lower for full FT), rank by task, alpha = 2r, 1-3 epochs, 3-10% warmup."""
    if task not in TASK_KINDS:
        raise ValueError(f"--task {task!r}: expected one of {', '.join(TASK_KINDS)}")
    from tunesmith.methods.registry import get_method

    owner = get_method(method)
    low, high = learning_rate_range(params, method)
    lr = float(f"{(low * high) ** 0.5:.1g}")  # geometric middle, one significant digit
    rank = rank_range = alpha = None
    reasons = [f"{size_band(params)} model: {method} learning rate {low:.0e}-{high:.0e} ({owner.learning_rate_reason()})"]
    if owner.uses_lora_rank:
        rank, lo_r, hi_r = RANK_BY_TASK[task]
        rank_range, alpha = (lo_r, hi_r), 2 * rank
        reasons.append(f"{task} task: rank {lo_r}-{hi_r}, start at {rank}; alpha = 2r = {alpha}")
    typical = TYPICAL_EXAMPLES[task]
    epochs = 3.0 if examples is not None and examples < typical[0] else 2.0 if examples is not None and examples < typical[1] else 1.0
    reasons.append(f"epochs {epochs:g} (1-3; fewer when data is plentiful, more epochs mostly add forgetting)")
    if examples is None:
        data_note = f"{task} tasks usually need {typical[0]:,}-{typical[1]:,} examples"
    elif examples < typical[0]:
        data_note = f"{examples:,} examples is below the usual {typical[0]:,}-{typical[1]:,} for {task}: expect overfitting; watch eval loss"
    else:
        data_note = f"{examples:,} examples is within/above the usual {typical[0]:,}-{typical[1]:,} for {task}"
    return Hyperparameters(
        learning_rate=lr, learning_rate_range=(low, high), size_band=size_band(params), rank=rank,
        rank_range=rank_range, alpha=alpha, epochs=epochs, warmup_ratio=0.05, weight_decay=0.01,
        lora_dropout=0.05, examples_typical=typical, data_note=data_note, reasons=reasons,
    )
