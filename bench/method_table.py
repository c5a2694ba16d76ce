"""The method table, measured with a symmetric protocol: every method on the demo task under one budget.

Protocol (issue 14; DESIGN convention 9: the same tuning effort for every side):
1. Every method trains in its own subprocess through tunesmith's trainer, on the same data, steps, micro-batch and
   sequence length, without packing (prefix/prompt tuning cannot pack, so nobody packs: equal tokens per step).
2. Learning rate: every method gets the same grid of factors (`--grid`, default 0.3,1,3) around ITS OWN advised
   rate, read from the planner (tunesmith.plan.advice.hyperparameters). Where the planner's advice for prompt or
   prefix tuning is not yet method-appropriate (below 1e-2; the literature trains them at ~1e-2 to 3e-1), the
   bench uses its own marked table BENCH_ADVISED instead and says so in the output.
3. Selection on validation, not test: each grid run (seed 0) reports its best validation loss; the rate with the
   lowest wins. Only then is the method trained at that rate with seeds 0 and 1 and scored on the test and OOD
   splits (>= 50 examples each by default).
4. "relative to full FT" = the method's mean test score over the two seeds / full fine-tuning's, computed here.
   The literature column (FIELD.md "quality vs full FT") stands beside it.
Everything runs in one invocation at one commit. Scores: field_f1 (mean over examples), greedy decoding.
Step time: median over steps of (tokens of the step / tokens per second), evaluation and checkpoints left out.

    python bench/method_table.py --quick           # tiny model, 2 steps, grid of 2: smoke test
    python bench/method_table.py --json --md table.md --results runs/   # the full protocol (hours on 2 CPU cores)
    python bench/method_table.py --json --md table.md --reuse runs/     # complete an interrupted one
    python bench/method_table.py --methods lora,qlora --grid 1,3 --steps 30   # a reduced grid
Last line: ratio=<lora mean test score / full mean test score>; --json prints {"methods": {...}} just before it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full", "lora", "qlora", "adapters", "prefix", "prompt"]
# Used only where the planner's advice for prompt/prefix tuning is below 1e-2 (marked "bench table" in the output):
# the geometric middle of the literature's ~1e-2 to 3e-1 (FIELD.md; Lester et al. 2021 train prompts at 0.3).
BENCH_ADVISED = {"prefix": 5e-2, "prompt": 5e-2}
PROMPT_LEARNING_FLOOR = 1e-2
# FIELD.md "quality vs full FT"
LITERATURE = {"full": "100%", "lora": "95-100%", "qlora": "92-98%", "adapters": "93-99%", "prefix": "85-95%",
              "prompt": "80-95%"}
SEEDS = (0, 1)
INIT_TEXT = "Extract the clause as JSON with keys clause_type, parties, amounts, dates, durations, governing_law."
METHOD_OPTIONS = {
    "full": [],
    "lora": ["method.lora.r=16", "method.lora.alpha=32", "method.lora.target_modules=all-linear"],
    "qlora": ["method.lora.r=16", "method.lora.alpha=32", "method.lora.target_modules=all-linear"],
    "adapters": ["method.adapters.reduction_factor=16", "method.adapters.placement=serial"],
    # prefix and prompt start from the task instruction (Li & Liang 2021 section 7.2; Lester et al. 2021 section 3.2):
    # from random values neither learned the output format in 30 steps (field_f1 0.000, garbage output).
    "prefix": ["method.prefix.num_virtual_tokens=20", "method.prefix.init=text", f"method.prefix.init_text={INIT_TEXT}"],
    "prompt": ["method.prompt.num_virtual_tokens=20", "method.prompt.init=text", f"method.prompt.init_text={INIT_TEXT}"],
}
SCORE_METRIC = "field_f1"
REFERENCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Training children allowed at once (main sets it from --workers).
SLOTS = threading.BoundedSemaphore(1)
REUSED: list[str] = []  # result files taken from --reuse in this invocation


def advised_rates(model: str, methods: list[str], n_train: int) -> dict[str, tuple[float, str]]:
    """{method: (advised learning rate, where it came from)} from the planner's advice for this model's size."""
    from tunesmith.plan.advice import hyperparameters

    params = parameter_count(model)
    out = {}
    for name in methods:
        rate = hyperparameters(params, name, "extraction", n_train).learning_rate
        source = "planner"
        if name in BENCH_ADVISED and rate < PROMPT_LEARNING_FLOOR:
            rate, source = BENCH_ADVISED[name], f"bench table (planner said {rate:g}, below {PROMPT_LEARNING_FLOOR:g})"
        out[name] = (rate, source)
    return out


def parameter_count(model: str) -> int:
    """The base model's parameter count, from its config alone (built on the meta device: no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.config import ModelConfig
    from tunesmith.models.load import resolve_source

    config = AutoConfig.from_pretrained(resolve_source(ModelConfig(name_or_path=model), log=lambda *a, **k: None))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters())


