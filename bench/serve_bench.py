"""Multi-adapter serving throughput: tunesmith mixed batches vs the base model, peft mixed batches and naive peft.

For N concurrent clients (each sends `--rounds` requests one after another) over 1, 8 and 32 adapters:
  (a) base      the base model alone through the same engine (continuous batching, no LoRA)
  (b) tunesmith mixed-adapter batches (gathered bmm LoRA deltas, continuous batching)
  (c) peft-mixed  peft's own mixed batches: generate(..., adapter_names=[per row]) on static batches of N
  (d) naive     peft with one adapter active per forward: each batch split by adapter, one generate per group
Every request generates exactly max_tokens (eos ignored) in every mode, so all modes do the same work.
Reports generated tokens/s and p50/p99 request latency, then the ratios the issue sets targets for (32 adapters):
tunesmith/base >= 0.9, tunesmith/peft-mixed >= 1.5, tunesmith/naive >= 4.

    python bench/serve_bench.py --tiny            # seconds, tiny random model
    python bench/serve_bench.py                   # SmolLM2-135M-Instruct (make reference)
    python bench/serve_bench.py --rounds 2 --max-tokens 32 --repeats 2   # docs/benchmarks.md (~12 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(mode: str, n_adapters: int, tokens: int, seconds: float, latencies: list[float]) -> dict:
    return {"mode": mode, "adapters": n_adapters, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2), "p50_s": round(percentile(latencies, 0.5), 3),
            "p99_s": round(percentile(latencies, 0.99), 3)}


def make_jobs(prompts: list[list[int]], names: list[str | None], clients: int, rounds: int):
    """Client c, round k -> (prompt, adapter): adapters spread round-robin over all requests."""
    jobs = []
    for c in range(clients):
        jobs.append([(prompts[(c + k) % len(prompts)], names[(c * rounds + k) % len(names)]) for k in range(rounds)])
    return jobs


def run_engine(engine, jobs, max_tokens: int) -> tuple[int, float, list[float]]:
    from tunesmith.serve.engine import GenRequest

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(part):
        for prompt, adapter in part:
            result = engine.generate([GenRequest(prompt_ids=prompt, adapter=adapter, max_tokens=max_tokens,
                                                 ignore_eos=True)])[0]
            with lock:
                latencies.append(result.latency_s)
                tokens[0] += result.completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(part,)) for part in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0], time.perf_counter() - start, latencies


def _left_pad(tokenizer, prompts):
    from tunesmith.serve.segments import left_pad

    ids, mask, _ = left_pad(prompts, tokenizer.pad_token_id)
    return ids, mask


def _count(out: torch.Tensor, prompt_len: int) -> list[int]:
    return [len(row) for row in out[:, prompt_len:].tolist()]  # min_new_tokens = max_new_tokens: no early eos


def run_peft(peft_model, tokenizer, jobs, max_tokens: int, naive: bool) -> tuple[int, float, list[float]]:
    """Static batches: round k of every client forms one batch of N rows (the best case for static batching)."""
    latencies: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for k in range(len(jobs[0])):
        batch = [part[k] for part in jobs]
        t0 = time.perf_counter()
        if not naive:
            ids, mask = _left_pad(tokenizer, [p for p, _ in batch])
            names = [a or "__base__" for _, a in batch]
            with torch.inference_mode():
                out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                          min_new_tokens=max_tokens, do_sample=False, adapter_names=names)
            tokens += sum(_count(out, ids.shape[1]))
            latencies += [time.perf_counter() - t0] * len(batch)
            continue
        groups: dict[str, list[list[int]]] = {}
        for prompt, adapter in batch:
            groups.setdefault(adapter, []).append(prompt)
        for adapter, prompts in groups.items():
            peft_model.set_adapter(adapter)
            ids, mask = _left_pad(tokenizer, prompts)
            with torch.inference_mode():
                out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                          min_new_tokens=max_tokens, do_sample=False)
            tokens += sum(_count(out, ids.shape[1]))
            latencies += [time.perf_counter() - t0] * len(prompts)
    return tokens, time.perf_counter() - start, latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (seconds) instead of SmolLM2-135M")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients N")
    parser.add_argument("--rounds", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--adapters", default="1,8,32", help="adapter counts to measure")
    parser.add_argument("--repeats", type=int, default=1, help="rotations of all modes; ratios are medians over them")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the generated adapters")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print a JSON record at the end")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.serve.engine import Engine
    from tunesmith.serve.testing import make_lora_adapter

    workdir = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.tiny:
        from tunesmith.models.tiny import save_tiny_model

        base_dir = save_tiny_model(workdir / "base")
    else:
        from tunesmith.config import ModelConfig
        from tunesmith.models.load import resolve_source

        base_dir = Path(resolve_source(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    counts = [int(c) for c in args.adapters.split(",")]
    base_model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    t0 = time.perf_counter()
    paths = {f"ad{i}": make_lora_adapter(base_dir, workdir / f"ad{i}", seed=i, r=args.rank, base_model=base_model)
             for i in range(max(counts))}
    print(f"made {len(paths)} rank-{args.rank} adapters in {time.perf_counter() - t0:.1f} s", flush=True)
    texts = ["Write a short note about the weather today.", "List three fruits and their colours.",
             "Explain what a contract is in one sentence.", "Translate 'good morning' to French.",
             "What is two plus two?", "Name a famous painter.", "Describe a cat.", "Give me a haiku about rain."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=True) for t in texts]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]

    records = []
    engine = Engine(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), tokenizer,
                    max_batch_size=max(32, args.clients), base_names={str(base_dir)})
    for name, path in paths.items():
        engine.add_adapter(name, path)
    warm = make_jobs(prompts, list(paths), args.clients, 1)
    run_engine(engine, warm, 2)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                           str(paths["ad0"]), adapter_name="ad0")
    loaded = {"ad0"}
    ratios = {}
    for n in counts:
        names = [f"ad{i}" for i in range(n)]
        for name in names:
            if name not in loaded:
                peft_model.load_adapter(str(paths[name]), adapter_name=name)
                loaded.add(name)
        jobs = make_jobs(prompts, names, args.clients, args.rounds)
        run_engine(engine, make_jobs(prompts, names, args.clients, 1), 2)  # every adapter hot before timing
        base_jobs = make_jobs(prompts, [None], args.clients, args.rounds)
        # Modes run in rotation, `--repeats` times: this machine's speed drifts by 10-20% over minutes, so each
        # ratio is taken within one rotation (adjacent runs) and the median over rotations is reported.
        per_round = []
        for _ in range(args.repeats):
            row = {"base": summarize("base", n, *run_engine(engine, base_jobs, args.max_tokens))}
            print(json.dumps(row["base"]), flush=True)
            row["tunesmith"] = summarize("tunesmith", n, *run_engine(engine, jobs, args.max_tokens))
            print(json.dumps(row["tunesmith"]), flush=True)
            row["peft-mixed"] = summarize("peft-mixed", n, *run_peft(peft_model, tokenizer, jobs, args.max_tokens, False))
            print(json.dumps(row["peft-mixed"]), flush=True)
            row["naive"] = summarize("naive", n, *run_peft(peft_model, tokenizer, jobs, args.max_tokens, True))
            print(json.dumps(row["naive"]), flush=True)
            records += row.values()
            tps = {k: v["tokens_per_s"] for k, v in row.items()}
            per_round.append({"vs_base": tps["tunesmith"] / tps["base"], "vs_peft_mixed": tps["tunesmith"] / tps["peft-mixed"],
                              "vs_naive": tps["tunesmith"] / tps["naive"]})
        ratios[n] = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
        ratios[n]["rounds"] = [{k: round(v, 3) for k, v in r.items()} for r in per_round]
    engine.close()

    print(f"\nmodel={'tiny' if args.tiny else 'SmolLM2-135M-Instruct'} clients={args.clients} rounds={args.rounds} "
          f"max_tokens={args.max_tokens} rank={args.rank} threads={args.threads}")
    print(f"{'mode':<11}{'adapters':>9}{'tok/s':>10}{'p50 s':>9}{'p99 s':>9}   (base rows: same jobs, no adapter)")
    for r in records:
        print(f"{r['mode']:<11}{r['adapters']:>9}{r['tokens_per_s']:>10.1f}{r['p50_s']:>9.3f}{r['p99_s']:>9.3f}")
    for n, r in ratios.items():
        print(f"adapters={n}: tunesmith/base={r['vs_base']:.2f} tunesmith/peft-mixed={r['vs_peft_mixed']:.2f} "
              f"tunesmith/naive={r['vs_naive']:.2f}  (median of {len(r['rounds'])}; per rotation "
              + ", ".join(f"{x['vs_base']:.2f}/{x['vs_peft_mixed']:.2f}/{x['vs_naive']:.2f}" for x in r["rounds"]) + ")")
    top = ratios[max(ratios)]
    targets = {"vs_base": 0.9, "vs_peft_mixed": 1.5, "vs_naive": 4.0}
    met = {k: top[k] >= v for k, v in targets.items()}
    print(f"targets at {max(ratios)} adapters (>=0.9 / >=1.5 / >=4): "
          + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in met.items()))
    if args.json:
        print(json.dumps({"bench": "serve", "records": records, "ratios": ratios, "targets_met": met}))
    print(f"ratio={top['vs_base']:.3f} (tunesmith/base tokens/s at {max(ratios)} adapters; "
          f"vs peft mixed {top['vs_peft_mixed']:.2f}x, vs naive {top['vs_naive']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
