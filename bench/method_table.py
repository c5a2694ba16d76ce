"""The method table, measured: every method trained on the demo task (contract-clause extraction) under one budget.

Each method trains in its own subprocess (so peak RSS is its own) through tunesmith's trainer, on the same data,
steps, micro-batch and sequence length, without packing (prefix/prompt tuning cannot pack, so nobody packs: equal
tokens per step). Learning rates come from FIELD.md's ranges, at the top of each range because the budget is
a few dozen steps:
    full 5e-5      (full fine-tuning, <1B params: 1e-5-5e-5)
    lora 2e-4, qlora 2e-4, adapters 2e-4   (PEFT: ~10x full, 1e-5-2e-4)
    prefix 1e-3, prompt 1e-2               (prompt-learning methods: "1e-3 or more")
Scores are field_f1 (mean over the evaluated examples) on the first N test and ood examples, greedy decoding.
"relative to full FT" = test score / full fine-tuning's test score measured in the same run. Step time is the
median over steps of (tokens of the step / tokens per second), which leaves out evaluation and checkpoint time.

    python bench/method_table.py --quick           # tiny model, 4 steps: smoke test (1 min 46 s wall on an idle
                                                   # 2-core machine, mostly the six subprocess start-ups)
    python bench/method_table.py --steps 30 --batch 4 --eval-examples 16 --json   # docs/method_table.md (38 min)
Last line: ratio=<lora test score / full test score>; --json prints {"methods": {...}} just before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full", "lora", "qlora", "adapters", "prefix", "prompt"]
LEARNING_RATES = {"full": 5e-5, "lora": 2e-4, "qlora": 2e-4, "adapters": 2e-4, "prefix": 1e-3, "prompt": 1e-2}
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


def rate(args, name: str) -> float:
    """The method's learning rate: LEARNING_RATES unless overridden with --lr METHOD=RATE."""
    for item in args.lr:
        method, _, value = item.partition("=")
        if method.strip() == name:
            return float(value)
    return LEARNING_RATES[name]


# ------------------------------------------------------------------------------------------------ child
def run_one(args) -> dict:
    """Train one method (in this process) and return its measured row."""
    import torch

    from tunesmith.config import load_config
    from tunesmith.recipes.finetune import run_finetune

    torch.manual_seed(0)  # same initialisation for every run of a method
    name = args.one
    data = Path(args.data)
    config = load_config(None, [
        f"model.name_or_path={args.model}", f"data.train=[{data / 'train.jsonl'}]",
        f"data.validation=[{data / 'validation.jsonl'}]", f"data.test=[{data / 'test.jsonl'}]",
        f"eval.splits={{ood: [{data / 'ood.jsonl'}]}}", f"data.max_seq_len={args.seq_len}", "data.packing=false",
        f"data.max_validation_examples={args.eval_examples}", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}", f"train.learning_rate={rate(args, name)}", "train.warmup_ratio=0.1",
        f"train.eval_steps={args.steps}", "train.show_progress=false", "train.seed=0",
        f"eval.max_examples={args.eval_examples}", f"eval.max_new_tokens={args.max_new_tokens}",
        "eval.batch_size=16", f"eval.metrics=[{SCORE_METRIC}, json_valid]",
        "eval.metric_options={closed_fields: [clause_type]}", f"method.name={name}",
        f"output.dir={args.out}", f"output.name={name}", "output.register_run=false", *METHOD_OPTIONS[name],
    ])
    summary = run_finetune(config, log=lambda *a, **k: None).to_dict()
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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
    if name == "qlora":
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


def child(args, name: str, data: Path, out: Path) -> dict:
    result = out / f"{name}.json"
    command = [sys.executable, __file__, "--one", name, "--data", str(data), "--out", str(out / "runs"),
               "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch),
               *[f"--lr={item}" for item in args.lr],
               "--seq-len", str(args.seq_len), "--eval-examples", str(args.eval_examples),
               "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--result", str(result)]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-15:])
        return {"error": f"exit {completed.returncode}: {tail}"}
    return json.loads(result.read_text())


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