def grid(advised: float, factors: list[float]) -> list[float]:
    return [float(f"{advised * f:.2g}") for f in factors]


# ------------------------------------------------------------------------------------------------ child
def run_one(args) -> dict:
    """Train one method (in this process) and return its measured row."""
    import torch

    from tunesmith.config import load_config
    from tunesmith.recipes.finetune import run_finetune
    from tunesmith.records.metrics import read_metrics

    torch.manual_seed(args.seed)  # same initialisation for every run of a method and seed
    name = args.one
    data = Path(args.data)
    scored = [f"data.test=[{data / 'test.jsonl'}]", f"eval.splits={{ood: [{data / 'ood.jsonl'}]}}"] if args.score else []
    config = load_config(None, [
        f"model.name_or_path={args.model}", f"data.train=[{data / 'train.jsonl'}]",
        f"data.validation=[{data / 'validation.jsonl'}]", *scored, f"data.max_seq_len={args.seq_len}",
        "data.packing=false", f"data.max_validation_examples={args.validation_examples}", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}", f"train.learning_rate={args.rate}", "train.warmup_ratio=0.1",
        f"train.eval_steps={max(1, args.steps // 3)}", "train.show_progress=false", f"train.seed={args.seed}",
        f"eval.max_examples={args.eval_examples}", f"eval.max_new_tokens={args.max_new_tokens}",
        f"eval.batch_size={args.eval_batch}", f"eval.metrics=[{SCORE_METRIC}, json_valid]",
        "eval.metric_options={closed_fields: [clause_type]}", f"method.name={name}",
        f"output.dir={args.out}", f"output.name={name}-{args.rate:g}-s{args.seed}{'-scored' if args.score else ''}", "output.register_run=false",
        "eval.compare_base=false", *METHOD_OPTIONS[name],
    ])
    summary = run_finetune(config, log=lambda *a, **k: None).to_dict()
    run_dir = Path(summary["run_dir"])
    records = read_metrics(run_dir / "metrics.jsonl")
    step_seconds, previous_tokens = [], 0
    for record in records:
        if "tokens_per_second" in record:
            step_tokens = record["tokens"] - previous_tokens
            previous_tokens = record["tokens"]
            step_seconds.append(step_tokens / max(record["tokens_per_second"], 1e-9))
    evaluation = summary.get("eval", {}).get("tuned", {})
    row = {
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "step_seconds": statistics.median(step_seconds) if step_seconds else None,
        "adapter_bytes": sum(p.stat().st_size for p in (run_dir / "adapter").rglob("*") if p.is_file()),
        "test_score": evaluation.get("test", {}).get(SCORE_METRIC),
        "ood_score": evaluation.get("ood", {}).get(SCORE_METRIC),
        "test_json_valid": evaluation.get("test", {}).get("json_valid"),
        "final_train_loss": summary["final_train_loss"],
        "best_eval_loss": summary["best_eval_loss"],
        "wall_seconds": summary["wall_seconds"],
    }
    if name == "qlora" and args.score:
        row["quantized_base"] = quantized_base_numbers(args.model)
    return row


