"""The Method interface: what every fine-tuning method provides to the config, trainer, planner, CLI and merge.

A method owns all of itself (peft's one-folder-per-method pattern, `register_peft_method`):
  - its options class(es), which config.py assembles into `MethodConfig` (`options`);
  - training: turn a loaded base model into a trainable model (`apply`), save its trained state in its own format
    (`save`; PEFT's layout where peft implements the method), restore it onto a fresh base (`load`);
  - planning terms from model facts alone, which `plan/` sums without knowing any method by name:
    `trainable_count` (exact trainable parameters and the formula), `layer_activation_elements` (what autograd
    saves per token in one decoder layer), `layer_autocast_bytes` (the same under 16-bit autocast on fp32 weights,
    in bytes), `autocast_weight_casts`, `attention_mask_elements`, `frozen_weight_bytes`, `extra_activation_bytes`, `virtual_tokens`;
  - merge/export behaviour (`can_merge`, `merge_refusal`, `merge_compared_to`, `export_pair`, `merge`).
The trainer checkpoints the trainable parameters generically (by name, as safetensors), so methods need no
checkpoint code of their own.

This module and every method module import no torch/peft/transformers at import time (they do so inside the
functions that need them): config.py builds its schema from the method registry, and `tunesmith config` or
`tunesmith plan` should not pay the ~6 s peft import.

Every saved folder carries `tunesmith_method.json` ({"method", "base_model", "options"}) so that
`registry.load_trained` knows how to load it; PEFT, vLLM and LoRAX ignore the extra file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from tunesmith.errors import UsageError
from tunesmith.models.facts import ModelFacts

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tunesmith.config import MethodConfig

METHOD_FILE = "tunesmith_method.json"


class MethodError(UsageError):
    """A method cannot do what was asked (merge a prefix, checkpoint a prefix-tuned model, ...); says why."""


class MethodOptions(BaseModel):
    """Base of every method's options section: unknown keys are errors, assignments are validated (as config.Section)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class OptionsSection:
    """One section of `method:` in the run config that a method owns: `method.<key>` of type `cls`."""

    key: str
    cls: type[MethodOptions]
    description: str


