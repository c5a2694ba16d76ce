"""Several LoRA adapters on one base: stacking (progressive LoRA) and merging (task arithmetic, TIES, DARE, SVD).

Stacking. With adapters k = 1..K active at once, peft's LoRA layers add every active adapter's delta:
    y = W x + sum_k s_k B_k A_k x,     s_k = alpha_k / r_k (alpha_k / sqrt(r_k) with rsLoRA)
Progressive LoRA (in the spirit of Progressive Networks, Rusu et al. 2016, and Progressive Prompts, Razdaibiedina
et al. 2023) trains adapter K on top of the frozen adapters 1..K-1: only adapter K has requires_grad, each adapter
keeps its own weights and is saved in its own PEFT folder, and evaluating task j uses adapters 1..j (the task's
identity is known at test time), so earlier tasks cannot be forgotten by construction.

O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning") adds to the new
adapter's loss lambda * sum over LoRA layers and frozen adapters i of ||A_i A_new^T||_F^2 (peft's lora_A weight is
r x in, so A_i A_new^T is the r_i x r_new matrix of inner products between the two adapters' input subspaces): the
new task learns in directions orthogonal to the earlier tasks', so all adapters can stay active at inference with
no task identity (`OrthogonalPenalty`; the paper's extra L2 term on the new adapter is not included).

Merging reuses peft's `add_weighted_adapter` (no merge arithmetic is re-implemented here):
- `cat`: A = concat_k(w_k s_k A_k), B = concat_k(B_k), rank sum_k r_k, scaling 1, so B A = sum_k w_k s_k B_k A_k:
  with weights 1 this is exactly the stacked model (task arithmetic, Ilharco et al. 2023, on LoRA deltas).
- `svd`: the same sum of deltas, truncated to rank max r_k by SVD (approximate).
- `linear`: w-weighted sums of the A's and of the B's separately (peft's rough approximation; needs equal ranks).
- `ties` (Yadav et al. 2023), `dare_linear` / `dare_ties` (Yu et al. 2024): trim/drop and sign-elect the deltas
  with `density`; approximate by design (DARE's drop is random).
Every merge reports its logit drift against the stacked model on fixed probe inputs (`logit_drift`), so the
approximate merges say how far they moved; a test holds `cat` to the stacked logits at 1e-5.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from tunesmith.atomic import atomic_dir
from tunesmith.methods.base import MethodError
from tunesmith.methods.dropout import use_bulk_dropout

COMBINATIONS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "ties_svd", "dare_linear_svd")
EXACT = ("cat",)
PROBE_TEXTS = (
    "The supplier shall indemnify the buyer against all claims.",
    "Either party may terminate this agreement with 30 days' notice.",
    "Hello! How are you today?",
)


def _check_lora_folder(directory: Path) -> Path:
    directory = Path(directory)
    if (directory / "adapter").is_dir():
        directory = directory / "adapter"
    if not (directory / "adapter_model.safetensors").exists():
        raise MethodError(f"{directory}: no adapter_model.safetensors (a LoRA adapter folder or a run directory "
                          "with adapter/ is expected)")
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise MethodError(f"{directory}: a {config.get('peft_type')} adapter; stacking and merging need LoRA")
    return directory


def load_stack(base, adapters: dict[str, str | Path], trainable: bool = False) -> PeftModel:
    """The base with every named adapter loaded and all of them active (their deltas add). Frozen unless
    `trainable`; adapter names are the dict's keys, in its order."""
    if not adapters:
        raise MethodError("no adapters to stack")
    names = list(adapters)
    folders = [_check_lora_folder(Path(adapters[n])) for n in names]
    model = PeftModel.from_pretrained(base, folders[0], adapter_name=names[0], is_trainable=trainable)
    for name, folder in zip(names[1:], folders[1:], strict=True):
        model.load_adapter(folder, adapter_name=name, is_trainable=trainable)
    activate(model, names, trainable=names if trainable else [])
    return model


def activate(model: PeftModel, names: list[str], trainable: list[str] = ()) -> None:
    """Make `names` the active adapters (deltas summed); only the adapters in `trainable` get gradients."""
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise MethodError(f"no adapter named {missing[0]!r}; loaded: {', '.join(model.peft_config)}")
    model.base_model.set_adapter(list(names), inference_mode=not trainable)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            adapter = _adapter_of(name)
            param.requires_grad_(adapter in trainable)


def _adapter_of(param_name: str) -> str:
    # "...q_proj.lora_A.task2.weight" -> "task2"
    parts = param_name.split(".")
    index = next(i for i, p in enumerate(parts) if p.startswith("lora_"))
    return parts[index + 1]


