"""Model facts without weights: a model's config and its exact module shapes and parameter counts.

Where a config comes from (first match wins):
  1. a local directory holding `config.json`, or a path to a `config.json` file;
  2. the catalogue shipped in `tunesmith/models/catalogue/` (public configs of common models, keyed by hub id);
  3. the local cache of the reference model (see reference.py);
  4. the model hub, through `transformers.AutoConfig.from_pretrained` (needs network access).

Counting: for the decoder families whose layout we know (llama, mistral, qwen2) the counts come from a formula
over the config (instant, even for 70B); any other architecture is instantiated on the meta device (no memory
for weights) and its modules are walked. A test holds the formula to the meta-device count for every catalogue
entry.

Formula (llama-style decoder, h = hidden, i = intermediate, a = heads, k = kv heads, d = head_dim, L = layers,
V = vocab):
    embed = V*h;  lm_head = V*h unless tied
    per layer = q (h*a*d) + k (h*k*d) + v (h*k*d) + o (a*d*h) + gate, up (h*i each) + down (i*h) + 2 norms (2h)
                + biases (qwen2: q, k, v; llama: q, k, v, o when attention_bias; gate, up, down when mlp_bias)
    total = embed + L * per layer + final norm (h) + lm_head
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tunesmith.errors import UsageError

FORMULA_FAMILIES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModuleSpec:
    """One weight-bearing module: a Linear (in -> out) or an Embedding (num_embeddings=in, dim=out)."""

    name: str  # full dotted name as transformers builds it, e.g. model.layers.3.self_attn.k_proj
    kind: str  # "linear" | "embedding"
    in_features: int
    out_features: int
    bias: bool
    layer: int | None  # decoder layer index, None outside the layer stack

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features if self.bias else 0)


@dataclass
class ModelFacts:
    name: str
    source: str  # "path" | "catalogue" | "reference-cache" | "hub"
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    params_total: int
    modules: list[ModuleSpec]  # every Linear and Embedding; a tied lm_head is listed but shares embed's weight
    norm_params: int  # everything that is neither a Linear nor an Embedding weight/bias (RMSNorm weights, ...)
    layer_params: list[int]  # parameters inside each decoder layer
    counted_by: str  # "formula" | "meta-device"
    config: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def kv_width(self) -> int:
        """Width of one key (or value) projection: num_key_value_heads * head_dim (< hidden under GQA)."""
        return self.num_kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return sum(m.params for m in self.modules if m.kind == "embedding")

    @property
    def lm_head_params(self) -> int:
        """Parameters of the output layer that are not shared with the input embedding (0 when tied)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def decoder_linears(self) -> list[ModuleSpec]:
        return [m for m in self.modules if m.kind == "linear" and m.layer is not None]


class ModelFactsError(UsageError):
    """A model's config cannot be found or read; the message names where it looked."""


# ------------------------------------------------------------------------------------------- configs
def catalogue_dir() -> Path:
    return Path(str(resources.files("tunesmith.models") / "catalogue"))