def quantized_base_numbers(model_name: str) -> dict:
    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.methods.qlora import METHOD, quantized_base_report
    from tunesmith.models.load import load_model

    base = load_model(ModelConfig(name_or_path=model_name), log=lambda *a, **k: None,
                      **METHOD.base_load_kwargs(MethodConfig(name="qlora")))
    return quantized_base_report(base)


# ----------------------------------------------------------------------------------------------- parent
def make_data(out: Path, quick: bool) -> None:
    sys.path.insert(0, str(ROOT / "examples" / "contracts"))
    from generate import generate  # examples/contracts/generate.py

    sizes = dict(n_train=64, n_validation=8, n_test=8, n_ood=8) if quick else {}
    generate(out, seed=0, **sizes)


def tiny_model(out: Path) -> str:
    from tunesmith.models.tiny import save_tiny_model

    return str(save_tiny_model(out / "tiny-model", "llama"))


def run_key(args) -> dict:
    """What makes two runs of one method, rate and seed the same run (recorded in each result; --reuse checks it)."""
    return {k: getattr(args, k) for k in ("model", "steps", "batch", "seq_len", "eval_examples", "validation_examples",
                                          "max_new_tokens", "eval_batch")}


def reused(args, result: Path) -> dict | None:
    """A finished run's result from --reuse DIR (same file name, i.e. method, rate, seed and scoring): runs are
    deterministic given their seed on one machine (a seed-0 scored run reproduces its grid run's validation loss to
    every digit), so an interrupted invocation can be completed without training its finished runs again. A result
    that records different run parameters (run_key) is not reused; one that records none (written before run_key
    existed) is reused by name, and the output says so."""
    if not args.reuse or not (Path(args.reuse) / result.name).is_file():
        return None
    row = json.loads((Path(args.reuse) / result.name).read_text())
    if "error" in row or row.get("args", run_key(args)) != run_key(args):
        return None
    REUSED.append(result.name)
    print(f"reused {result.name} from {args.reuse}{'' if 'args' in row else ' (no run parameters recorded: matched by name)'}",
          file=sys.stderr, flush=True)
    result.write_text(json.dumps(row))
    return {**row, "reused": True}


def child(args, name: str, data: Path, out: Path, rate: float, seed: int, score: bool) -> dict:
    result = out / f"{name}-{rate:g}-s{seed}{'-scored' if score else ''}.json"
    if (row := reused(args, result)) is not None:
        return row
    command = [sys.executable, __file__, "--one", name, "--data", str(data), "--out", str(out / "runs"),
               "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch), "--rate", str(rate),
               "--seed", str(seed), "--score", str(int(score)), "--eval-batch", str(args.eval_batch),
               "--seq-len", str(args.seq_len), "--eval-examples", str(args.eval_examples),
               "--validation-examples", str(args.validation_examples),
               "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--result", str(result)]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with SLOTS:  # at most --workers training children at once, whichever method they belong to
        t0 = time.perf_counter()  # the run's own wall time, not its wait for a slot
        completed = subprocess.run(command, env=environment, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if not args.keep_runs:  # the result file has what the table needs; a full fine-tuning run's folder is ~3.6 GB
        shutil.rmtree(out / "runs" / result.stem, ignore_errors=True)
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-15:])
        return {"error": f"exit {completed.returncode}: {tail}", "seconds": seconds}
    return {**json.loads(result.read_text()), "seconds": seconds}


