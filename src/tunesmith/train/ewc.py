"""Elastic weight consolidation (Kirkpatrick et al., 2017, PNAS 114(13), eq. 3), diagonal, over trainable parameters.

After task t the run estimates the diagonal Fisher information of its trainable parameters at the trained values
theta*_t, and the next run adds

    penalty(theta) = (lambda / 2) * sum_terms sum_i F_i (theta_i - theta*_i)^2

to its loss (logged as `ewc_penalty` beside train_loss through LoopContext.loss_terms). For LoRA the parameters
are the adapter's A and B matrices (the continued run trains the same adapter), for full fine-tuning every
trainable weight: whatever `requires_grad` says, keyed by parameter name.

Which Fisher: the EMPIRICAL Fisher, from per-example gradients of the observed labels' loss,

    F_i = (1 / N) * sum_{n=1..N} ( d l_n / d theta_i )^2,   l_n = mean token cross-entropy of example n's targets

over the first N training examples of the run (N = continual.ewc_examples, default 64), one backward per example
(batch size 1, so each gradient is one example's; no packing). The expected Fisher would sample the targets from
the model instead of using the labels; it needs generation per example and is not implemented. Using the mean
(not the sum) over an example's tokens keeps lambda's scale independent of answer length.

Several tasks: online EWC (Schwarz et al., 2018, "Progress & Compress", sec. 2.2; Huszar, 2018) by default:
    F <- gamma * F_prev + F_t,   theta* <- theta*_t     (one term; gamma = continual.ewc_gamma, default 1)
or, with continual.ewc_online = false, one term per earlier task with its own (F_t, theta*_t), summed (the
original multi-penalty form; memory grows with the number of tasks).

Storage: `ewc.safetensors` in the run directory: tensors `t{k}.fisher.{param}` and `t{k}.anchor.{param}` in fp32,
metadata {"format": "tunesmith-ewc/1", "fisher": "empirical", "examples", "online", "gamma", "tasks"}; reloading
gives bit-identical tensors (a test holds it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.atomic import atomic_file
from tunesmith.errors import UsageError

FORMAT = "tunesmith-ewc/1"
FILE_NAME = "ewc.safetensors"


class EwcError(UsageError):
    """The stored Fisher does not fit the model being trained (names or shapes); says which."""


@dataclass
class EwcTerm:
    fisher: dict[str, torch.Tensor]  # name -> F_i, same shape as the parameter, fp32, CPU
    anchor: dict[str, torch.Tensor]  # name -> theta*_i
    task: str = ""


@dataclass
class EwcState:
    terms: list[EwcTerm] = field(default_factory=list)
    examples: int = 0
    online: bool = True
    gamma: float = 1.0

    def accumulate(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], task: str,
                   examples: int) -> EwcState:
        """The state after one more task (see the module docstring: online or one term per task)."""
        new = EwcTerm({k: v.detach().float().cpu().clone() for k, v in fisher.items()},
                      {k: v.detach().float().cpu().clone() for k, v in anchor.items()}, task)
        if not self.online or not self.terms:
            return EwcState([*self.terms, new], examples, self.online, self.gamma)
        (previous,) = self.terms
        if previous.fisher.keys() != new.fisher.keys():
            raise EwcError(f"online EWC needs the same parameters in every task; differing names: "
                           f"{sorted(previous.fisher.keys() ^ new.fisher.keys())[:3]}")
        merged = {k: self.gamma * previous.fisher[k] + new.fisher[k] for k in new.fisher}
        tasks = f"{previous.task}+{task}" if previous.task else task
        return EwcState([EwcTerm(merged, new.anchor, tasks)], examples, self.online, self.gamma)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for k, term in enumerate(self.terms):
            for name, value in term.fisher.items():
                tensors[f"t{k}.fisher.{name}"] = value.contiguous()
                tensors[f"t{k}.anchor.{name}"] = term.anchor[name].contiguous()
        metadata = {"format": FORMAT, "fisher": "empirical", "examples": str(self.examples),
                    "online": json.dumps(self.online), "gamma": repr(self.gamma),
                    "tasks": json.dumps([t.task for t in self.terms])}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> EwcState:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise EwcError(f"{path}: no stored Fisher (was the earlier run trained with continual.ewc_lambda > 0?)")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise EwcError(f"{path}: not a tunesmith EWC file (format {metadata.get('format')!r})")
            tasks = json.loads(metadata["tasks"])
            terms = [EwcTerm({}, {}, task) for task in tasks]
            for key in handle.keys():
                index, kind, name = key.split(".", 2)
                getattr(terms[int(index[1:])], kind)[name] = handle.get_tensor(key)
        return cls(terms, int(metadata["examples"]), json.loads(metadata["online"]), float(metadata["gamma"]))


def ewc_penalty(params: dict[str, torch.Tensor], terms: list[EwcTerm], lam: float) -> torch.Tensor:
    """(lam / 2) * sum_terms sum_i F_i (theta_i - theta*_i)^2, in the parameters' dtype (fp32 or fp64)."""
    total = None
    for term in terms:
        for name, fisher in term.fisher.items():
            theta = params[name]
            diff = theta - term.anchor[name].to(theta.device, theta.dtype)
            value = (fisher.to(theta.device, theta.dtype) * diff * diff).sum()
            total = value if total is None else total + value
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total