def table(rows: dict[str, dict], base_params: int | None) -> str:
    header = ("| method | trainable params | trainable % | peak memory | step time | adapter size on disk | "
              f"test score ({SCORE_METRIC}) | score relative to full FT | OOD score | merges into base? |")
    lines = [header, "|" + "---|" * 10]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'].splitlines()[-1][:120]} |" + " |" * 8)
            continue
        share = 100 * row["trainable_params"] / base_params if base_params else None
        lines.append(
            f"| {name} | {row['trainable_params']:,} | {fmt(share, '{:.3f}%')} | {fmt_bytes(row['peak_memory_bytes'])} "
            f"| {fmt(row['step_seconds'], '{:.2f} s')} | {fmt_bytes(row['adapter_bytes'])} "
            f"| {fmt(row['test_score'], '{:.3f}')} | {fmt(row.get('relative_to_full'), '{:.0%}')} "
            f"| {fmt(row['ood_score'], '{:.3f}')} | {row['merges']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, small data, few steps")
    parser.add_argument("--json", action="store_true", help="print the JSON record before the ratio line")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--model", default=None, help=f"base model (default {REFERENCE}; --quick: tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 30; quick 4)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="max tokens per sequence (default 384; quick 512)")
    parser.add_argument("--eval-examples", type=int, default=None, help="test/ood/validation examples (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default 96; quick 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: on the shared 2-core machine two threads ran far slower)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=RATE",
                        help="override one method's learning rate (repeatable), e.g. --lr lora=1e-3")
    parser.add_argument("--md", default=None, help="also write the table with date, commit and machine here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (4 if quick else 30)
    args.seq_len = args.seq_len or (512 if quick else 384)
    args.eval_examples = args.eval_examples or (4 if quick else 16)
    args.max_new_tokens = args.max_new_tokens or (8 if quick else 96)

    if args.one:  # child process
        import torch

        torch.set_num_threads(args.threads)
        row = run_one(args)
        Path(args.result).write_text(json.dumps(row))
        return 0

    from tunesmith.methods.registry import get_method

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="method-table-") as tmp:
        out = Path(tmp)
        make_data(out / "data", quick)
        args.model = args.model or (tiny_model(out) if quick else REFERENCE)
        rows: dict[str, dict] = {}
        for name in args.methods.split(","):
            t0 = time.perf_counter()
            rows[name] = child(args, name, out / "data", out)
            rows[name]["merges"] = "yes" if get_method(name).can_merge else ("n/a: is a full model" if name == "full" else "no")
            status = rows[name].get("error", "ok").splitlines()[-1]
            print(f"{name}: {time.perf_counter() - t0:.0f} s ({status})", file=sys.stderr, flush=True)
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
    budget = (f"model {'tiny random (quick)' if quick else args.model}; {args.steps} steps x batch {args.batch}, "
              f"max_seq_len {args.seq_len}, no packing; scores on the first {args.eval_examples} test and ood "
              f"examples, greedy, {args.max_new_tokens} new tokens; trainable % of the base model's "
              f"{base_params:,} parameters; LR " + ", ".join(f"{m} {rate(args, m):g}" for m in rows)
              if base_params else "")
    text = table(rows, base_params)
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
        write_markdown(Path(args.md), text, budget, qlora, elapsed, args)
    if args.json:
        keys = ("trainable_params", "peak_memory_bytes", "step_seconds", "adapter_bytes", "test_score",
                "relative_to_full", "ood_score", "merges")
        print(json.dumps({"methods": {m: {k: r.get(k) for k in keys} if "error" not in r else {"error": r["error"]}
                                      for m, r in rows.items()}}))
    ratio = lora_row.get("relative_to_full")
    print(f"ratio={ratio:.3f}" if ratio is not None else "ratio=nan")
    return 0 if all("error" not in r for r in rows.values()) else 1


def write_markdown(path: Path, text: str, budget: str, qlora: dict | None, elapsed: float, args) -> None:
    from tunesmith.atomic import write_text

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), shared"
    lines = [
        "# The method table, measured", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- commit: `{commit}` (plus the uncommitted working tree of that moment)",
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
