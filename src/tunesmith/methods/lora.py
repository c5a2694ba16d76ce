"""LoRA through peft (Hu et al., 2021): W x + (alpha / r) * B A x, with A: (r, in), B: (out, r).

B starts at zero, so the first forward equals the base model. rsLoRA scales by alpha / sqrt(r) (Kalajdzievski,
2023); DoRA decomposes W into magnitude and direction (Liu et al., 2024). The saved folder is PEFT's own layout
(adapter_config.json + adapter_model.safetensors), loadable by peft, vLLM and LoRAX.

Planning terms (from model facts, no weights): `lora_targets` follows peft's own matching rules,
`lora_trainable_params` sums r * (in + out) over them, and `lora_layer_elements` adds what LoRA makes autograd
keep per token in a decoder layer (see plan/activations.py for how the coefficients were measured).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tunesmith.atomic import atomic_dir
from tunesmith.methods.base import (
    Method,
    MethodError,
    MethodOptions,
    OptionsSection,
    TrainableCount,
    frozen_core_autocast_bytes,
    frozen_core_elements,
    write_method_file,
)
from tunesmith.models.facts import ModelFacts, ModuleSpec

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

    from tunesmith.config import MethodConfig

ALL_LINEAR = "all-linear"


class LoraOptions(MethodOptions):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names, a regex string, or 'all-linear'."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init: Literal["gaussian", "kaiming"] = Field("kaiming", description="Initialisation of A (B starts at zero).")
    modules_to_save: list[str] = Field(default_factory=list, description="Extra modules trained in full and saved.")


# ------------------------------------------------------------------------------------------- counting
def lora_targets(facts: ModelFacts, target_modules: list[str] | str) -> list[ModuleSpec]:
    """The modules peft 0.21 wraps for `target_modules` (peft's own matching rules):

    - 'all-linear': every nn.Linear except the output layer (lm_head), whether or not it is tied;
    - another string: a regex that must match the full module name (re.fullmatch);
    - a list: a name matches when it equals an entry or ends with '.' + entry (so 'q_proj' hits every layer).
    Linear and Embedding modules can be targeted; a tied lm_head is targetable only by name.
    """
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        return [m for m in facts.modules if m.kind == "linear" and m.short != "lm_head"]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return [m for m in facts.modules if pattern.fullmatch(m.name)]
    wanted = list(target_modules)
    return [m for m in facts.modules if m.name in wanted or any(m.name.endswith("." + t) for t in wanted)]


def _modules_to_save(facts: ModelFacts, names: list[str]) -> list[ModuleSpec]:
    """peft's ModulesToSaveWrapper rule: a module matches when its name has `name` as a dotted component."""
    return [m for m in facts.modules if any(re.match(rf"(^|.*\.){n}($|\..*)", m.name) for n in names)]


def lora_trainable_params(
    facts: ModelFacts,
    r: int,
    target_modules: list[str] | str,
    *,
    bias: str = "none",
    use_dora: bool = False,
    modules_to_save: list[str] | None = None,
) -> int:
    """LoRA: for each targeted module of shape (in -> out), A is (r x in) and B is (out x r): r * (in + out).

    Under grouped-query attention k_proj/v_proj are (h -> kv_heads*head_dim), so they add r*(h + kv_width), less
    than q_proj's r*(h + heads*head_dim). An Embedding (V x h) adds r*(V + h). DoRA adds a magnitude vector of `out`
    per Linear. bias='all' trains every bias of the model, 'lora_only' the biases of targeted modules.
    modules_to_save trains a full copy of each named module (weight + bias).
    """
    saved = _modules_to_save(facts, modules_to_save or [])
    saved_names = {m.name for m in saved}
    targets = [m for m in lora_targets(facts, target_modules) if m.name not in saved_names]
    count = sum(r * (m.in_features + m.out_features) for m in targets)
    if use_dora:
        count += sum(m.out_features for m in targets if m.kind == "linear")
    if bias == "all":
        count += sum(m.out_features for m in facts.modules if m.bias)
    elif bias == "lora_only":
        count += sum(m.out_features for m in targets if m.bias)
    count += sum(m.params for m in saved)
    return count


# Which layer input each group of projections reads: the attention norm output (h), the MLP norm output (h), the
# MLP product (i). A LoRA target without dropout keeps that input alive for its A's weight gradient.
def _input_groups(f: ModelFacts) -> tuple[tuple[tuple[str, ...], int], ...]:
    return ((("q_proj", "k_proj", "v_proj"), f.hidden_size), (("gate_proj", "up_proj"), f.hidden_size),
            (("down_proj",), f.intermediate_size))


def fused_update_applies(lo: LoraOptions) -> bool:
    """Whether the trainer's LoRA layers run the fused update (methods/lora_forward.py LoraUpdate): every plain LoRA
    target (not DoRA; QLoRA's 4-bit layers are not plain nn.Linear bases and keep peft's forward)."""
    return not lo.use_dora


def lora_layer_elements(f: ModelFacts, lo: LoraOptions, fused: bool = True) -> float:
    """Activation elements per token per layer under LoRA (plan/activations.py has the measurement).

    fused (methods/lora_forward.py LoraUpdate, plain LoRA):
        frozen core + per input that targets read, once: h (q/k/v), h (gate/up), i (down)
                    + p*in per target with dropout at rate p (its dropped positions: int32, 4p bytes per input
                      element, methods/dropout.py)
                    + r per target (the A output that B saves)
      (o_proj's input, the attention output, is a view of what SDPA keeps; under per-example attention it is a
      copy: `lora_per_example_attention_elements`)
    peft's own forward (QLoRA's 4-bit layers, DoRA):
        frozen core + h if a target without dropout reads the attention norm output (q/k/v)
                    + h ... the MLP norm output (gate/up);  + i ... the MLP product (down)
                    + 2*in per target with dropout (the dropped input and its mask, both at activation width)
                    + r per target
    """
    layer0 = [m for m in lora_targets(f, lo.target_modules) if m.layer == 0]
    extra = 0.0
    for group, width in _input_groups(f):
        if (fused or lo.dropout == 0) and any(m.short in group for m in layer0):
            extra += width
    if lo.dropout > 0:
        extra += sum((lo.dropout * m.in_features if fused else 2 * m.in_features) for m in layer0)
    extra += lo.r * len(layer0)
    return frozen_core_elements(f) + extra


def lora_per_example_attention_elements(f: ModelFacts, lo: LoraOptions, fused: bool = True) -> float:
    """Per-example attention (models/attention.py) joins the examples' outputs into a new tensor, so o_proj's input is
    no longer a view of what SDPA keeps: the fused update keeps it (q = heads * head_dim elements), as peft's forward
    does without dropout (with dropout peft keeps the dropped copy, counted in `lora_layer_elements`)."""
    targets_o = any(m.short == "o_proj" for m in lora_targets(f, lo.target_modules) if m.layer == 0)
    return float(f.num_heads * f.head_dim) if targets_o and (fused or lo.dropout == 0) else 0.0


def lora_layer_autocast_bytes(f: ModelFacts, lo: LoraOptions, mask_4d: bool = True, fused: bool = True) -> float:
    """Bytes per token per layer under 16-bit autocast on fp32 weights (measured, plan/activations.py):
        frozen core (key/value heads repeated under packing's 4-D mask, `mask_4d`)
    fused (LoraUpdate):
        + per input that targets read, once, in its own dtype: the norm outputs in fp32 (4h each for q/k/v and
          gate/up), the MLP product in 16-bit (2i, down), the attention output in 16-bit (2q, o_proj) only under
          per-example attention (`mask_4d` False; else a view of SDPA's output)
        + per target with dropout at rate p: its dropped positions (int32: 4p * in)
        + per target: A's 16-bit output that B keeps (2 * r)
    peft's own forward:
        + per target with dropout: its fp32 mask (4 * in) and the 16-bit cast of the dropped input A reads (2 * in)
        + per target without dropout: A's own 16-bit cast of the input (2 * in; each matmul casts it again, so
          targets reading the same norm output do not share it as they do in fp32)
        + per target: 2 * r
    """
    layer0 = [m for m in lora_targets(f, lo.target_modules) if m.layer == 0]
    core = frozen_core_autocast_bytes(f, kv_repeated=mask_4d)
    if not fused:
        per_in = 6 if lo.dropout > 0 else 2
        return core + sum(per_in * m.in_features + 2 * lo.r for m in layer0)
    kept = 0.0
    for group, width in _input_groups(f):
        if any(m.short in group for m in layer0):
            kept += (2 if group == ("down_proj",) else 4) * width
    if not mask_4d and any(m.short == "o_proj" for m in layer0):
        kept += 2 * f.num_heads * f.head_dim
    masks = 4 * lo.dropout * sum(m.in_features for m in layer0)
    return core + kept + masks + 2 * lo.r * len(layer0)


# -------------------------------------------------------------------------------------------- method
def lora_config(config: MethodConfig) -> LoraConfig:
    from peft import LoraConfig

    options = config.lora
    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        bias=options.bias,
        use_rslora=options.use_rslora,
        use_dora=options.use_dora,
        init_lora_weights="gaussian" if options.init == "gaussian" else True,  # True = Kaiming-uniform A, zero B
        modules_to_save=options.modules_to_save or None,
        task_type="CAUSAL_LM",
    )



