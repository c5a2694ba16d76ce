"""Exact trainable-parameter counts per fine-tuning method, from model facts alone (no weights).

Each function states its formula; where peft implements the method, tests hold the count equal to peft's
`get_nb_trainable_parameters()` on tiny models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunesmith.config import MethodConfig
from tunesmith.models.facts import ModelFacts, ModuleSpec

ALL_LINEAR = "all-linear"


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


def prefix_trainable_params(facts: ModelFacts, num_virtual_tokens: int, projection: bool = False, projection_hidden: int = 512) -> int:
    """Prefix tuning (Li & Liang 2021) as peft 0.21 builds it for a decoder-only model.

    One key and one value prefix per layer, each of kv width w = num_key_value_heads * head_dim (peft shrinks the
    prefix to the kv width under grouped-query attention, peft #1901):
        without projection:  n * L * 2 * w                                    (an Embedding(n, L*2*w))
        with projection:     n*w + (w*H + H) + (H * L*2*w + L*2*w)          (Embedding(n, w) -> Linear(w, H) ->
                                                                               tanh -> Linear(H, L*2*w))
    with n virtual tokens, L layers and H = projection_hidden (peft's encoder_hidden_size).
    """
    n, w, L = num_virtual_tokens, facts.kv_width, facts.num_layers
    if not projection:
        return n * L * 2 * w
    H = projection_hidden
    return n * w + (w * H + H) + (H * L * 2 * w + L * 2 * w)


def prompt_trainable_params(facts: ModelFacts, num_virtual_tokens: int) -> int:
    """Prompt tuning (Lester et al. 2021): one soft embedding of width hidden per virtual token: n * h."""
    return num_virtual_tokens * facts.hidden_size


def adapter_trainable_params(facts: ModelFacts, reduction_factor: int) -> int:
    """Bottleneck adapters (Houlsby et al. 2019): two per layer, each Linear(d, m) + bias -> act -> Linear(m, d) + bias,
    m = d // reduction_factor:  L * 2 * (d*m + m + m*d + d)."""
    d = facts.hidden_size
    m = d // reduction_factor
    return facts.num_layers * 2 * (d * m + m + m * d + d)


def full_trainable_params(facts: ModelFacts, freeze_embeddings: bool = False, freeze_first_layers: int = 0) -> int:
    """Full fine-tuning: every parameter, minus the input embedding (and with it a tied head; an untied lm_head
    stays trainable) when frozen, minus the parameters of the first k decoder layers when frozen."""
    count = facts.params_total
    if freeze_embeddings:
        count -= sum(m.params for m in facts.modules if m.kind == "embedding" and m.layer is None)
    count -= sum(facts.layer_params[: min(freeze_first_layers, facts.num_layers)])
    return count


@dataclass(frozen=True)
class TrainableCount:
    method: str
    trainable_params: int
    formula: str


def trainable_params(facts: ModelFacts, method: MethodConfig) -> TrainableCount:
    """The exact trainable-parameter count of `method` (a MethodConfig) on the model, with the formula used."""
    name = method.name
    if name in ("lora", "qlora"):
        lo = method.lora
        n = lora_trainable_params(
            facts, lo.r, lo.target_modules, bias=lo.bias, use_dora=lo.use_dora, modules_to_save=lo.modules_to_save
        )
        targets = lora_targets(facts, lo.target_modules)
        kinds = sorted({m.short for m in targets})
        return TrainableCount(name, n, f"sum over {len(targets)} modules ({', '.join(kinds)}) of r*(in+out), r={lo.r}")
    if name == "prefix":
        p = method.prefix
        n = prefix_trainable_params(facts, p.num_virtual_tokens, p.projection, p.projection_hidden)
        formula = f"{p.num_virtual_tokens} tokens x {facts.num_layers} layers x 2 x kv width {facts.kv_width}"
        return TrainableCount(name, n, formula + (f" + MLP (hidden {p.projection_hidden})" if p.projection else ""))
    if name == "prompt":
        n = prompt_trainable_params(facts, method.prompt.num_virtual_tokens)
        return TrainableCount(name, n, f"{method.prompt.num_virtual_tokens} tokens x hidden {facts.hidden_size}")
    if name == "adapters":
        rf = method.adapters.reduction_factor
        n = adapter_trainable_params(facts, rf)
        m = facts.hidden_size // rf
        return TrainableCount(name, n, f"{facts.num_layers} layers x 2 x (2*d*m + m + d), d={facts.hidden_size}, m={m}")
    if name == "full":
        f = method.full
        n = full_trainable_params(facts, f.freeze_embeddings, f.freeze_first_layers)
        return TrainableCount(
            name, n, "all parameters" + (" minus embeddings" if f.freeze_embeddings else "")
            + (f" minus first {f.freeze_first_layers} layers" if f.freeze_first_layers else "")
        )
    raise ValueError(f"method.name: unknown method {name!r}")
