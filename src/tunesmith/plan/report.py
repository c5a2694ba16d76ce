"""`tunesmith plan`: put facts, counts, memory and advice together; print them; write a ready run config.

The result is a `records.plan.PlanReport` (its JSON is what `--json` prints): one `MethodPlan` per method in the
method registry, in registry order; nothing here names a method.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_text
from tunesmith.config import MethodConfig, RunConfig, resolved_yaml
from tunesmith.methods.registry import all_methods, get_method
from tunesmith.models.facts import ModelFacts, model_facts
from tunesmith.plan.advice import decide, hyperparameters
from tunesmith.plan.memory import GiB, TrainSetup, estimate_memory, gpus_needed
from tunesmith.records.plan import MethodPlan, PlanReport


def preference() -> list[str]:
    """Methods in the order the planner prefers them when several fit (`Method.plan_preference`: quality per
    FIELD.md's method table, LoRA ~ full on most tasks and cheaper)."""
    return [m.name for m in sorted(all_methods(), key=lambda m: m.plan_preference)]


class PlanError(ValueError):
    """A plan flag is malformed or contradictory; names the flag and the fix."""


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '24g', '40' (GiB) -> bytes. GPU makers' "80GB" is 80 GiB, so GB is read as GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib|t|tb|tib)?\s*", text.lower())
    if not match:
        raise PlanError(f"--gpu-memory {text!r}: expected a size like 80GB, 24GiB or 40 (GiB)")
    unit = (match.group(2) or "g")[0]
    return int(float(match.group(1)) * {"m": 1024**2, "g": GiB, "t": 1024**4}[unit])


@dataclass
class PlanRequest:
    model: str
    gpu_memory_bytes: int = 80 * GiB
    gpus: int = 1
    device: str = "cuda"
    examples: int | None = None
    task: str = "instruction"
    method: str | None = None
    rank: int | None = None
    targets: list[str] | str | None = None
    virtual_tokens: int | None = None
    batch_size: int = 4
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    master_weights: bool = False
    knowledge_changes_often: bool = False
    needs_citations: bool = False
    prompting_good_enough: bool = False
    base_too_weak: bool = False
    train_files: list[str] = field(default_factory=list)


def method_config(name: str, req: PlanRequest, params_total: int) -> MethodConfig:
    hp = hyperparameters(params_total, name, req.task, req.examples)
    options = get_method(name).plan_options(rank=req.rank or hp.rank or 16, dropout=hp.lora_dropout,
                                            targets=req.targets, virtual_tokens=req.virtual_tokens)
    return MethodConfig.model_validate({"name": name, **options})


def setup_for(req: PlanRequest) -> TrainSetup:
    dtype = "fp32" if req.device == "cpu" else "bf16"
    return TrainSetup(batch_size=req.batch_size, seq_len=req.seq_len, gradient_checkpointing=req.gradient_checkpointing,
                      weight_dtype=dtype, compute_dtype=dtype, master_weights=req.master_weights, optimizer=req.optimizer,
                      device=req.device, gpus=req.gpus, gpu_memory_bytes=req.gpu_memory_bytes)


def assumptions(req: PlanRequest, setup: TrainSetup) -> list[str]:
    where = "CPU (fp32 weights and activations)" if req.device == "cpu" else f"{req.gpus} GPU(s) of {req.gpu_memory_bytes / GiB:g} GiB, bf16 weights and activations"
    return [
        f"hardware: {where}; sizes in GiB (2^30 bytes); a GPU sold as 80GB holds 80 GiB",
        f"micro-batch {setup.batch_size} x {setup.seq_len} tokens, gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}, no gradient accumulation",
        f"optimizer {setup.optimizer}: " + ("two fp32 moments, 8 bytes per trainable parameter; fused kernel on GPU (no step temporaries)" if setup.optimizer == "adamw" else "8-bit moments, 2 bytes per trainable parameter"),
        "adapters (LoRA, prefix, prompt, bottleneck) train in fp32 (peft upcasts them); full fine-tuning trains the weights in their own dtype"
        + ("; fp32 master weights added" if setup.master_weights else "; no fp32 master copy (add one with --master-weights)"),
        "QLoRA: decoder Linear weights in NF4 (0.5 byte) + quantization constants; embeddings, norms, lm_head 16-bit",
        "activations: SDPA/flash attention (no seq^2 scores kept), LoRA dropout 0.05; logits kept in fp32 for the loss",
        "peak = persistent state + max(activations at the start of backward, gradients at the optimizer step)",
        "fits: unsharded on one GPU, or with ZeRO-3/FSDP full sharding across the given GPUs; 8% kept free for fragmentation",
        f"framework overhead: {'1 GiB CUDA context and workspaces per GPU' if req.device != 'cpu' else '48 MiB runtime scratch'}",
    ]


def model_summary(facts: ModelFacts) -> dict[str, Any]:
    return {"name": facts.name, "params_total": facts.params_total, "layers": facts.num_layers,
            "hidden_size": facts.hidden_size, "model_type": facts.model_type, "vocab_size": facts.vocab_size,
            "num_attention_heads": facts.num_heads, "num_key_value_heads": facts.num_kv_heads,
            "head_dim": facts.head_dim, "intermediate_size": facts.intermediate_size,
            "tie_word_embeddings": facts.tie_word_embeddings, "config_source": facts.source,
            "counted_by": facts.counted_by}


def build_plan(req: PlanRequest, facts: ModelFacts | None = None) -> PlanReport:
    facts = facts or model_facts(req.model)
    if req.gpus < 1:
        raise PlanError(f"--gpus {req.gpus}: need at least 1")
    setup = setup_for(req)
    methods: dict[str, MethodPlan] = {}
    for owner in all_methods():
        cfg = method_config(owner.name, req, facts.params_total)
        est = estimate_memory(facts, cfg, setup)
        unsharded = gpus_needed(est, req.gpu_memory_bytes, sharded=False)
        sharded = gpus_needed(est, req.gpu_memory_bytes, sharded=True)
        fits = unsharded is not None or (req.gpus > 1 and sharded is not None and sharded <= req.gpus)
        methods[owner.name] = MethodPlan(
            trainable_params=est.trainable_params,
            trainable_percent=round(100 * est.trainable_params / facts.params_total, 6),
            trainable_formula=est.trainable_formula, memory_bytes=est.memory_bytes(), fits=bool(fits),
            gpus_needed={"unsharded": unsharded, "sharded": sharded}, notes=est.notes,
            quant_constant_bits_per_param=est.quant_constant_bits_per_param, description=owner.description,
        )
    decision = decide(examples=req.examples, knowledge_changes_often=req.knowledge_changes_often,
                      needs_citations=req.needs_citations, prompting_good_enough=req.prompting_good_enough,
                      base_too_weak=req.base_too_weak)
    return PlanReport(
        model=model_summary(facts),
        budget={"device": req.device, "gpus": req.gpus, "gpu_memory_bytes": req.gpu_memory_bytes},
        assumptions=assumptions(req, setup),
        decision={"choice": decision.choice, "fine_tune": decision.fine_tune, "reasons": decision.reasons},
        methods=methods,
        recommendation=recommend(req, facts, methods, decision),
    )


def recommend(req: PlanRequest, facts: ModelFacts, methods: dict[str, MethodPlan], decision) -> dict[str, Any]:
    if not decision.fine_tune:
        return {"fine_tune": False, "choice": decision.choice, "method": None, "reasons": decision.reasons}
    reasons = list(decision.reasons)
    order = preference()
    if req.method:
        name = req.method
        reasons.append(f"method {name} chosen with --method")
        if not methods[name].fits:
            reasons.append(f"warning: {name} does not fit the budget (see gpus_needed)")
    else:
        fitting = [m for m in order if methods[m].fits]
        if req.task == "behaviour" and "full" in fitting:
            name = "full"
            reasons.append("wholesale behaviour change with full fine-tuning fitting the budget: full fine-tuning")
        elif fitting:
            name = fitting[0]
            skipped = order[: order.index(name)]
            reasons.append(f"{name}: the first of {', '.join(order)} that fits"
                           + (f" ({', '.join(skipped)} do not)" if skipped else ""))
        else:
            name = "qlora"
            need = methods["qlora"].gpus_needed["sharded"]
            reasons.append(f"no method fits {req.gpus} x {req.gpu_memory_bytes / GiB:g} GiB; qlora needs "
                           + (f"{need} GPUs with sharding" if need else "a larger GPU") + ", or lower --batch-size/--seq-len, or --gradient-checkpointing")
    hp = hyperparameters(facts.params_total, name, req.task, req.examples)
    reasons.extend(hp.reasons)
    return {"fine_tune": True, "choice": "fine-tune", "method": name, "fits": methods[name].fits,
            "hyperparameters": hp.as_dict(), "reasons": reasons}


def run_config(req: PlanRequest, plan: PlanReport) -> RunConfig:
    """A RunConfig for the recommended (or --method) method that `tunesmith train` accepts unchanged."""
    rec = plan.recommendation
    name = rec.get("method") or req.method or "lora"
    hp = rec.get("hyperparameters") or hyperparameters(plan.model["params_total"], name, req.task, req.examples).as_dict()
    config = RunConfig()
    config.model.name_or_path = req.model
    config.method = method_config(name, req, plan.model["params_total"])
    config.data.train = list(req.train_files)
    config.data.max_seq_len = req.seq_len
    t = config.train
    t.learning_rate = hp["learning_rate"]
    t.epochs = hp["epochs"]
    t.warmup_ratio = hp["warmup_ratio"]
    t.weight_decay = hp["weight_decay"]
    t.batch_size = req.batch_size
    t.gradient_checkpointing = req.gradient_checkpointing
    t.optimizer = req.optimizer
    return config


def write_run_config(path: str | Path, config: RunConfig) -> Path:
    """Atomic write (tunesmith.atomic): a reader sees the old file or the whole new one."""
    path = Path(path)
    write_text(path, "# written by `tunesmith plan`; edit data.train before `tunesmith train`\n" + resolved_yaml(config))
    return path


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render(plan: PlanReport, console=None) -> None:
    """Human output: a rich table of methods plus the decision, recommendation and assumptions."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 150)
    m = plan.model
    console.print(f"[bold]{m['name']}[/]: {m['params_total']:,} parameters ({m['params_total'] / 1e9:.2f}B), "
                  f"{m['layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads / "
                  f"{m['num_key_value_heads']} kv, vocab {m['vocab_size']:,} (config: {m['config_source']}, counted by {m['counted_by']})")
    table = Table(title="memory per method (GiB)")
    for col in ("method", "trainable", "%", "weights", "train.", "grads", "optim.", "activ.", "total", "GPUs (1/sharded)", "fits"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, e in plan.methods.items():
        b = e.memory_bytes
        g = e.gpus_needed
        gpus = f"{g['unsharded'] or '-'} / {g['sharded'] or '-'}"
        table.add_row(name, _human(e.trainable_params), f"{e.trainable_percent:.4g}",
                      *(f"{b[k] / GiB:.2f}" for k in ("weights", "trainable", "gradients", "optimizer", "activations", "total")),
                      gpus, "[green]yes[/]" if e.fits else "[red]no[/]")
    console.print(table)
    for name, e in plan.methods.items():
        if e.quant_constant_bits_per_param is not None:
            console.print(f"{name} quantization constants: {e.quant_constant_bits_per_param:.4f} bits/param")
    d, r = plan.decision, plan.recommendation
    console.print(f"[bold]decision:[/] {d['choice']} — " + "; ".join(d["reasons"]))
    if r.get("method"):
        hp = r["hyperparameters"]
        console.print(f"[bold]recommendation:[/] {r['method']}, learning rate {hp['learning_rate']:g} "
                      f"(range {hp['learning_rate_range'][0]:.0e}-{hp['learning_rate_range'][1]:.0e})"
                      + (f", rank {hp['rank']}, alpha {hp['alpha']}" if hp["rank"] else "")
                      + f", {hp['epochs']:g} epochs, warmup {hp['warmup_ratio']:.0%}; {hp['data_note']}")
        for reason in r["reasons"]:
            console.print(f"  - {reason}")
    console.print("[bold]assumptions:[/]")
    for line in plan.assumptions:
        console.print(f"  - {line}")