def add_progressive_adapter(model: PeftModel, name: str, lora_config, frozen: list[str]) -> PeftModel:
    """Add adapter `name` on top of the frozen adapters `frozen`: all active, only `name` trainable."""
    if name in model.peft_config:
        raise MethodError(f"an adapter named {name!r} is already loaded")
    model.add_adapter(name, lora_config)
    use_bulk_dropout(model)  # the new adapter's dropout, as LoraMethod.apply does (methods/dropout.py)
    activate(model, [*frozen, name], trainable=[name])
    return model


class OrthogonalPenalty:
    """A loss term for LoopContext.loss_terms: term(model) -> ("orthogonal_penalty", lam * sum ||A_i A_new^T||_F^2)
    over every LoRA layer that holds both the new adapter and a frozen one (the frozen A's carry no gradient)."""

    name = "orthogonal_penalty"

    def __init__(self, lam: float, new: str, frozen: list[str]):
        if not frozen:
            raise MethodError("the orthogonality penalty needs at least one frozen adapter to be orthogonal to")
        self.lam, self.new, self.frozen = lam, new, list(frozen)

    def pairs(self, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(frozen A, new A) for every LoRA layer and frozen adapter; raises if the new adapter is nowhere."""
        out = []
        for module in getattr(model, "module", model).modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or self.new not in lora_a:
                continue
            out += [(lora_a[old].weight.detach(), lora_a[self.new].weight) for old in self.frozen if old in lora_a]
        if not out:
            raise MethodError(f"no LoRA layer holds both adapter {self.new!r} and one of {self.frozen}")
        return out

    def __call__(self, model) -> tuple[str, torch.Tensor]:
        total = sum((old.float() @ new.float().T).pow(2).sum() for old, new in self.pairs(model))
        return self.name, self.lam * total


def merge_adapters(model: PeftModel, names: list[str], new_name: str, combination: str = "cat",
                   weights: list[float] | None = None, density: float | None = None) -> dict[str, Any]:
    """Add `new_name` = merge of `names` (peft add_weighted_adapter) and make it the only active adapter.

    Returns {"combination", "adapters", "weights", "density", "rank", "exact"}.
    """
    if combination not in COMBINATIONS:
        raise MethodError(f"unknown combination {combination!r}; choose one of {', '.join(COMBINATIONS)}")
    weights = list(weights) if weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise MethodError(f"{len(weights)} weights for {len(names)} adapters")
    if combination in ("ties", "dare_linear", "dare_ties", "ties_svd", "dare_linear_svd") and density is None:
        density = 0.5
    configs = [model.peft_config[n] for n in names]
    if combination == "cat" and any(c.use_rslora for c in configs):
        raise MethodError("cat merge of rsLoRA adapters is not exact in peft (the merged adapter keeps rsLoRA "
                          "scaling); use svd, or adapters trained without use_rslora")
    if combination in ("linear", "ties", "dare_linear", "dare_ties") and len({c.r for c in configs}) > 1:
        raise MethodError(f"{combination} merge needs equal ranks, got {[c.r for c in configs]}; use cat, svd or "
                          f"the _svd variant (ties_svd, dare_linear_svd)")
    model.add_weighted_adapter(names, weights, new_name, combination_type=combination, density=density)
    activate(model, [new_name])
    return {"combination": combination, "adapters": list(names), "weights": weights, "density": density,
            "rank": model.peft_config[new_name].r, "exact": combination in EXACT and all(w == 1.0 for w in weights)}


def save_adapter(model: PeftModel, name: str, directory: str | Path, base_model: str | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write adapter `name` alone as a flat PEFT folder (adapter_config.json + adapter_model.safetensors),
    atomically; `extra` goes to tunesmith_combine.json (lineage: stacked on / merged from)."""
    directory = Path(directory)
    if base_model:
        model.peft_config[name].base_model_name_or_path = base_model
    with tempfile.TemporaryDirectory(dir=directory.parent if directory.parent.exists() else None) as scratch:
        model.save_pretrained(scratch, selected_adapters=[name], safe_serialization=True, save_embedding_layers=False)
        written = Path(scratch) / name if name != "default" else Path(scratch)
        with atomic_dir(directory) as tmp:
            for item in written.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
            if extra:
                (tmp / "tunesmith_combine.json").write_text(json.dumps(extra, indent=2) + "\n")
    return directory


@torch.no_grad()
def probe_logits(model, tokenizer, texts: tuple[str, ...] = PROBE_TEXTS) -> torch.Tensor:
    """(real tokens, vocab) fp32 logits on fixed probe texts (padding positions dropped)."""
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    model.train(was_training)
    return logits.float().cpu()[batch["attention_mask"].bool()]


def logit_drift(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """max and mean |logit difference| between two probe_logits results."""
    diff = (reference - other).abs()
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean())}
