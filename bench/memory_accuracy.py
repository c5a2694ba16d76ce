"""Predicted vs measured training memory per method on the reference model (SmolLM2-135M-Instruct).

Each method runs in a fresh subprocess: load the base (as the method loads it), apply the method, build a plain
AdamW over the trainable parameters, touch every weight page (the safetensors file is memory-mapped, so untouched
weights would otherwise page in during the first step and count as growth), then take the resident set size as
the baseline. Then `--steps` training steps (forward with labels, backward, AdamW step, zero_grad(set_to_none))
on random tokens; the measured figure is the peak RSS (VmHWM, reset by /proc/self/clear_refs before the steps)
minus the baseline. On a GPU it is torch.cuda.max_memory_allocated() minus the allocated bytes at the baseline.

The prediction is the planner's estimate minus what the baseline already holds (base weights, the method's
trainable weights, the runtime): gradients, optimizer state, activations, scratch.

glibc keeps freed heap memory and its dynamic mmap threshold grows after large frees, so without settings RSS
climbs step after step by fragmentation rather than by live tensors; the subprocesses run with
MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_ARENA_MAX=2 so large tensors are returned on free and RSS follows live
memory (printed in the assumptions; `--no-malloc-env` turns this off).

Ratio reported: measured / predicted per method; the summary line gives the worst relative error.

    nice python bench/memory_accuracy.py [--batch-size 2 --seq-len 128 --steps 3 --methods lora,full --json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD_FLAG = "--child"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def method_config(name: str, args: argparse.Namespace):
    from tunesmith.config import MethodConfig

    options: dict = {"name": name}
    if name in ("lora", "qlora"):
        targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
        options["lora"] = {"r": args.rank, "alpha": 2 * args.rank, "target_modules": targets}
    return MethodConfig.model_validate(options)


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from tunesmith.config import ModelConfig
    from tunesmith.methods.registry import get_method
    from tunesmith.models.load import load_model

    name = args.methods
    cuda = torch.cuda.is_available()
    config = method_config(name, args)
    method = get_method(name)
    model = load_model(ModelConfig(name_or_path=args.model, dtype="float32"), log=lambda *_: None,
                       **method.base_load_kwargs(config))
    if cuda:
        model = model.cuda()
    model = method.apply(model, config)
    if args.gradient_checkpointing:
        method.enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    with torch.no_grad():
        for p in model.parameters():  # page in every weight (see the module docstring)
            float(p.view(-1)[:: max(1, 4096 // max(1, p.element_size()))].float().sum()) if p.numel() else None
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)
    if cuda:
        ids = ids.cuda()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _status_bytes("VmRSS:")
    _reset_peak()
    peaks = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out
        peaks.append((torch.cuda.max_memory_allocated() - base) if cuda else _status_bytes("VmHWM:") - base_rss)
    return {"method": name, "measured_bytes": max(peaks), "per_step_bytes": peaks, "baseline_rss_bytes": base_rss,
            "trainable_params": sum(p.numel() for p in params), "device": "cuda" if cuda else "cpu",
            "seconds": round(time.perf_counter() - t0, 1)}


def predict(name: str, args: argparse.Namespace, device: str) -> dict:
    from tunesmith.models.facts import model_facts
    from tunesmith.plan.memory import TrainSetup, estimate_memory

    facts = model_facts(args.model)
    setup = TrainSetup(batch_size=args.batch_size, seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
                       weight_dtype="fp32", compute_dtype="fp32", device=device)
    est = estimate_memory(facts, method_config(name, args), setup)
    # What the baseline already holds: base weights, the method's own trainable weights, the runtime.
    predicted = est.total - est.weights - est.trainable - est.overhead
    return {"predicted_bytes": int(predicted), "trainable_params_predicted": est.trainable_params,
            "breakdown": est.memory_bytes()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--methods", default="lora,qlora,full,prefix,prompt,adapters")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-malloc-env", action="store_true", help="measure with glibc's default malloc settings")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    from tunesmith.methods.registry import get_method

    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    missing, runnable = [], []
    for name in wanted:
        try:
            get_method(name)
            runnable.append(name)
        except Exception as exc:  # a method not landed yet: say so, run the others
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    env = dict(os.environ)
    if not args.no_malloc_env:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    results: dict[str, dict] = {}
    passthrough = [f"--model={args.model}", f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}",
                   f"--steps={args.steps}", f"--rank={args.rank}", f"--targets={args.targets}", f"--threads={args.threads}"]
    if args.gradient_checkpointing:
        passthrough.append("--gradient-checkpointing")
    for name in runnable:
        proc = subprocess.run([sys.executable, __file__, CHILD_FLAG, f"--methods={name}", *passthrough],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            missing.append(f"{name} (failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
            continue
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        pred = predict(name, args, measured["device"])
        rel = (pred["predicted_bytes"] - measured["measured_bytes"]) / measured["measured_bytes"]
        print(f"{name}: predicted {pred['predicted_bytes'] / 2**20:.1f} MiB, measured {measured['measured_bytes'] / 2**20:.1f} MiB "
              f"({rel:+.1%}), per step {[round(b / 2**20, 1) for b in measured['per_step_bytes']]} MiB", file=sys.stderr, flush=True)
        results[name] = {"predicted_bytes": pred["predicted_bytes"], "measured_bytes": measured["measured_bytes"],
                         "relative_error": round(rel, 4), "per_step_bytes": measured["per_step_bytes"],
                         "trainable_params": measured["trainable_params"],
                         "trainable_params_predicted": pred["trainable_params_predicted"],
                         "device": measured["device"], "seconds": measured["seconds"]}
    worst = max((abs(r["relative_error"]) for r in results.values()), default=float("nan"))
    assumptions = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                   "lora": f"r={args.rank}, targets={args.targets}, dropout 0.05", "dtype": "float32",
                   "gradient_checkpointing": args.gradient_checkpointing,
                   "malloc_env": None if args.no_malloc_env else "MALLOC_MMAP_THRESHOLD_=65536 MALLOC_ARENA_MAX=2",
                   "measured": "peak RSS growth over the loaded baseline (CUDA: peak allocated growth)"}
    if args.json:
        print(json.dumps({"methods": results, "missing": missing, "assumptions": assumptions,
                          "worst_relative_error": worst}, indent=2))
    else:
        print("assumptions: " + "; ".join(f"{k}={v}" for k, v in assumptions.items()))
        print(f"{'method':<10}{'predicted MiB':>15}{'measured MiB':>15}{'rel. error':>12}{'trainable':>13}")
        for name, r in results.items():
            print(f"{name:<10}{r['predicted_bytes'] / 2**20:>15.1f}{r['measured_bytes'] / 2**20:>15.1f}"
                  f"{r['relative_error']:>+12.1%}{r['trainable_params']:>13,}")
        for line in missing:
            print(f"not run: {line}")
        ratios = ", ".join(f"{n}={r['measured_bytes'] / r['predicted_bytes']:.3f}" for n, r in results.items())
        print(f"ratio=measured/predicted {ratios}; worst relative error {worst:.1%} (target 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