def run_method(args, name: str, advised: float, data: Path, out: Path) -> dict:
    """The grid at seed 0 (validation loss only), then seeds 0 and 1 at the best rate, scored on test and OOD.

    The runs of one stage start together; SLOTS (--workers) bounds how many train at once across all methods, so
    the machine stays busy until the last run, although methods differ several-fold in run time."""
    rates = grid(advised, args.grid)
    with ThreadPoolExecutor(max_workers=len(rates)) as pool:
        futures = {rate: pool.submit(child, args, name, data, out, rate, SEEDS[0], False) for rate in rates}
        runs = {rate: future.result() for rate, future in futures.items()}
    for rate, run in runs.items():
        loss = run.get("best_eval_loss")
        print(f"{name} lr {rate:g}: best validation loss {loss if loss is None else round(loss, 4)} "
              f"({run.get('seconds', 0):.0f} s{', ' + run['error'].splitlines()[-1] if 'error' in run else ''})",
              file=sys.stderr, flush=True)
    finite = {r: x["best_eval_loss"] for r, x in runs.items()
              if "error" not in x and x.get("best_eval_loss") is not None and math.isfinite(x["best_eval_loss"])}
    grid_record = {f"{r:g}": (x.get("best_eval_loss") if "error" not in x else "failed") for r, x in runs.items()}
    if not finite:
        return {"error": "every rate of the grid failed or diverged", "grid": grid_record, "advised": advised}
    best = min(finite, key=finite.get)
    with ThreadPoolExecutor(max_workers=len(SEEDS)) as pool:
        futures = {seed: pool.submit(child, args, name, data, out, best, seed, True) for seed in SEEDS}
        seeds = {seed: future.result() for seed, future in futures.items()}
    for seed, run in seeds.items():
        print(f"{name} lr {best:g} seed {seed}: test {run.get('test_score')} ({run.get('seconds', 0):.0f} s)",
              file=sys.stderr, flush=True)
    failed = [s for s, x in seeds.items() if "error" in x]
    if failed:
        return {"error": seeds[failed[0]]["error"], "grid": grid_record, "advised": advised, "best_rate": best}
    first = seeds[SEEDS[0]]
    row = {k: first[k] for k in ("trainable_params", "total_params", "peak_memory_bytes", "step_seconds",
                                 "adapter_bytes")}
    # A best rate at the grid's edge means the optimum may lie outside it: said in the table, not hidden.
    row.update(advised=advised, grid=grid_record, best_rate=best, best_at_edge=best in (min(rates), max(rates)),
               test_scores=[seeds[s]["test_score"] for s in SEEDS], ood_scores=[seeds[s]["ood_score"] for s in SEEDS],
               final_train_loss=[seeds[s]["final_train_loss"] for s in SEEDS])
    row["test_score"] = mean(row["test_scores"])
    row["ood_score"] = mean(row["ood_scores"])
    if "quantized_base" in first:
        row["quantized_base"] = first["quantized_base"]
    return row


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def table(rows: dict[str, dict], base_params: int | None, sources: dict[str, str]) -> str:
    header = ("| method | trainable params | trainable % | peak memory | step time | adapter size on disk | advised LR "
              "(source) | grid: best validation loss per LR | chosen LR | test score "
              f"({SCORE_METRIC}), seeds 0 / 1 | mean | relative to full FT (measured) | literature (FIELD.md) | "
              "OOD score, seeds 0 / 1 | merges into base? |")
    lines = [header, "|" + "---|" * 15]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'].splitlines()[-1][:120]} |" + " |" * 13)
            continue
        share = 100 * row["trainable_params"] / base_params if base_params else None
        grid_text = ", ".join(f"{r}: {v if isinstance(v, str) else f'{v:.3f}'}" for r, v in row["grid"].items())
        lines.append(
            f"| {name} | {row['trainable_params']:,} | {fmt(share, '{:.3f}%')} | {fmt_bytes(row['peak_memory_bytes'])} "
            f"| {fmt(row['step_seconds'], '{:.2f} s')} | {fmt_bytes(row['adapter_bytes'])} "
            f"| {row['advised']:g} ({sources.get(name, 'planner')}) | {grid_text} | {row['best_rate']:g}{' (grid edge)' if row.get('best_at_edge') else ''} "
            f"| {' / '.join(fmt(v, '{:.3f}') for v in row['test_scores'])} | {fmt(row['test_score'], '{:.3f}')} "
            f"| {fmt(row.get('relative_to_full'), '{:.0%}')} | {LITERATURE.get(name, '-')} "
            f"| {' / '.join(fmt(v, '{:.3f}') for v in row['ood_scores'])} | {row['merges']} |"
        )
    return "\n".join(lines)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, small data, 2 steps, grid 1,3")
    parser.add_argument("--json", action="store_true", help="print the JSON record before the ratio line")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--model", default=None, help=f"base model (default {REFERENCE}; --quick: tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; quick 2)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--grid", default=None, help="LR factors around each method's advised rate (default 0.3,1,3)")
    parser.add_argument("--seq-len", type=int, default=None, help="max tokens per sequence (default 384; quick 512)")
    parser.add_argument("--eval-examples", type=int, default=None, help="test and OOD examples (default 50)")
    parser.add_argument("--validation-examples", type=int, default=None, help="validation examples (default 16)")
    parser.add_argument("--eval-batch", type=int, default=None, help="generation batch (default: all examples)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default 96; quick 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: on the shared 2-core machine two threads ran far slower)")
    parser.add_argument("--workers", type=int, default=1,
                        help="methods trained at the same time (each its own child processes with --threads threads; "
                             "workers x threads should not exceed the cores); every method still runs its own grid "
                             "and seeds one after another")
    parser.add_argument("--md", default=None, help="also write the table with date, commit and machine here")
    parser.add_argument("--reuse", default=None, metavar="DIR",
                        help="take finished runs' results from DIR (an earlier invocation's --results) instead of "
                             "training them again")
    parser.add_argument("--results", default=None, metavar="DIR", help="also copy every run's result file here")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's folder (checkpoints, adapter)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--score", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (2 if quick else 30)
    args.seq_len = args.seq_len or (512 if quick else 384)
    args.eval_examples = args.eval_examples or (4 if quick else 50)
    args.validation_examples = args.validation_examples or (4 if quick else 16)
    args.eval_batch = args.eval_batch or args.eval_examples
    args.max_new_tokens = args.max_new_tokens or (8 if quick else 96)
    if isinstance(args.grid, str) or args.grid is None:
        args.grid = [float(x) for x in (args.grid or ("1,3" if quick else "0.3,1,3")).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:  # child process
        import torch

        torch.set_num_threads(args.threads)
        row = run_one(args)
        Path(args.result).write_text(json.dumps({**row, "args": run_key(args)}))
        return 0

    from tunesmith.methods.registry import get_method

    started = time.perf_counter()
    # The commit the runs start from (read now: HEAD may move while a long invocation runs).
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="method-table-") as tmp:
        out = Path(tmp)
        make_data(out / "data", args.quick)
        args.model = args.model or (tiny_model(out) if args.quick else REFERENCE)
        n_train = sum(1 for _ in open(out / "data" / "train.jsonl"))
        advised = advised_rates(args.model, methods, n_train)
        for name, (rate, source) in advised.items():
            print(f"{name}: advised LR {rate:g} ({source}); grid {[f'{r:g}' for r in grid(rate, args.grid)]}",
                  file=sys.stderr, flush=True)
        # Methods are independent (own children, own run folders): each method's stages run in their own thread and
        # SLOTS lets --workers children train at once, from any method; results are kept in the order of --methods.
        global SLOTS
        SLOTS = threading.BoundedSemaphore(max(1, args.workers))
        with ThreadPoolExecutor(max_workers=len(methods)) as pool:
            futures = {name: pool.submit(run_method, args, name, advised[name][0], out / "data", out) for name in methods}
            rows: dict[str, dict] = {name: futures[name].result() for name in methods}
        if args.results:  # the temporary folder goes away with this block
            Path(args.results).mkdir(parents=True, exist_ok=True)
            for path in out.glob("*.json"):
                shutil.copy(path, Path(args.results) / path.name)
        for name in methods:
            rows[name]["merges"] = "yes" if get_method(name).can_merge else ("n/a: is a full model" if name == "full" else "no")
    full_score = rows.get("full", {}).get("test_score")
    for row in rows.values():
        if "error" not in row:
            row["relative_to_full"] = row["test_score"] / full_score if full_score and row["test_score"] is not None else None
    full_row, lora_row = rows.get("full", {}), rows.get("lora", {})
    if "total_params" in full_row:
        base_params = full_row["total_params"]
    elif "total_params" in lora_row:
        base_params = lora_row["total_params"] - lora_row["trainable_params"]
    else:
        base_params = None
    sources = {m: s for m, (_, s) in advised.items()}
    budget = (f"model {'tiny random (quick)' if args.quick else args.model}; {args.steps} steps x batch {args.batch}, "
              f"max_seq_len {args.seq_len}, no packing; LR grid x{', x'.join(f'{f:g}' for f in args.grid)} around each "
              f"method's advised rate, chosen by best validation loss ({args.validation_examples} examples) at seed 0, "
              f"then seeds {SEEDS[0]} and {SEEDS[1]} at it; scores on the first {args.eval_examples} test and ood "
              f"examples, greedy, {args.max_new_tokens} new tokens; {args.workers} method(s) at a time, "
              f"{args.threads} torch thread(s) each (step times are comparable only between runs that shared the "
              f"machine alike)"
              + (f"; trainable % of the base model's {base_params:,} parameters" if base_params else "")
              + (f"; {len(REUSED)} finished runs reused from {args.reuse} (not trained again)" if REUSED else ""))
    text = table(rows, base_params, sources)
    print(text)
    print(budget)
    qlora = rows.get("qlora", {}).get("quantized_base")
    if qlora:
        print(f"qlora base: {fmt_bytes(qlora['total_bytes'])} in memory ({qlora['quantized_params']:,} params in NF4 at "
              f"{qlora['bits_per_quantized_param']:.3f} bits each incl. constants; constants "
              f"{qlora['constant_bits_per_param']:.3f} bits/param)")
    elapsed = time.perf_counter() - started
    print(f"total wall time {elapsed:.0f} s")
    if args.md:
        write_markdown(Path(args.md), text, budget, qlora, elapsed, args, commit)
    if args.json:
        keys = ("trainable_params", "peak_memory_bytes", "step_seconds", "adapter_bytes", "advised", "grid",
                "best_rate", "best_at_edge", "test_scores", "test_score", "relative_to_full", "ood_scores", "ood_score", "merges")
        print(json.dumps({"methods": {m: {k: r.get(k) for k in keys} if "error" not in r else r
                                      for m, r in rows.items()},
                          "advised_source": sources, "literature": LITERATURE, "reused": sorted(REUSED)}))
    ratio = lora_row.get("relative_to_full")
    print(f"ratio={ratio:.3f}" if ratio is not None else "ratio=nan")
    return 0 if all("error" not in r for r in rows.values()) else 1


def write_markdown(path: Path, text: str, budget: str, qlora: dict | None, elapsed: float, args, commit: str) -> None:
    from tunesmith.atomic import write_text

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), shared"
    lines = [
        "# The method table, measured", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- commit at the start: `{commit}` (plus the uncommitted working tree of that moment)",
        f"- machine: {machine}; no GPU",
        f"- command: `python bench/method_table.py {' '.join(sys.argv[1:])}` ({elapsed / 60:.1f} min)",
        f"- budget: {budget}", "",
        text, "",
    ]
    if qlora:
        lines += [f"QLoRA base in memory: {fmt_bytes(qlora['total_bytes'])}; {qlora['quantized_params']:,} NF4 "
                  f"parameters at {qlora['bits_per_quantized_param']:.3f} bits each including constants "
                  f"(constants: {qlora['constant_bits_per_param']:.3f} bits/param).", ""]
    write_text(path, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