def catalogue_ids() -> list[str]:
    return sorted(p.stem.replace("--", "/", 1) for p in catalogue_dir().glob("*.json"))


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_model_config(name_or_path: str) -> tuple[dict[str, Any], str]:
    """The model's config as a dict, and where it came from (see the module docstring for the order)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFactsError(f"{path}: a directory without config.json; point --model at a model folder")
        return _clean(json.loads((path / "config.json").read_text(encoding="utf-8"))), "path"
    if path.is_file():
        try:
            return _clean(json.loads(path.read_text(encoding="utf-8"))), "path"
        except json.JSONDecodeError as exc:
            raise ModelFactsError(f"{path}: not a JSON config ({exc})") from None
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        raise ModelFactsError(f"--model {name_or_path}: no such folder or file (a hub id looks like org/name)")
    entry = catalogue_dir() / (name_or_path.replace("/", "--", 1) + ".json")
    if "/" in name_or_path and entry.exists():
        return _clean(json.loads(entry.read_text(encoding="utf-8"))), "catalogue"
    from tunesmith.models import reference

    cached = reference.cached_path(name_or_path) / "config.json"
    if "/" in name_or_path and cached.exists():
        return _clean(json.loads(cached.read_text(encoding="utf-8"))), "reference-cache"
    try:
        from transformers import AutoConfig

        return _clean(AutoConfig.from_pretrained(name_or_path).to_dict()), "hub"
    except Exception as exc:  # OSError offline, ValueError for unknown ids: both mean "not found" to a user
        raise ModelFactsError(
            f"--model {name_or_path}: no local folder, not in the catalogue ({', '.join(catalogue_ids())}), and the "
            f"hub lookup failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); pass a folder with config.json"
        ) from None


# ------------------------------------------------------------------------------------------- counting
def _shape_fields(config: dict[str, Any]) -> dict[str, Any]:
    h = int(config["hidden_size"])
    a = int(config["num_attention_heads"])
    return dict(
        hidden_size=h,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=a,
        num_kv_heads=int(config.get("num_key_value_heads") or a),
        head_dim=int(config.get("head_dim") or h // a),
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def formula_modules(config: dict[str, Any]) -> tuple[list[ModuleSpec], int, list[int]]:
    """Modules, norm parameters and per-layer parameters of a llama/mistral/qwen2 decoder, from its config."""
    s = _shape_fields(config)
    h, i, L, d = s["hidden_size"], s["intermediate_size"], s["num_layers"], s["head_dim"]
    q_width, kv_width = s["num_heads"] * d, s["num_kv_heads"] * d
    family = config["model_type"]
    qkv_bias = family == "qwen2" or bool(config.get("attention_bias", False))
    o_bias = family != "qwen2" and bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    modules = [ModuleSpec("model.embed_tokens", "embedding", s["vocab_size"], h, False, None)]
    layer_params = []
    for n in range(L):
        p = f"model.layers.{n}."
        layer = [
            ModuleSpec(p + "self_attn.q_proj", "linear", h, q_width, qkv_bias, n),
            ModuleSpec(p + "self_attn.k_proj", "linear", h, kv_width, qkv_bias, n),
            ModuleSpec(p + "self_attn.v_proj", "linear", h, kv_width, qkv_bias, n),
            ModuleSpec(p + "self_attn.o_proj", "linear", q_width, h, o_bias, n),
            ModuleSpec(p + "mlp.gate_proj", "linear", h, i, mlp_bias, n),
            ModuleSpec(p + "mlp.up_proj", "linear", h, i, mlp_bias, n),
            ModuleSpec(p + "mlp.down_proj", "linear", i, h, mlp_bias, n),
        ]
        modules.extend(layer)
        layer_params.append(sum(m.params for m in layer) + 2 * h)  # input + post-attention RMSNorm
    modules.append(ModuleSpec("lm_head", "linear", h, s["vocab_size"], False, None))
    norm_params = L * 2 * h + h  # + the final norm
    return modules, norm_params, layer_params


def meta_modules(config: dict[str, Any]) -> tuple[list[ModuleSpec], int, list[int], int]:
    """Instantiate on the meta device (no weight memory) and walk it: modules, norm params, per-layer, total."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    modules: list[ModuleSpec] = []
    counted: set[int] = set()
    for name, module in model.named_modules():
        match = re.search(r"\.layers\.(\d+)\.", name)
        layer = int(match.group(1)) if match else None
        if isinstance(module, torch.nn.Linear):
            modules.append(ModuleSpec(name, "linear", module.in_features, module.out_features, module.bias is not None, layer))
        elif isinstance(module, torch.nn.Embedding):
            modules.append(ModuleSpec(name, "embedding", module.num_embeddings, module.embedding_dim, False, layer))
        else:
            continue
        counted.update(id(p) for p in module.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    norm_params = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    num_layers = int(config["num_hidden_layers"])
    layer_params = [0] * num_layers
    for name, p in model.named_parameters():
        match = re.search(r"\.layers\.(\d+)\.", name)
        if match:
            layer_params[int(match.group(1))] += p.numel()
    return modules, norm_params, layer_params, total


def model_facts(name_or_path: str, *, force_meta: bool = False) -> ModelFacts:
    """Exact parameter counts and module shapes of a causal LM, without its weights."""
    config, source = load_model_config(name_or_path)
    return facts_from_config(config, name_or_path, source, force_meta=force_meta)


def facts_from_config(config: dict[str, Any], name_or_path: str = "<config>", source: str = "config", *,
                      force_meta: bool = False) -> ModelFacts:
    """Model facts from a config dict (e.g. `model.config.to_dict()` of a model already in memory)."""
    config = _clean(config)
    if "model_type" not in config:
        raise ModelFactsError(f"--model {name_or_path}: config has no model_type; is it a transformers config.json?")
    try:
        shape = _shape_fields(config)
    except KeyError as exc:
        raise ModelFactsError(f"--model {name_or_path}: config lacks {exc.args[0]!r} (a decoder-only LM config?)") from None
    if config["model_type"] in FORMULA_FAMILIES and not force_meta:
        modules, norm_params, layer_params = formula_modules(config)
        counted_by = "formula"
        total = norm_params + sum(m.params for m in modules if not (m.short == "lm_head" and shape["tie_word_embeddings"]))
    else:
        modules, norm_params, layer_params, total = meta_modules(config)
        counted_by = "meta-device"
    return ModelFacts(
        name=name_or_path, source=source, model_type=config["model_type"], params_total=total, modules=modules,
        norm_params=norm_params, layer_params=layer_params, counted_by=counted_by, config=config, **shape,
    )