class EwcPenalty:
    """A loss term for LoopContext.loss_terms: term(model) -> ("ewc_penalty", value)."""

    name = "ewc_penalty"

    def __init__(self, state: EwcState, lam: float):
        self.state, self.lam = state, lam

    def check(self, model) -> None:
        """Every stored name must be a trainable parameter of the same shape; raises EwcError naming the first few."""
        params = dict(getattr(model, "module", model).named_parameters())
        for term in self.state.terms:
            missing = [n for n in term.fisher if n not in params or not params[n].requires_grad]
            if missing:
                raise EwcError(f"the stored Fisher names {len(missing)} parameter(s) this model does not train, e.g. "
                               f"{missing[:2]}: EWC needs the earlier run's method and adapter (continue_from)")
            shapes = [n for n, f in term.fisher.items() if tuple(f.shape) != tuple(params[n].shape)]
            if shapes:
                raise EwcError(f"stored Fisher shape differs for {shapes[:2]} (different rank or model?)")

    def __call__(self, model) -> tuple[str, torch.Tensor]:
        params = dict(getattr(model, "module", model).named_parameters())
        return self.name, ewc_penalty(params, self.state.terms, self.lam)


def estimate_fisher(model, method, examples: list[Any], pad_token_id: int, precision: str = "fp32",
                    max_examples: int = 64) -> tuple[dict[str, torch.Tensor], int]:
    """Empirical diagonal Fisher over the first `max_examples` rendered examples (data.render.Example).

    One forward/backward per example with batch size 1: grad of that example's mean token loss, squared, averaged.
    Returns ({name: F (fp32, CPU)}, examples used). Leaves the model's gradients cleared and its mode unchanged.
    """
    from tunesmith.data.pack import collate, single_packs
    from tunesmith.train.loop import forward_loss

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise EwcError("the model has no trainable parameters to estimate a Fisher for")
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher is a property of the trained parameters, not of dropout masks
    used = 0
    for pack in single_packs(examples[:max_examples]):
        batch = collate([pack], pad_token_id, block_mask=False)
        loss_sum, count = forward_loss(model, method, batch, precision, device)
        if count == 0:
            continue
        model.zero_grad(set_to_none=True)
        (loss_sum / count).backward()
        for name, param in params.items():
            if param.grad is not None:
                fisher[name] += param.grad.detach().float().cpu() ** 2
        used += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if used == 0:
        raise EwcError("no example had a target token; cannot estimate the Fisher")
    return {n: f / used for n, f in fisher.items()}, used


def trainable_values(model) -> dict[str, torch.Tensor]:
    """theta*: the trainable parameters' current values by name (fp32, CPU copies)."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