def peft_lora_model(model: nn.Module, config: MethodConfig) -> nn.Module:
    """peft's LoRA model for `config`, its dropout drawn ~4x faster on CPUs (methods/dropout.py) and its update
    accumulated into the base output in one matmul (methods/lora_forward.py); LoRA and QLoRA."""
    from peft import get_peft_model

    from tunesmith.methods.dropout import use_bulk_dropout
    from tunesmith.methods.lora_forward import use_fused_lora_forward

    model = get_peft_model(model, lora_config(config))
    use_bulk_dropout(model)
    use_fused_lora_forward(model)
    return model

class LoraMethod(Method):
    name = "lora"
    cpu_fp32_heap_share = 0.17  # fitted (methods/base.py)
    description = "low-rank adapters on the base weights (16-bit base)"
    options = (OptionsSection("lora", LoraOptions, "LoRA (and QLoRA) options."),)
    plan_preference = 0
    uses_lora_rank = True
    can_merge = True

    def trainable_count(self, facts: ModelFacts, config: MethodConfig) -> TrainableCount:
        lo = config.lora
        n = lora_trainable_params(facts, lo.r, lo.target_modules, bias=lo.bias, use_dora=lo.use_dora,
                                  modules_to_save=lo.modules_to_save)
        targets = lora_targets(facts, lo.target_modules)
        kinds = sorted({m.short for m in targets})
        return TrainableCount(self.name, n,
                              f"sum over {len(targets)} modules ({', '.join(kinds)}) of r*(in+out), r={lo.r}")

    def layer_activation_elements(self, facts: ModelFacts, config: MethodConfig) -> float:
        return lora_layer_elements(facts, config.lora, fused_update_applies(config.lora))

    def per_example_attention_elements(self, facts: ModelFacts, config: MethodConfig) -> float:
        return lora_per_example_attention_elements(facts, config.lora, fused_update_applies(config.lora))

    def layer_autocast_bytes(self, facts: ModelFacts, config: MethodConfig, mask_4d: bool = True) -> float:
        return lora_layer_autocast_bytes(facts, config.lora, mask_4d, fused_update_applies(config.lora))

    def plan_options(self, *, rank: int, dropout: float, targets: list[str] | str | None,
                     virtual_tokens: int | None) -> dict[str, Any]:
        return {"lora": {"r": rank, "alpha": 2 * rank, "dropout": dropout,
                         "target_modules": targets if targets is not None else ALL_LINEAR}}

    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        return peft_lora_model(model, config)

    def save(self, model: nn.Module, directory: Path, config: MethodConfig, base_model: str) -> None:
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = base_model  # the id users know, not a local cache path
        with atomic_dir(directory) as tmp:
            # tunesmith never resizes the vocabulary; peft's "auto" would query the hub for the base config to check
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
            write_method_file(tmp, self.name, base_model, config)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftModel

        directory = Path(directory)
        if not (directory / "adapter_model.safetensors").exists():
            pickled = [p.name for p in directory.glob("*.bin")]
            hint = f" (found {pickled[0]}: pickled adapters are refused; convert it to safetensors)" if pickled else ""
            raise MethodError(f"{directory}: no adapter_model.safetensors{hint}")
        model = PeftModel.from_pretrained(base, directory, is_trainable=False)
        model.eval()
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        import torch
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise MethodError("this model has no LoRA layers to merge (already merged?)")
        with torch.no_grad():
            return model.merge_and_unload(safe_merge=True)


METHOD = LoraMethod()