@dataclass(frozen=True)
class TrainableCount:
    method: str
    trainable_params: int
    formula: str


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the frozen base weights as the method loads them, and the 4-bit details where it quantizes."""

    bytes: int
    quant_constant_bits_per_param: float | None = None
    quantized_params: int = 0
    notes: list[str] = field(default_factory=list)


def frozen_core_elements(f: ModelFacts) -> float:
    """Activation elements autograd saves per token in one decoder layer whose weights are all frozen (measured,
    see plan/activations.py): both norms' outputs for the next matmuls aside, 2h + 2q + 3i + 2k + a + 2
    (h hidden, q heads*head_dim, i intermediate, k kv width, a heads)."""
    h, i, q, k, a = f.hidden_size, f.intermediate_size, f.num_heads * f.head_dim, f.kv_width, f.num_heads
    return 2 * h + 2 * q + 3 * i + 2 * k + a + 2


def frozen_core_autocast_bytes(f: ModelFacts, kv_repeated: bool = True) -> float:
    """Bytes autograd saves per token in one frozen decoder layer under 16-bit autocast on fp32 weights (CPU bf16;
    measured with saved_tensors_hooks, see plan/activations.py): the norms stay fp32 (input + rsqrt each:
    4 * (2h + 2)) and so does SDPA's log-sum-exp (4a); the MLP (gate, silu, up) and attention tensors (rotated q,
    k, v, the SDPA output) are 16-bit: 2 * (3i + 2q + 2kv). kv = q when a 4-D mask makes transformers repeat the
    key/value heads before SDPA (packing, prefixes), else the kv width."""
    h, i, q, a = f.hidden_size, f.intermediate_size, f.num_heads * f.head_dim, f.num_heads
    kv = q if kv_repeated else f.kv_width
    return 4 * (2 * h + a + 2) + 2 * (3 * i + 2 * q + 2 * kv)


class Method:
    """Base class with the defaults; one small subclass per method (keep it shallow)."""

    name: str = ""
    description: str = ""  # one line, for `tunesmith plan`
    options: tuple[OptionsSection, ...] = ()  # the sections of MethodConfig this method owns
    # Order in which the planner prefers methods that fit (lower first): quality per FIELD.md's method table.
    plan_preference: int = 100
    # True when the method trains the base weights themselves (full fine-tuning): they train in their own dtype, the
    # output layer's gradient appears while every activation lives, and AdamW's CPU step touches the largest tensor.
    trains_base_weights: bool = False
    # fp32 training on a CPU: the share of the forward pass's layer allocations that glibc's heap keeps resident on
    # top of the live tensors (plan/memory.py retention_share). It depends on the method's pattern of allocations, so
    # each method states its own, FITTED on the fit set (docs/benchmarks.md, "Memory estimate"); None: the pooled
    # share (plan/memory.py CPU_FP32_RETENTION).
    cpu_fp32_heap_share: float | None = None
    uses_lora_rank: bool = False  # the planner's --rank/--targets apply (LoRA, QLoRA)
    uses_virtual_tokens: bool = False  # the planner's --virtual-tokens applies (prefix, prompt)
    can_merge: bool = False
    merge_refusal: str = ""  # why not, when can_merge is False
    merge_compared_to: str = "unmerged base + adapter"  # what `tunesmith merge` compares the merged logits against
    # False when the trained folder is already a full model (nothing to merge or export): merge refuses and points
    # at the folder itself.
    export_pair: bool = True
    supports_gradient_checkpointing: bool = True
    # FSDP2 sharding (train/sharding.py) shards the live modules; prompt learning's saved embeddings would be shards.
    supports_sharding: bool = True
    # Packing feeds a 4-D block-diagonal mask and per-example positions; prompt-learning methods prepend virtual
    # tokens that such a mask cannot describe, so the trainer refuses packing when this is False.
    supports_packing: bool = True

    # --- planning (model facts only: no weights, no torch)
    def trainable_count(self, facts: ModelFacts, config: MethodConfig) -> TrainableCount:
        raise NotImplementedError

    def layer_activation_elements(self, facts: ModelFacts, config: MethodConfig) -> float:
        """Elements autograd saves per token in one decoder layer (default: the frozen core)."""
        return frozen_core_elements(facts)

    def per_example_attention_elements(self, facts: ModelFacts, config: MethodConfig) -> float:
        """Elements per token per layer that per-example attention (models/attention.py, packed rows on CPUs) adds to
        `layer_activation_elements` (default none: the layers keep the same tensors)."""
        return 0.0

    def layer_autocast_bytes(self, facts: ModelFacts, config: MethodConfig, mask_4d: bool = True) -> float:
        """Bytes autograd saves per token in one decoder layer when fp32 weights run under 16-bit autocast (CPUs
        with native bf16): default the frozen core, key/value heads repeated when packing feeds a 4-D mask
        (`mask_4d`; False under per-example attention, models/attention.py)."""
        return frozen_core_autocast_bytes(facts, kv_repeated=self.supports_packing and mask_4d)

    def autocast_weight_casts(self, facts: ModelFacts, config: MethodConfig, gradient_checkpointing: bool) -> int:
        """Weights whose 16-bit autocast copy autograd keeps until the backward pass (elements): every matmul casts
        its fp32 weight and keeps the cast for the input's gradient, trained or frozen: all decoder Linear weights
        + the output layer (tied or not). With checkpointing only the head's, and one layer's while it is
        recomputed. Measured with saved_tensors_hooks (plan/activations.py)."""
        head = facts.vocab_size * facts.hidden_size
        linears = facts.decoder_linears()
        if not linears:
            return head
        if gradient_checkpointing:
            return head + max(sum(m.weight_params for m in linears if m.layer == layer) for layer in {m.layer for m in linears})
        return head + sum(m.weight_params for m in linears)

    def attention_mask_elements(self, config: MethodConfig, batch_size: int, seq_len: int) -> tuple[int, bool]:
        """(elements of the attention mask autograd keeps, whether every layer keeps its own copy). Packing's
        additive 4-D block mask, (batch, 1, seq, seq), is one tensor for all layers (in fp32 compute; autocast
        then casts it to 16 bits once per layer); without packing SDPA gets no mask (causal kernel)."""
        return (batch_size * seq_len * seq_len, False) if self.supports_packing else (0, False)

    def virtual_tokens(self, config: MethodConfig) -> int:
        """Positions the method adds to every sequence the layers see (prompt tuning's soft prompt)."""
        return 0

    def frozen_weight_bytes(self, facts: ModelFacts, config: MethodConfig, trainable_params: int,
                            weight_bytes: int, weight_dtype: str) -> WeightBytes:
        """Frozen base weights: every parameter at the loaded dtype (`weight_bytes` per parameter, named
        `weight_dtype`); the method's own trainable weights are counted apart."""
        return WeightBytes(facts.params_total * weight_bytes)

    def extra_activation_bytes(self, facts: ModelFacts, config: MethodConfig, act_bytes: int) -> int:
        """Scratch the method adds during forward/backward beyond saved activations (e.g. a dequantized weight)."""
        return 0

    def learning_rate_range(self, full_range: tuple[float, float]) -> tuple[float, float]:
        """Advised learning rates given full fine-tuning's range for the model size: PEFT ~10x (FIELD.md)."""
        return (full_range[0] * 10, full_range[1] * 10)

    def learning_rate_reason(self) -> str:
        return "PEFT: ~10x the full-FT range"

    def plan_options(self, *, rank: int, dropout: float, targets: list[str] | str | None,
                     virtual_tokens: int | None) -> dict[str, Any]:
        """The `method:` options the planner writes for this method from its flags (--rank, --targets, ...)."""
        return {}

    @property
    def selective_logits(self) -> bool:
        """Whether the trainer computes logits at labelled positions only (train/loop.py forward_loss): every method
        that does not re-align the logits (prompt tuning prepends virtual positions, so it takes the full path)."""
        return type(self).align_logits is Method.align_logits

    # --- loading the base
    def base_load_kwargs(self, config: MethodConfig) -> dict[str, Any]:
        """Extra keyword arguments for from_pretrained (e.g. a quantization config)."""
        return {}

    # --- training
    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        raise NotImplementedError

    def trainable_parameter_count(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        if not self.supports_gradient_checkpointing:
            raise MethodError(f"{self.name}: gradient checkpointing is not supported with this method")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    def align_logits(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits aligned with input_ids: (batch, seq, vocab). Identity unless the method prepends positions."""
        return logits

    # --- persistence
    def save(self, model: nn.Module, directory: Path, config: MethodConfig, base_model: str) -> None:
        raise NotImplementedError

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        raise NotImplementedError

    # --- inference
    def prepare_for_generation(self, model: nn.Module) -> nn.Module:
        """Hook for methods whose generation needs care (e.g. prompt learning with the KV cache)."""
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise MethodError(self.merge_refusal or f"{self.name} cannot merge into the base weights")


def write_method_file(directory: Path, method: str, base_model: str, config: MethodConfig) -> None:
    options = config.model_dump(mode="json")
    (Path(directory) / METHOD_FILE).write_text(
        json.dumps({"method": method, "base_model": base_model, "options": options}, indent=2) + "\n"
    )


def read_method_file(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / METHOD_FILE
    return json.loads(path.read_text()) if path.exists() else None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (tied parameters appear once, as named_parameters yields them)."""
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back by name; every saved name must exist and every trainable one be saved."""
    import torch

    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = trainable - state.keys()
    unexpected = state.keys() - params.keys()
    if missing or unexpected:
        raise MethodError(
            f"checkpoint does not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
