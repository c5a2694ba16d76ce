"""`tunesmith plan`: facts, counts, the solver's configuration per method, the choice, and a run config that fits.

For every method in the registry (registry order; nothing here names a method except the practitioner's rules in
`recommend`), plan/solve.py finds the cheapest knobs that fit the budget. The result is a
`records.plan.PlanReport` (its JSON is what `--json` prints); `--write` turns the chosen method's solution into a
run config whose planned peak is within the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_text
from tunesmith.config import MethodConfig, RunConfig, resolved_yaml
from tunesmith.errors import UsageError
from tunesmith.methods.registry import all_methods, get_method
from tunesmith.models.facts import ModelFacts, model_facts
from tunesmith.plan.advice import decide, hyperparameters
from tunesmith.plan.memory import CPU_CHECKPOINT_SPREAD, OVERHEAD_BYTES, GiB, gpus_needed, retention_share
from tunesmith.plan.solve import USABLE_FRACTION, Budget, Knobs, Start, evaluate, launch_line, solve, train_dtypes
from tunesmith.records.plan import MethodPlan, PlanReport


def preference() -> list[str]:
    """Methods in the order the planner prefers them when several fit (`Method.plan_preference`: quality per
    FIELD.md's method table, LoRA ~ full on most tasks and cheaper)."""
    return [m.name for m in sorted(all_methods(), key=lambda m: m.plan_preference)]


class PlanError(UsageError):
    """A plan flag is malformed or contradictory; names the flag and the fix."""


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '24g', '40' (GiB) -> bytes. GPU makers' "80GB" is 80 GiB, so GB is read as GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib|t|tb|tib)?\s*", text.lower())
    if not match:
        raise PlanError(f"--gpu-memory {text!r}: expected a size like 80GB, 24GiB or 40 (GiB)")
    unit = (match.group(2) or "g")[0]
    return int(float(match.group(1)) * {"m": 1024**2, "g": GiB, "t": 1024**4}[unit])


DEFAULT_EFFECTIVE_BATCH = 16  # sequences per optimizer step (FIELD.md: 4-128 through accumulation)
MANY_VARIANTS = 10  # --variants at or above this asks for many cheap task variants
FULL_JUSTIFIED_EXAMPLES = 50_000  # FIELD.md: wholesale behaviour change needs 50,000+ examples


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
    effective_batch: int = DEFAULT_EFFECTIVE_BATCH
    variants: int | None = None  # how many task variants the user wants (many cheap ones: prompt learning)


def method_config(name: str, req: PlanRequest, params_total: int) -> MethodConfig:
    hp = hyperparameters(params_total, name, req.task, req.examples)
    options = get_method(name).plan_options(rank=req.rank or hp.rank or 16, dropout=hp.lora_dropout,
                                            targets=req.targets, virtual_tokens=req.virtual_tokens)
    return MethodConfig.model_validate({"name": name, **options})


def budget_for(req: PlanRequest) -> Budget:
    return Budget(req.device, req.gpu_memory_bytes, 1 if req.device == "cpu" else req.gpus)


def start_for(req: PlanRequest, labelled_fraction: float | None = None) -> Start:
    return Start(batch_size=req.batch_size, effective_batch=req.effective_batch, seq_len=req.seq_len,
                 optimizer=req.optimizer, gradient_checkpointing=req.gradient_checkpointing,
                 master_weights=req.master_weights,
                 labelled_fraction=1.0 if labelled_fraction is None else labelled_fraction)


def precision_assumption(device: str, precision: str = "auto", model_dtype: str = "auto") -> str:
    """What the plan assumes about weight and compute dtypes: what `tunesmith train` will do on this machine."""
    if device != "cpu":
        return "bf16 weights and activations"
    weights, compute = train_dtypes(device, precision, model_dtype)
    if weights == "fp32" and compute == "bf16":
        return ("fp32 weights under bf16 autocast (train.precision auto: this CPU runs bf16 natively, AVX512-BF16/AMX): "
                "residual stream, norms and the loss in fp32, matmul and attention inputs in bf16, and a bf16 copy of "
                "every matmul weight (decoder Linears + head) kept for the backward pass")
    if weights == "fp32":
        return "fp32 weights and activations (train.precision auto: no native bf16 on this CPU)"
    return f"{weights} weights and activations"


def cpu_heap_assumption(start: Start) -> str:
    """What the CPU peak adds for glibc's heap (plan/memory.py: fitted shares, by precision, checkpointing and, in
    fp32, by method)."""
    autocast = train_dtypes("cpu", start.precision, start.model_dtype) == ("fp32", "bf16")
    kept = "the freed activation heap kept through the optimizer step + " if autocast else ""
    ckpt = retention_share("cpu", autocast, True)
    if autocast:
        plain = retention_share("cpu", autocast, False)
        shares = f"{plain:.0%}" + (f" ({ckpt:.0%} with checkpointing)" if ckpt != plain else "")
    else:
        per_method = ", ".join(f"{m.name} {retention_share('cpu', False, False, m.cpu_fp32_heap_share):.0%}"
                               for m in all_methods())
        shares = f"a share by method ({per_method}; {ckpt:.0%} with checkpointing)"
    return (f"; CPU (whole-process RSS, glibc malloc): + {kept}{shares} of the forward pass's layer allocations "
            f"(heap retention, fitted on other shapes than those docs/benchmarks.md reports); with checkpointing "
            f"{CPU_CHECKPOINT_SPREAD}")


def assumptions(req: PlanRequest, start: Start, data: dict | None) -> list[str]:
    where = (f"CPU ({precision_assumption('cpu', start.precision, start.model_dtype)})" if req.device == "cpu"
             else f"{req.gpus} GPU(s) of {req.gpu_memory_bytes / GiB:g} GiB, bf16 weights and activations")
    labelled = ("every position labelled (the upper bound; pass --data to measure the share)" if data is None
                or data.get("labelled_fraction") is None else f"{data['labelled_fraction']:.1%} of positions labelled (measured on --data)")
    return [
        f"hardware: {where}; sizes in GiB (2^30 bytes); a GPU sold as 80GB holds 80 GiB; {1 - USABLE_FRACTION:.0%} of each kept free for fragmentation",
        f"search starts at micro-batch {start.batch_size} x {start.seq_len} tokens, effective batch {start.effective_batch} "
        "sequences kept through gradient accumulation, then turns: checkpointing (~4/3 step time), smaller micro-batch, "
        "8-bit paged AdamW, sharding (--gpus > 1), shorter sequences (last resort), CPU offload",
        f"optimizer {start.optimizer}: two fp32 moments, 8 bytes per trainable parameter (8-bit AdamW: 2); fused kernel on GPU (no step temporaries)",
        "adapters (LoRA, prefix, prompt, bottleneck) train in fp32 (peft upcasts them); full fine-tuning trains the weights in their own dtype"
        + ("; fp32 master weights added" if start.master_weights else "; no fp32 master copy (add one with --master-weights)"),
        "QLoRA: decoder Linear weights in NF4 (0.5 byte) + quantization constants; embeddings, norms, lm_head in the loaded dtype (bf16 on GPU, fp32 on CPU)",
        ("activations: SDPA, packed rows attended per example (one causal SDPA call per example, no mask kept; "
         "prefix/prompt tuning do not pack), " if req.device == "cpu" else
         "activations: SDPA/flash attention (no seq x seq scores kept; packing's 4-D block mask, batch x seq^2, kept once), ")
        + "LoRA dropout 0.05; the loss computes logits only "
        f"at labelled positions (tunesmith's trainer; prompt tuning takes the full-logits path), fp32 for the loss: {labelled}; "
        "head and loss run in chunks of up to 512 positions, no logits-sized buffers (models whose config rescales or caps "
        "the logits after the head keep whole logits)",
        "peak = persistent state + max(activations at the start of backward, gradients at the optimizer step); with accumulation the gradients are added"
        + (cpu_heap_assumption(start) if req.device == "cpu" else ""),
        "sharded = FSDP2 full sharding (train.sharding=fsdp, launched with torchrun; parameters, gradients, optimizer / N, "
        "+ two unsharded layers; prompt learning is not sharded); replicated = data parallel; QLoRA under FSDP2 is not tested by tunesmith",
        "learning rate not scaled: the effective batch is kept constant by gradient accumulation",
        "framework overhead: " + ("1 GiB CUDA context and workspaces per GPU" if req.device != "cpu" else
                                  f"{OVERHEAD_BYTES['cpu'] / 2**20:,.0f} MiB, the Python/torch runtime of `tunesmith train` "
                                  "(measured: bench/memory_accuracy.py's calibration case)"),
    ]


def build_plan(req: PlanRequest, facts: ModelFacts | None = None) -> PlanReport:
    facts = facts or model_facts(req.model)
    if req.gpus < 1:
        raise PlanError(f"--gpus {req.gpus}: need at least 1")
    if req.effective_batch < 1 or req.batch_size < 1:
        raise PlanError("--batch-size and --effective-batch must be at least 1")
    profile = None
    if req.train_files:
        from tunesmith.plan.data import profile_data

        profile = profile_data(req.train_files, req.model, req.seq_len)
    budget = budget_for(req)
    start = start_for(req, profile.labelled_fraction if profile else None)
    methods: dict[str, MethodPlan] = {}
    for owner in all_methods():
        cfg = method_config(owner.name, req, facts.params_total)
        sol = solve(facts, cfg, budget, start, truncation=profile.truncation if profile else None)
        est = sol.estimate
        methods[owner.name] = MethodPlan(
            trainable_params=est.trainable_params,
            trainable_percent=round(100 * est.trainable_params / facts.params_total, 6),
            trainable_formula=est.trainable_formula, memory_bytes=est.memory_bytes(), fits=sol.fits,
            gpus_needed={"unsharded": gpus_needed(est, req.gpu_memory_bytes, sharded=False),
                         "sharded": gpus_needed(est, req.gpu_memory_bytes, sharded=True) if req.device != "cpu" else None},
            notes=est.notes, quant_constant_bits_per_param=est.quant_constant_bits_per_param,
            description=owner.description, solution=sol.as_dict(), why_not=sol.why_not,
        )
    decision = decide(examples=req.examples, knowledge_changes_often=req.knowledge_changes_often,
                      needs_citations=req.needs_citations, prompting_good_enough=req.prompting_good_enough,
                      base_too_weak=req.base_too_weak)
    data = profile.as_dict() if profile else None
    budget_record = {"device": req.device, "gpus": budget.gpus, "gpu_memory_bytes": req.gpu_memory_bytes,
                     "usable_bytes_per_gpu": budget.usable, "effective_batch": req.effective_batch}
    if data:
        budget_record["data"] = data
    return PlanReport(
        model=model_summary(facts), budget=budget_record, assumptions=assumptions(req, start, data),
        decision={"choice": decision.choice, "fine_tune": decision.fine_tune, "reasons": decision.reasons},
        methods=methods, recommendation=recommend(req, facts, methods, decision),
    )


def model_summary(facts: ModelFacts) -> dict[str, Any]:
    return {"name": facts.name, "params_total": facts.params_total, "layers": facts.num_layers,
            "hidden_size": facts.hidden_size, "model_type": facts.model_type, "vocab_size": facts.vocab_size,
            "num_attention_heads": facts.num_heads, "num_key_value_heads": facts.num_kv_heads,
            "head_dim": facts.head_dim, "intermediate_size": facts.intermediate_size,
            "tie_word_embeddings": facts.tie_word_embeddings, "config_source": facts.source,
            "counted_by": facts.counted_by}


def _knobs_text(entry: MethodPlan) -> str:
    sol = entry.solution or {}
    turned = sol.get("turned") or []
    return ", ".join(turned) if turned else "no knob needed"


def _heaviness(entry: MethodPlan) -> tuple:
    """What ranks fitting methods before the preference order: CPU offload (much slower; the host holds every
    state), then truncated sequences (lossy), then under offload the weights streamed from the host each step."""
    knobs = (entry.solution or {}).get("knobs", {})
    offload = bool(knobs.get("cpu_offload"))
    truncated = (entry.solution or {}).get("shortened_from") is not None
    return (offload, truncated, entry.memory_bytes["weights"] + entry.memory_bytes["trainable"] if offload else 0)


def full_is_justified(req: PlanRequest) -> str | None:
    """Full fine-tuning earns its memory only for wholesale behaviour change with the data for it (FIELD.md)."""
    if req.task == "behaviour":
        return "wholesale behaviour change: full fine-tuning has the capacity LoRA lacks for it"
    if req.examples is not None and req.examples >= FULL_JUSTIFIED_EXAMPLES:
        return f"{req.examples:,} examples (>= {FULL_JUSTIFIED_EXAMPLES:,}): enough data to use full fine-tuning's capacity"
    return None


def recommend(req: PlanRequest, facts: ModelFacts, methods: dict[str, MethodPlan], decision) -> dict[str, Any]:
    """Choose like a practitioner: the simplest method that fits, with every reason said (issue 19)."""
    if not decision.fine_tune:
        return {"fine_tune": False, "choice": decision.choice, "method": None, "reasons": decision.reasons}
    reasons = list(decision.reasons)
    order = preference()
    fitting = sorted((m for m in order if methods[m].fits), key=lambda m: _heaviness(methods[m]) + (order.index(m),))
    name = None
    if req.method:
        name = req.method
        reasons.append(f"method {name} chosen with --method")
        if not methods[name].fits:
            reasons.append(f"warning: {name} {methods[name].why_not}")
    elif req.variants and req.variants >= MANY_VARIANTS:
        cheap = [m for m in fitting if get_method(m).uses_virtual_tokens]
        if cheap:
            # Prompt tuning closes the gap to full fine-tuning at ~10B parameters (Lester et al. 2021); below that
            # prefix tuning (keys/values at every layer) is the stronger of the two.
            name = next((m for m in cheap if m == "prompt"), cheap[0]) if facts.params_total >= 1e10 else \
                next((m for m in cheap if m == "prefix"), cheap[0])
            size = methods[name].trainable_params * 4
            reasons.append(f"{req.variants} task variants: {name} tuning stores {size / 1024:.0f} KiB per variant and "
                           "serves every variant from one unchanged base; quality 80-95% of full fine-tuning (FIELD.md)")
    if name is None and "full" in fitting and full_is_justified(req) and not _heaviness(methods["full"])[0]:
        name = "full"
        reasons.append(f"full fine-tuning fits ({_knobs_text(methods['full'])}) and {full_is_justified(req)}")
    if name is None and fitting:
        name = next(m for m in fitting if m != "full") if any(m != "full" for m in fitting) else fitting[0]
        if "full" in fitting and name != "full":
            reasons.append(f"full fine-tuning fits too ({_knobs_text(methods['full'])}), but the {req.task} task with "
                           f"{'an unknown number of' if req.examples is None else f'{req.examples:,}'} examples does not call for "
                           f"it: LoRA reaches 95-100% of full fine-tuning on most tasks (FIELD.md); full is chosen for "
                           f"wholesale behaviour change or {FULL_JUSTIFIED_EXAMPLES:,}+ examples")
        skipped = [m for m in order[: order.index(name)] if m != "full" and not methods[m].fits]
        if skipped:
            reasons.append(f"{', '.join(skipped)} do{'es' if len(skipped) == 1 else ''} not fit: "
                           + "; ".join(f"{m} {methods[m].why_not}" for m in skipped))
        heavier = [m for m in order[: order.index(name)] if m != "full" and methods[m].fits]
        if heavier:
            reasons.append(f"{', '.join(heavier)} fit only with costlier knobs ("
                           + "; ".join(f"{m}: {_knobs_text(methods[m])}" for m in heavier)
                           + f"); {name} needs less")
        if name == "lora" and "qlora" in fitting:
            reasons.append("lora and qlora both fit: LoRA on the 16-bit base is faster (no dequantization in every "
                           "matmul) and has no quantization error (LoRA 95-100% of full fine-tuning, QLoRA 92-98%, FIELD.md)")
        reasons.append(f"{name}: {_knobs_text(methods[name])}")
    if name is None:
        name = min(methods, key=lambda m: (methods[m].solution or {}).get("per_gpu_bytes", float("inf")))
        reasons.append(f"no method fits; the closest is {name}: {methods[name].why_not}")
    hp = hyperparameters(facts.params_total, name, req.task, req.examples)
    reasons.extend(hp.reasons)
    reasons.append("learning rate not scaled with the micro-batch: gradient accumulation keeps the effective batch")
    return {"fine_tune": True, "choice": "fine-tune", "method": name, "fits": methods[name].fits,
            "hyperparameters": hp.as_dict(), "solution": methods[name].solution, "reasons": reasons}


def knobs_of(plan: PlanReport, name: str) -> Knobs:
    sol = plan.methods[name].solution or {}
    values = {k: v for k, v in sol.get("knobs", {}).items() if k != "effective_batch"}
    return Knobs(**values)


def run_config(req: PlanRequest, plan: PlanReport) -> RunConfig:
    """A RunConfig for the recommended (or --method) method with the solver's knobs; `tunesmith train` accepts it."""
    rec = plan.recommendation
    name = rec.get("method") or req.method or "lora"
    hp = rec.get("hyperparameters") or hyperparameters(plan.model["params_total"], name, req.task, req.examples).as_dict()
    knobs = knobs_of(plan, name)
    config = RunConfig()
    config.model.name_or_path = req.model
    config.method = method_config(name, req, plan.model["params_total"])
    config.data.train = list(req.train_files)
    config.data.max_seq_len = knobs.max_seq_len
    if not get_method(name).supports_packing:
        config.data.packing = False
    t = config.train
    t.learning_rate = hp["learning_rate"]
    t.epochs = hp["epochs"]
    t.warmup_ratio = hp["warmup_ratio"]
    t.weight_decay = hp["weight_decay"]
    t.batch_size = knobs.batch_size
    t.gradient_accumulation_steps = knobs.gradient_accumulation_steps
    t.gradient_checkpointing = knobs.gradient_checkpointing
    t.optimizer = knobs.optimizer
    if knobs.strategy == "sharded":
        t.sharding = "fsdp"
        t.fsdp_cpu_offload = knobs.cpu_offload
    return config


def planned_peak(config: RunConfig, budget: Budget, strategy: str | None = None, labelled_fraction: float | None = None,
                 facts: ModelFacts | None = None) -> int:
    """The planner's per-GPU peak for a run config as written (what `--write` promises and the bench measures);
    the strategy follows the config (train.sharding, train.fsdp_cpu_offload) unless given."""
    facts = facts or model_facts(config.model.name_or_path)
    t = config.train
    if strategy is None:
        strategy = "sharded" if t.sharding == "fsdp" and budget.gpus > 1 else "replicated" if budget.gpus > 1 else "single"
    processes = budget.gpus if strategy != "single" else 1
    knobs = Knobs(t.gradient_checkpointing, t.batch_size, t.gradient_accumulation_steps, t.optimizer,
                  config.data.max_seq_len, strategy, processes, strategy == "sharded" and t.fsdp_cpu_offload)
    start = Start(batch_size=t.batch_size, effective_batch=knobs.effective_batch, seq_len=config.data.max_seq_len,
                  optimizer=t.optimizer, gradient_checkpointing=t.gradient_checkpointing,
                  labelled_fraction=1.0 if labelled_fraction is None else labelled_fraction,
                  precision=t.precision, model_dtype=config.model.dtype)
    _est, peak, _by = evaluate(facts, config.method, knobs, budget, start)
    return peak


def write_run_config(path: str | Path, config: RunConfig, plan: PlanReport | None = None) -> Path:
    """Atomic write (tunesmith.atomic): a reader sees the old file or the whole new one. The header says how the
    plan sized it and the command that launches it (N processes, FSDP2 for sharded plans)."""
    path = Path(path)
    header = ["# written by `tunesmith plan`; edit data.train before `tunesmith train`"]
    if plan is not None:
        name = config.method.name
        entry = plan.methods.get(name)
        sol = (entry.solution or {}) if entry else {}
        if sol:
            knobs = Knobs(**{k: v for k, v in sol["knobs"].items() if k != "effective_batch"})
            header.append(f"# planned peak {sol['per_gpu_bytes'] / GiB:.2f} GiB per "
                          f"{'GPU' if plan.budget['device'] != 'cpu' else 'process'} of {sol['usable_bytes'] / GiB:.2f} GiB usable"
                          f" ({'fits' if entry.fits else 'DOES NOT FIT'}); effective batch {knobs.effective_batch} = "
                          f"{knobs.batch_size} x {knobs.gradient_accumulation_steps} accumulation"
                          + (f" x {knobs.gpus} processes" if knobs.strategy != "single" else ""))
            header.append(f"# launch: {launch_line(knobs, str(path))}")
    write_text(path, "\n".join(header) + "\n" + resolved_yaml(config))
    return path


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render(plan: PlanReport, console=None) -> None:
    """Human output: a rich table of methods with the solver's knobs, then the decision, recommendation and
    assumptions."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    m = plan.model
    console.print(f"[bold]{m['name']}[/]: {m['params_total']:,} parameters ({m['params_total'] / 1e9:.2f}B), "
                  f"{m['layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads / "
                  f"{m['num_key_value_heads']} kv, vocab {m['vocab_size']:,} (config: {m['config_source']}, counted by {m['counted_by']})")
    b = plan.budget
    per = "GPU" if b["device"] != "cpu" else "host"
    table = Table(title=f"cheapest configuration per method that fits {b['gpus']} x {b['gpu_memory_bytes'] / GiB:g} GiB "
                        f"({b['usable_bytes_per_gpu'] / GiB:.1f} GiB usable per {per})")
    for col in ("method", "trainable", "%", "weights", "optim.", "activ.", f"peak/{per}", "repl./shard.", "step time",
                "knobs", "fits"):
        table.add_column(col, justify="left" if col in ("method", "knobs") else "right")
    for name, e in plan.methods.items():
        mem, sol = e.memory_bytes, e.solution or {}
        knobs = sol.get("knobs", {})
        by = sol.get("per_gpu_by_strategy", {})
        split = " / ".join("-" if by.get(k) is None else f"{by[k] / GiB:.1f}" for k in ("replicated", "sharded"))
        text = (f"mb {knobs.get('batch_size')} x {knobs.get('gradient_accumulation_steps')}, {knobs.get('max_seq_len')} tok"
                + (", ckpt" if knobs.get("gradient_checkpointing") else "")
                + (", 8-bit" if "8bit" in str(knobs.get("optimizer")) else "")
                + (f", {knobs.get('strategy')}" if knobs.get("strategy") != "single" else "")
                + (", offload" if knobs.get("cpu_offload") else ""))
        table.add_row(name, _human(e.trainable_params), f"{e.trainable_percent:.4g}",
                      *(f"{mem[k] / GiB:.2f}" for k in ("weights", "optimizer", "activations")),
                      f"{sol.get('per_gpu_bytes', 0) / GiB:.2f}", split, f"x{sol.get('relative_step_time', 1):.2f}",
                      text, "[green]yes[/]" if e.fits else "[red]no[/]")
    console.print(table)
    for name, e in plan.methods.items():
        if e.quant_constant_bits_per_param is not None:
            console.print(f"{name} quantization constants: {e.quant_constant_bits_per_param:.4f} bits/param")
        if e.why_not:
            console.print(f"[red]{name}[/] {e.why_not}")
        truncated = (e.solution or {}).get("truncated")
        if truncated:
            console.print(f"{name}: the shorter sequence truncates {truncated['examples']:.1%} of examples "
                          f"({truncated['tokens']:.1%} of tokens)")
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
        if r.get("solution"):
            console.print(f"  launch: {r['solution']['launch']}")
    console.print("[bold]assumptions:[/]")
    for line in plan.assumptions:
        console.print(f"  - {line}")
