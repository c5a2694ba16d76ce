"""The planner's TOTAL against the whole-process peak of `tunesmith train` itself, per method and shape.

What is measured is what users run: for every case a fresh `python -m tunesmith.cli train case.yaml` subprocess
trains `--steps` optimizer steps, and its peak resident set size (ru_maxrss from os.wait4: weights, trainable
copies, optimizer state, activations, the Python/torch runtime, allocator slack — everything) is compared with
the planner's total for the same config (plan/report.planned_peak: the number `tunesmith plan --write` promises).
glibc's malloc runs with its defaults, as it does for users.

Data: generated per model with its own tokenizer so that every example is cut to exactly max_seq_len (a user turn
of ~0.7 x seq tokens, an assistant turn of ~0.5 x seq: truncation keeps ~0.3 x seq labelled tokens, as the run's
data_manifest.json reports). The planner is told the labelled share the run's own manifest reports (a property of
the data, not a fitted number).

Nothing is fitted on the reported cases. The planner's two constants that depend on this machine's runtime were
set on other shapes: its CPU runtime overhead (plan/memory.py OVERHEAD_BYTES["cpu"]) from the calibration case, LoRA
on the tiny random model (models/tiny.py), 1 x 128 tokens, where weights and activations are negligible; and glibc's
heap retention (plan/memory.py ALLOCATOR_RETENTION["cpu"] under autocast; in fp32 each method's
`cpu_fp32_heap_share` and CPU_FP32_CHECKPOINT_RETENTION) from the fit set: `--mini-layers 12` (a random model with
the reference model's shapes but 12 layers) at 256/512/1024 tokens, and the reference model at 512 tokens,
micro-batches 1 and 2 (see docs/benchmarks.md). The calibration case runs again here and is reported apart; the
reported cases use other shapes (the reference model at 256 and 1024 tokens).

Cases (default): six methods x sequence lengths 256, 1024 x micro-batches 1, 2, + LoRA with gradient checkpointing
at the same shapes. `--budget-check` also writes a config with `tunesmith plan --write` for a memory budget below
the default configuration's planned peak, trains it, and checks the measured peak stays under that budget.
`--quick` runs the tiny model only (calibration + one LoRA case, 2 x 256), for the test.

    nice python bench/memory_accuracy.py [--methods lora,full] [--seq-lens 256,1024] [--batch-sizes 1,2]
        [--steps 3] [--budget-check] [--json] [--quick] [--mini-layers N]

Summary line: `ratio=` measured/predicted per case and the worst relative error (predicted - measured)/measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
METHODS = ("lora", "qlora", "full", "prefix", "prompt", "adapters")
WORDS = ("contract", "party", "supplier", "buyer", "shall", "deliver", "goods", "within", "days", "notice", "amount",
         "payment", "invoice", "terminate", "agreement", "law", "governed", "court", "clause", "warranty", "period",
         "liability", "damages", "confidential", "information", "obligation", "breach", "remedy", "fee", "annual")
MiB = 2**20


# ------------------------------------------------------------------------------------------------ data
def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _tokens(tokenizer, user: str, answer: str) -> int:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_data(tokenizer, seq_len: int, records: int, path: Path, seed: int = 0) -> Path:
    """`records` conversations of ~1.2 x seq_len tokens (template + user ~0.7, assistant ~0.5), each truncated to
    seq_len, so every example fills max_seq_len and keeps ~0.3 x seq_len labelled tokens."""
    rng = random.Random(seed)
    base = _tokens(tokenizer, "", "")
    per_word = max(1.0, (_tokens(tokenizer, _text(rng, 200), "") - base) / 200)
    if base > 0.5 * seq_len:
        raise ValueError(f"the chat template alone takes {base} tokens: max_seq_len {seq_len} is too short")
    rows = []
    for _ in range(records):
        user = _text(rng, int((0.7 * seq_len - base) / per_word))
        answer = _text(rng, int(0.5 * seq_len / per_word) + 1)
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ runs
def case_config(model: str, method: str, data: Path, seq_len: int, batch: int, ckpt: bool, steps: int,
                out: Path, name: str, processes: int = 1) -> dict:
    from tunesmith.methods.registry import get_method

    packing = get_method(method).supports_packing
    sharding = {"sharding": "fsdp"} if processes > 1 else {}
    return {
        "model": {"name_or_path": model, "dtype": "float32"},
        "data": {"train": [str(data)], "max_seq_len": seq_len, "validation_fraction": 0.0, "packing": packing,
                 "truncation": "truncate"},
        "method": {"name": method},
        "train": {"max_steps": steps, "batch_size": batch, "gradient_accumulation_steps": 1,
                  "gradient_checkpointing": ckpt, "show_progress": False, "logging_steps": 1, "eval_steps": None,
                  "save_total_limit": 1, "load_best_at_end": False, **sharding},
        "eval": {"metrics": []},
        "output": {"dir": str(out), "name": name, "overwrite": True, "register_run": False},
    }


def run_train(config_path: Path, threads: int, processes: int = 1) -> dict:
    """`tunesmith train` in a fresh process; its peak RSS from the kernel's rusage (os.wait4, Linux KiB).

    processes > 1: `torchrun --nproc_per_node N` (FSDP2 on gloo). ru_maxrss of the waited launcher covers its waited
    descendants as the maximum over them, i.e. the largest per-process peak among the ranks: what a per-GPU budget
    must hold."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    from tunesmith.serve.testing import free_port

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
              "--master_port", str(free_port()), "-m"] if processes > 1 else [sys.executable, "-m"]
    proc = subprocess.Popen([*launch, "tunesmith.cli", "train", str(config_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"returncode": code, "peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": round(time.perf_counter() - t0, 1),
            "tail": output.strip().splitlines()[-3:] if code else []}


def labelled_share(run_dir: Path) -> float | None:
    """target tokens / tokens of the trained split, from the run's own data manifest."""
    for path in sorted(run_dir.rglob("data_manifest.json")):
        manifest = json.loads(path.read_text())
        render = manifest.get("render", {}).get("train", {})
        if render.get("total_tokens"):
            return render["target_tokens"] / render["total_tokens"]
    return None


def predict(config_path: Path, share: float | None, processes: int = 1) -> dict:
    from tunesmith.config import load_config
    from tunesmith.models.facts import model_facts
    from tunesmith.plan.memory import OVERHEAD_BYTES
    from tunesmith.plan.report import planned_peak
    from tunesmith.plan.solve import Budget

    config = load_config(config_path)
    facts = model_facts(config.model.name_or_path)
    # processes > 1: the planner's per-device figure for a sharded plan on that many devices (config has fsdp)
    peak = planned_peak(config, Budget("cpu", 2**50, gpus=processes), labelled_fraction=share, facts=facts)
    return {"predicted_bytes": int(peak), "overhead_bytes": OVERHEAD_BYTES["cpu"]}


def run_case(case: dict, work: Path, threads: int, log) -> dict:
    processes = case.get("processes", 1)
    name = (f"{case['method']}-s{case['seq_len']}-b{case['batch_size']}{'-ckpt' if case['ckpt'] else ''}"
            f"{f'-fsdp{processes}' if processes > 1 else ''}")
    repeat = case.get("repeat", 1)
    run_name = name if repeat == 1 else f"{name}-r{repeat}"  # each repeat its own config and run folder
    cfg = case_config(case["model"], case["method"], case["data"], case["seq_len"], case["batch_size"], case["ckpt"],
                      case["steps"], work / "runs", run_name, processes)
    path = work / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    measured = run_train(path, threads, processes)
    row = {"case": name, "method": case["method"], "seq_len": case["seq_len"], "batch_size": case["batch_size"],
           "gradient_checkpointing": case["ckpt"], "processes": processes, "model": case["model"], "repeat": repeat,
           **measured}
    if measured["returncode"] != 0:
        log(f"{name}: FAILED {measured['tail']}")
        return row
    share = labelled_share(work / "runs" / run_name)
    row.update(predict(path, share, processes), labelled_share=share)
    row["relative_error"] = round((row["predicted_bytes"] - row["peak_rss_bytes"]) / row["peak_rss_bytes"], 4)
    log(f"{run_name}: predicted {row['predicted_bytes'] / MiB:,.0f} MiB, measured {row['peak_rss_bytes'] / MiB:,.0f} MiB "
        f"({row['relative_error']:+.1%}), {measured['seconds']} s")
    return row


def mini_model(reference: str, layers: int, out: Path) -> Path:
    """A random-weight model with `reference`'s configuration (widths, heads, vocabulary, tokenizer) but `layers`
    decoder layers, saved to `out` (seeded: the same weights every time)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.models.reference import cached_path

    source = cached_path(reference) if cached_path(reference).exists() else Path(reference)
    config = AutoConfig.from_pretrained(str(source))
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for path in source.iterdir():
        if "token" in path.name or path.name in ("chat_template.jinja", "generation_config.json"):
            shutil.copy(path, out / path.name)
    return out


# ----------------------------------------------------------------------------------------- budget check
def budget_check(model: str, tokenizer, work: Path, threads: int, steps: int, seq_len: int, log) -> dict:
    """Issue 19's check: a budget below the default configuration's planned peak -> `tunesmith plan --write` ->
    train `steps` steps -> the measured peak stays under the budget."""
    from tunesmith.cli import main as cli
    from tunesmith.config import load_config

    data = make_data(tokenizer, seq_len, 24, work / f"budget-{seq_len}.jsonl", seed=1)
    default = work / "default.yaml"
    # Effective batch 4 (one micro-batch of 4 per step in the default config) keeps 3 steps affordable on 2 cores.
    common = ["plan", "--model", model, "--device", "cpu", "--method", "lora", "--seq-len", str(seq_len),
              "--examples", "1000", "--task", "extraction", "--data", str(data), "--effective-batch", "4"]
    with open(os.devnull, "w") as sink, _redirect(sink):
        cli([*common, "--gpu-memory", "1024GB", "--write", str(default)])
    share = labelled_share_from_plan(model, data, seq_len)
    default_peak = predict(default, share)["predicted_bytes"]
    budget = int(default_peak * 0.7)
    written = work / "budget.yaml"
    with open(os.devnull, "w") as sink, _redirect(sink):
        cli([*common, "--gpu-memory", f"{budget / MiB:.0f}MB", "--write", str(written)])
    config = load_config(written)
    raw = yaml.safe_load(written.read_text())
    raw["train"].update(max_steps=steps, show_progress=False, eval_steps=None, load_best_at_end=False)
    raw["data"]["validation_fraction"] = 0.0
    raw["eval"]["metrics"] = []
    raw["output"].update(dir=str(work / "runs"), name="budget", overwrite=True, register_run=False)
    written.write_text(yaml.safe_dump(raw, sort_keys=False))
    measured = run_train(written, threads)
    result = {"seq_len": seq_len, "default_config": {"batch_size": 4, "gradient_checkpointing": False,
                                                      "predicted_bytes": default_peak},
              "budget_bytes": budget, "written_config": {"batch_size": config.train.batch_size,
                                                         "gradient_accumulation_steps": config.train.gradient_accumulation_steps,
                                                         "gradient_checkpointing": config.train.gradient_checkpointing,
                                                         "max_seq_len": config.data.max_seq_len},
              "planned_bytes": predict(written, share)["predicted_bytes"], **measured,
              "usable_bytes": int(budget * 0.92)}
    result["under_budget"] = measured["returncode"] == 0 and measured["peak_rss_bytes"] <= budget
    log(f"budget check: default config planned {default_peak / MiB:,.0f} MiB, budget {budget / MiB:,.0f} MiB, written "
        f"{result['written_config']} planned {result['planned_bytes'] / MiB:,.0f} MiB, measured "
        f"{measured['peak_rss_bytes'] / MiB:,.0f} MiB -> {'under' if result['under_budget'] else 'OVER'} budget")
    return result


def labelled_share_from_plan(model: str, data: Path, seq_len: int) -> float | None:
    from tunesmith.plan.data import profile_data

    return profile_data([str(data)], model, seq_len).labelled_fraction


class _redirect:
    def __init__(self, sink):
        self.sink = sink

    def __enter__(self):
        self.saved = sys.stdout
        sys.stdout = self.sink

    def __exit__(self, *exc):
        sys.stdout = self.saved


# ------------------------------------------------------------------------------------------------ main
def summarize(rows: list[dict]) -> dict:
    """The worst error over every run of every case (with --repeats, the worst repeat counts, not the mean), and each
    case's spread of measured peaks over its repeats."""
    done = [r for r in rows if "relative_error" in r]
    worst = max(done, key=lambda r: abs(r["relative_error"]), default=None)
    spread: dict[str, list[int]] = {}
    predicted: dict[str, int] = {}
    for r in done:
        spread.setdefault(r["case"], []).append(r["peak_rss_bytes"])
        predicted[r["case"]] = r["predicted_bytes"]
    # The budget view: a memory budget must hold a case's highest run, so the planner is also compared with each
    # case's largest peak over its repeats. Reported beside the per-run worst, never instead of it.
    vs_max = {case: round((predicted[case] - max(v)) / max(v), 4) for case, v in spread.items()}
    worst_max = max(vs_max, key=lambda c: abs(vs_max[c]), default=None)
    return {"cases": len({r["case"] for r in rows}), "runs": len(rows), "measured": len(done),
            "failed": [r["case"] for r in rows if "relative_error" not in r],
            "worst_relative_error": worst["relative_error"] if worst else None, "worst_case": worst["case"] if worst else None,
            "mean_abs_relative_error": round(sum(abs(r["relative_error"]) for r in done) / len(done), 4) if done else None,
            "measured_spread_mib": {case: round((max(v) - min(v)) / MiB) for case, v in spread.items() if len(v) > 1},
            "relative_error_vs_case_max": vs_max,
            "worst_relative_error_vs_case_max": vs_max[worst_max] if worst_max else None,
            "worst_case_vs_case_max": worst_max}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=REFERENCE)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seq-lens", default="256,1024")
    parser.add_argument("--batch-sizes", default="1,2")
    parser.add_argument("--no-ckpt-cases", action="store_true", help="skip the LoRA + gradient checkpointing cases")
    parser.add_argument("--cases", help="an explicit subset instead of the grid: method:seq:batch[:ckpt],... "
                                        "(e.g. full:256:1,lora:256:1:ckpt)")
    parser.add_argument("--no-calibration", action="store_true", help="skip re-running the calibration case")
    parser.add_argument("--sharded", default="", metavar="SPEC",
                        help="cases run as 2-process FSDP2 (torchrun, gloo), per-process peak vs the planner's "
                             "sharded per-device figure: method:seq:batch,... (with --quick: lora:256:2)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="run every case N times; the worst run is reported")
    parser.add_argument("--jobs", type=int, default=1, help="cases measured at once (each its own process)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-check", action="store_true", help="also run issue 19's budget check (LoRA)")
    parser.add_argument("--budget-seq-len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="tiny random model: calibration + one case")
    parser.add_argument("--mini-layers", type=int, default=0, metavar="N",
                        help="instead of --model: a random model with the reference model's shapes and N layers "
                             "(the fit set's model for the planner's heap-retention constant)")
    parser.add_argument("--work", help="keep runs here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    from transformers import AutoTokenizer

    from tunesmith.models.tiny import save_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="memory-bench-")
    work = Path(args.work) if args.work else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    tiny = str(save_tiny_model(work / "tiny-model"))
    tiny_tok = AutoTokenizer.from_pretrained(tiny)
    calibration_case = {"model": tiny, "method": "lora", "seq_len": 128, "batch_size": 1, "ckpt": False,
                        "steps": args.steps, "data": make_data(tiny_tok, 128, 8, work / "tiny-128.jsonl")}
    calibration = {} if args.no_calibration else run_case(calibration_case, work, args.threads, log)
    calibration["role"] = "calibration (the planner's CPU overhead constant was set from this case; not reported)"

    if args.quick:
        args.sharded = args.sharded and "lora:256:2"
        model, tokenizer, seq_lens, batches, methods = tiny, tiny_tok, [256], [2], ["lora"]
        steps, with_ckpt = 2, False
    else:
        from tunesmith.models.load import resolve_source  # noqa: F401 - the reference model must be installed
        from tunesmith.models.reference import cached_path

        model = str(mini_model(args.model, args.mini_layers, work / f"mini-{args.mini_layers}")) if args.mini_layers else args.model
        source = cached_path(model) if cached_path(model).exists() else Path(model)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        seq_lens = [int(s) for s in args.seq_lens.split(",")]
        batches = [int(b) for b in args.batch_sizes.split(",")]
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        steps, with_ckpt = args.steps, not args.no_ckpt_cases and "lora" in methods
    cases = []
    for seq in seq_lens:
        data = make_data(tokenizer, seq, max(batches) * steps + 2, work / f"data-{seq}.jsonl")
        for method in methods:
            for batch in batches:
                cases.append({"model": model, "method": method, "seq_len": seq, "batch_size": batch, "ckpt": False,
                              "steps": steps, "data": data})
                if method == "lora" and with_ckpt:
                    cases.append({"model": model, "method": method, "seq_len": seq, "batch_size": batch, "ckpt": True,
                                  "steps": steps, "data": data})
    if args.cases and not args.quick:
        cases, data_by_seq = [], {}
        for spec in args.cases.split(","):
            method, seq, batch, *flag = spec.split(":")
            seq = int(seq)
            if seq not in data_by_seq:
                data_by_seq[seq] = make_data(tokenizer, seq, 2 * steps + 2, work / f"data-{seq}.jsonl")
            cases.append({"model": model, "method": method, "seq_len": seq, "batch_size": int(batch),
                          "ckpt": flag == ["ckpt"], "steps": steps, "data": data_by_seq[seq]})
    for spec in filter(None, args.sharded.split(",")):
        method, seq, batch = spec.split(":")
        cases.append({"model": model, "method": method, "seq_len": int(seq), "batch_size": int(batch), "ckpt": False,
                      "steps": steps, "processes": 2,
                      "data": make_data(tokenizer, int(seq), 2 * int(batch) * steps + 2, work / f"data-{seq}-x2.jsonl")})
    # --repeats: the whole grid again, in the same order (a case's repeats are spread over the session, not adjacent).
    cases = [{**case, "repeat": r} for r in range(1, args.repeats + 1) for case in cases]
    lock = threading.Lock()

    def measure(case: dict) -> dict:  # each row is also appended to work/results.jsonl as it lands (long grids)
        row = run_case(case, work, args.threads, log)
        with lock, open(work / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        return row

    # --jobs N: N cases' `tunesmith train` processes at once (a peak RSS is the process's own, so running beside
    # another changes the seconds, not the peak; give each job its own core: --jobs <= cores / --threads).
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(measure, cases))
    report = {"model": model, "steps": steps, "threads": args.threads, "calibration": calibration, "cases": rows,
              "summary": summarize(rows),
              "protocol": "whole-process peak RSS (os.wait4 ru_maxrss) of `python -m tunesmith.cli train` per case vs "
                          "plan/report.planned_peak for the same config; glibc malloc defaults; fit set = the calibration "
                          "case (tiny model: CPU overhead) and, for the heap-retention constant, --mini-layers 12 at "
                          "256/512/1024 tokens + the reference model at 512 tokens; reported set = the cases"}
    if args.budget_check and not args.quick:
        report["budget_check"] = budget_check(model, tokenizer, work, args.threads, args.steps, args.budget_seq_len, log)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"{'case':<26}{'predicted MiB':>15}{'measured MiB':>14}{'error':>9}{'labelled':>10}{'s':>7}")
        for r in rows:
            label = r["case"] + (f" #{r['repeat']}" if r.get("repeat", 1) > 1 else "")
            if "relative_error" in r:
                print(f"{label:<26}{r['predicted_bytes'] / MiB:>15,.0f}{r['peak_rss_bytes'] / MiB:>14,.0f}"
                      f"{r['relative_error']:>+9.1%}{r['labelled_share'] or 0:>10.2f}{r['seconds']:>7}")
            else:
                print(f"{label:<26}{'failed':>15}")
    s = report["summary"]
    ratios = ", ".join(f"{r['case']}={r['peak_rss_bytes'] / r['predicted_bytes']:.3f}" for r in rows if "relative_error" in r)
    print(f"ratio=measured/predicted {ratios}; worst relative error {s['worst_relative_error']} ({s['worst_case']}); "
          f"against each case's highest run {s['worst_relative_error_vs_case_max']} ({s['worst_case_vs_case_max']})",
          file=sys.stderr if args.json else sys.stdout)
    return 0 if not s["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
