"""Multi-adapter serving throughput: tunesmith mixed batches vs the base model, peft mixed batches and naive peft.

For N concurrent clients (each sends `--rounds` requests one after another) over 1, 8 and 32 adapters:
  (a) base      the base model alone through the same engine (continuous batching, no LoRA)
  (b) tunesmith mixed-adapter batches (gathered bmm LoRA deltas, continuous batching)
  (c) peft-mixed  peft's own mixed batches: generate(..., adapter_names=[per row]) on static batches of N
  (d) naive     peft with one adapter active per forward: each batch split by adapter, one generate per group
  (e) hf-base   plain transformers `generate` of the base model on static batches of the same prompts and token
                counts (round k of every client forms one batch): the reference users compare against
Every request generates exactly max_tokens (eos ignored) in every mode, so all modes do the same work. Every mode
is warmed the same way before timing: the same jobs once with 2 new tokens (first generate, every adapter used).
Reports generated tokens/s, p50/p99 request latency and time to first token, then the ratios (32 adapters):
tunesmith/hf-base >= 0.9, tunesmith/base >= 0.9, tunesmith/peft-mixed >= 1.5, tunesmith/naive >= 4.

`--slora`: the next scale, as S-LoRA measures it. `--registered` adapters (256) are registered with an engine whose
cache holds `--cache-slots` (32) of them; each request picks one of all registered adapters uniformly at random
(seeded), so adapters load and evict while serving. Compared in rotation with hf-base and with the same workload
over `--cache-slots` adapters that all stay hot. Reports throughput / hf-base, p50/p99 time to first token, and the
cache's loads and evictions during the timed run. Targets: >= 0.8x hf-base, p99 TTFT <= 3x the all-hot case.

    python bench/serve_bench.py --tiny            # seconds, tiny random model
    python bench/serve_bench.py                   # SmolLM2-135M-Instruct (make reference)
    python bench/serve_bench.py --rounds 2 --max-tokens 32 --repeats 2   # docs/benchmarks.md (~12 min)
    python bench/serve_bench.py --clients 32 --max-tokens 32 --adapters 32 --repeats 2   # the side-by-side case
    python bench/serve_bench.py --slora --clients 32 --rounds 4 --max-tokens 32 --repeats 2   # 256 over 32 slots
    python bench/serve_bench.py --tiny --quick --slora   # seconds: tests/test_benches.py
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


def summarize(mode: str, n_adapters: int, tokens: int, seconds: float, latencies: list[float],
              ttfts: list[float] | None = None) -> dict:
    out = {"mode": mode, "adapters": n_adapters, "tokens": tokens, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 2), "p50_s": round(percentile(latencies, 0.5), 3),
           "p99_s": round(percentile(latencies, 0.99), 3)}
    if ttfts:
        out.update(ttft_p50_s=round(percentile(ttfts, 0.5), 3), ttft_p99_s=round(percentile(ttfts, 0.99), 3))
    return out


def make_jobs(prompts: list[list[int]], names: list[str | None], clients: int, rounds: int):
    """Client c, round k -> (prompt, adapter): adapters spread round-robin over all requests."""
    jobs = []
    for c in range(clients):
        jobs.append([(prompts[(c + k) % len(prompts)], names[(c * rounds + k) % len(names)]) for k in range(rounds)])
    return jobs


def run_engine(engine, jobs, max_tokens: int) -> tuple[int, float, list[float], list[float]]:
    from tunesmith.serve.engine import GenRequest

    latencies: list[float] = []
    ttfts: list[float] = []
    errors: list[str] = []
    tokens = [0]
    lock = threading.Lock()

    def client(part):
        for prompt, adapter in part:
            result = engine.generate([GenRequest(prompt_ids=prompt, adapter=adapter, max_tokens=max_tokens,
                                                 ignore_eos=True)], timeout=1800)[0]
            with lock:
                if not hasattr(result, "latency_s"):  # a GenError
                    errors.append(f"request for adapter {adapter} failed: {result}")
                    continue
                latencies.append(result.latency_s)
                ttfts.append(result.ttft_s)
                tokens[0] += result.completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(part,)) for part in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors or len(latencies) != sum(len(part) for part in jobs):
        raise RuntimeError(f"{len(errors)} of {sum(len(part) for part in jobs)} requests failed: {errors[:3]}")
    return tokens[0], time.perf_counter() - start, latencies, ttfts


def _left_pad(tokenizer, prompts):
    from tunesmith.serve.segments import left_pad

    ids, mask, _ = left_pad(prompts, tokenizer.pad_token_id)
    return ids, mask


def _count(out: torch.Tensor, prompt_len: int) -> list[int]:
    return [len(row) for row in out[:, prompt_len:].tolist()]  # min_new_tokens = max_new_tokens: no early eos


def _generate_counted(model, tokenizer, prompts, max_tokens: int, **kwargs) -> int:
    """One static left-padded batch through `generate`, exactly `max_tokens` new tokens per row; tokens generated."""
    ids, mask = _left_pad(tokenizer, prompts)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, **kwargs)
    return sum(_count(out, ids.shape[1]))


def run_hf_base(model, tokenizer, jobs, max_tokens: int) -> tuple[int, float, list[float]]:
    """Plain transformers generate of the base model; round k of every client forms one static batch of N rows."""
    latencies: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for k in range(len(jobs[0])):
        batch = [part[k] for part in jobs]
        t0 = time.perf_counter()
        tokens += _generate_counted(model, tokenizer, [p for p, _ in batch], max_tokens)
        latencies += [time.perf_counter() - t0] * len(batch)
    return tokens, time.perf_counter() - start, latencies


def run_peft(peft_model, tokenizer, jobs, max_tokens: int, naive: bool) -> tuple[int, float, list[float]]:
    """Static batches: round k of every client forms one batch of N rows (the best case for static batching)."""
    latencies: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for k in range(len(jobs[0])):
        batch = [part[k] for part in jobs]
        t0 = time.perf_counter()
        if not naive:
            names = [a or "__base__" for _, a in batch]
            tokens += _generate_counted(peft_model, tokenizer, [p for p, _ in batch], max_tokens, adapter_names=names)
            latencies += [time.perf_counter() - t0] * len(batch)
            continue
        groups: dict[str, list[list[int]]] = {}
        for prompt, adapter in batch:
            groups.setdefault(adapter, []).append(prompt)
        for adapter, prompts in groups.items():
            peft_model.set_adapter(adapter)
            tokens += _generate_counted(peft_model, tokenizer, prompts, max_tokens)
            latencies += [time.perf_counter() - t0] * len(prompts)
    return tokens, time.perf_counter() - start, latencies


def make_adapters(base_dir: Path, workdir: Path, count: int, rank: int, base_model) -> dict[str, Path]:
    """`count` random rank-`rank` all-linear peft adapters. The first is made by peft; the rest copy its config and
    draw new A and B with its key names and shapes (peft's save for each would take minutes at 256 adapters)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tunesmith.serve.testing import make_lora_adapter

    first = make_lora_adapter(base_dir, workdir / "ad0", seed=0, r=rank, base_model=base_model)
    paths = {"ad0": first}
    template = load_file(str(first / "adapter_model.safetensors"))
    for i in range(1, count):
        folder = workdir / f"ad{i}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(first / "adapter_config.json", folder / "adapter_config.json")
        generator = torch.Generator().manual_seed(i)
        # peft's init_lora_weights=False draws A and B like nn.Linear's default (kaiming-uniform scale)
        tensors = {k: (torch.rand(v.shape, generator=generator) * 2 - 1) / v.shape[1] ** 0.5 for k, v in template.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        paths[f"ad{i}"] = folder
    return paths


def timed_rotations(modes: dict, repeats: int, n: int) -> tuple[list[dict], list[dict]]:
    """Run every mode `repeats` times in rotation (adjacent runs); returns the per-rotation rows."""
    rows = []
    for _ in range(repeats):
        row = {}
        for name, run in modes.items():
            row[name] = summarize(name, n, *run())
            print(json.dumps(row[name]), flush=True)
        rows.append(row)
    return rows, [r for row in rows for r in row.values()]


def medians(per_rotation: list[dict[str, float]]) -> dict:
    out = {k: statistics.median(r[k] for r in per_rotation) for k in per_rotation[0]}
    out["rounds"] = [{k: round(v, 3) for k, v in r.items()} for r in per_rotation]
    return out


def bench_counts(args, engine, peft_model, hf_base, tokenizer, prompts, paths) -> tuple[dict, list[dict]]:
    """Modes base, tunesmith, peft-mixed, naive, hf-base over 1, 8, 32 adapters (args.adapters)."""
    ratios, records, loaded = {}, [], {"ad0"}
    for n in [int(c) for c in args.adapters.split(",")]:
        names = [f"ad{i}" for i in range(n)]
        for name in names:
            if name not in loaded:
                peft_model.load_adapter(str(paths[name]), adapter_name=name)
                loaded.add(name)
        jobs = make_jobs(prompts, names, args.clients, args.rounds)
        base_jobs = make_jobs(prompts, [None], args.clients, args.rounds)

        def modes(tokens, jobs=jobs, base_jobs=base_jobs):
            return {"base": lambda: run_engine(engine, base_jobs, tokens),
                    "tunesmith": lambda: run_engine(engine, jobs, tokens),
                    "peft-mixed": lambda: run_peft(peft_model, tokenizer, jobs, tokens, False),
                    "naive": lambda: run_peft(peft_model, tokenizer, jobs, tokens, True),
                    "hf-base": lambda: run_hf_base(hf_base, tokenizer, jobs, tokens)}

        for run in modes(2).values():  # the same warm-up for every mode: first generate, every adapter used once
            run()
        # Modes run in rotation, `--repeats` times: this machine's speed drifts by 10-20% over minutes, so each
        # ratio is taken within one rotation (adjacent runs) and the median over rotations is reported.
        rows, flat = timed_rotations(modes(args.max_tokens), args.repeats, n)
        records += flat
        per_round = []
        for row in rows:
            tps = {k: v["tokens_per_s"] for k, v in row.items()}
            per_round.append({"vs_hf_base": tps["tunesmith"] / tps["hf-base"], "vs_base": tps["tunesmith"] / tps["base"],
                              "vs_peft_mixed": tps["tunesmith"] / tps["peft-mixed"],
                              "vs_naive": tps["tunesmith"] / tps["naive"]})
        ratios[n] = medians(per_round)
    return ratios, records


def bench_slora(args, base_dir, tokenizer, prompts, paths, hf_base, make_engine) -> tuple[dict, list[dict]]:
    """256 registered adapters, a cache of 32 slots, requests spread uniformly over all of them."""
    import random

    slots, registered = args.cache_slots, args.registered
    cold = make_engine(0)
    specs = [cold.add_adapter(name, path) for name, path in paths.items()]
    spec = specs[0]
    slot_bytes = spec.rank * sum(i + o for _, i, o in spec.modules.values()) * 4  # fp32 A and B, as the cache sizes
    cold.close()
    cold, hot = make_engine(slots * slot_bytes), make_engine(slots * slot_bytes)
    for name, path in paths.items():
        cold.add_adapter(name, path)
    for name in list(paths)[:slots]:
        hot.add_adapter(name, path=paths[name])
    requests = args.clients * args.rounds
    rng = random.Random(0)
    cold_names = [f"ad{rng.randrange(registered)}" for _ in range(requests)]
    hot_names = [f"ad{rng.randrange(slots)}" for _ in range(requests)]
    cold_jobs = make_jobs(prompts, cold_names, args.clients, args.rounds)
    hot_jobs = make_jobs(prompts, hot_names, args.clients, args.rounds)
    # the cold warm-up draws its own adapters: warming with the timed draws would leave exactly those hot
    warm_cold_jobs = make_jobs(prompts, [f"ad{rng.randrange(registered)}" for _ in range(requests)], args.clients,
                               args.rounds)
    counters: list[dict] = []

    def run_cold(tokens):
        before = dict(cold.cache.counters)
        result = run_engine(cold, cold_jobs if tokens == args.max_tokens else warm_cold_jobs, tokens)
        counters.append({k: cold.cache.counters[k] - before[k] for k in ("loads", "evictions", "misses", "hits")})
        return result

    def modes(tokens):
        return {"hf-base": lambda: run_hf_base(hf_base, tokenizer, hot_jobs, tokens),
                "tunesmith-hot": lambda: run_engine(hot, hot_jobs, tokens),
                "tunesmith-cold": lambda: run_cold(tokens)}

    for run in modes(2).values():
        run()
    rows, flat = timed_rotations(modes(args.max_tokens), args.repeats, registered)
    timed_counters = counters[1:]
    for row, count in zip(rows, timed_counters, strict=True):
        row["tunesmith-cold"].update(count)
    per_round = [{"cold_vs_hf_base": r["tunesmith-cold"]["tokens_per_s"] / r["hf-base"]["tokens_per_s"],
                  "hot_vs_hf_base": r["tunesmith-hot"]["tokens_per_s"] / r["hf-base"]["tokens_per_s"],
                  "ttft_p99_cold_over_hot": r["tunesmith-cold"]["ttft_p99_s"] / max(r["tunesmith-hot"]["ttft_p99_s"], 1e-9)}
                 for r in rows]
    result = medians(per_round)
    result.update(registered=registered, cache_slots=slots, distinct_adapters_requested=len(set(cold_names)),
                  max_hot=cold.cache.max_hot(), loads=[c["loads"] for c in timed_counters],
                  evictions=[c["evictions"] for c in timed_counters],
                  ttft_p50_s={m: [r[m]["ttft_p50_s"] for r in rows] for m in ("tunesmith-hot", "tunesmith-cold")},
                  ttft_p99_s={m: [r[m]["ttft_p99_s"] for r in rows] for m in ("tunesmith-hot", "tunesmith-cold")})
    cold.close()
    hot.close()
    return result, flat


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (seconds) instead of SmolLM2-135M")
    parser.add_argument("--quick", action="store_true", help="small everything (tests): 4 clients x 4 rounds, 4 tokens, 1,4 "
                                                             "adapters, --slora over 16 registered / 4 slots")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients N")
    parser.add_argument("--rounds", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--adapters", default="1,8,32", help="adapter counts to measure ('' with --slora: only it)")
    parser.add_argument("--repeats", type=int, default=1, help="rotations of all modes; ratios are medians over them")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the generated adapters")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--slora", action="store_true", help="also run the S-LoRA-scale case (see above)")
    parser.add_argument("--registered", type=int, default=256, help="--slora: adapters registered")
    parser.add_argument("--cache-slots", type=int, default=32, help="--slora: adapters the cache holds")
    parser.add_argument("--json", action="store_true", help="print a JSON record at the end")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.max_tokens, args.adapters = 4, 4, 4, "1,4"
        args.registered, args.cache_slots = 16, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.serve.engine import Engine

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
    counts = [int(c) for c in args.adapters.split(",") if c.strip()]

    def load():
        return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)

    hf_base = load()
    t0 = time.perf_counter()
    paths = make_adapters(base_dir, workdir, max([*counts, args.registered if args.slora else 0]), args.rank, hf_base)
    print(f"made {len(paths)} rank-{args.rank} adapters in {time.perf_counter() - t0:.1f} s", flush=True)
    texts = ["Write a short note about the weather today.", "List three fruits and their colours.",
             "Explain what a contract is in one sentence.", "Translate 'good morning' to French.",
             "What is two plus two?", "Name a famous painter.", "Describe a cat.", "Give me a haiku about rain."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=True) for t in texts]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]

    def make_engine(budget=512 << 20):
        return Engine(load(), tokenizer, max_batch_size=max(32, args.clients), base_names={str(base_dir)},
                      cache_budget_bytes=budget or (1 << 40))

    ratios, records, slora = {}, [], None
    if counts:
        engine = make_engine()
        for name in [f"ad{i}" for i in range(max(counts))]:
            engine.add_adapter(name, paths[name])
        peft_model = PeftModel.from_pretrained(load(), str(paths["ad0"]), adapter_name="ad0")
        ratios, records = bench_counts(args, engine, peft_model, hf_base, tokenizer, prompts, paths)
        engine.close()
    if args.slora:
        slora, flat = bench_slora(args, base_dir, tokenizer, prompts, paths, hf_base, make_engine)
        records += flat
    report(args, ratios, records, slora)
    return 0


def report(args, ratios: dict, records: list[dict], slora: dict | None) -> None:
    print(f"\nmodel={'tiny' if args.tiny else 'SmolLM2-135M-Instruct'} clients={args.clients} rounds={args.rounds} "
          f"max_tokens={args.max_tokens} rank={args.rank} threads={args.threads} repeats={args.repeats}")
    print(f"{'mode':<15}{'adapters':>9}{'tok/s':>10}{'p50 s':>9}{'p99 s':>9}{'ttft p50':>10}{'ttft p99':>10}")
    for r in records:
        print(f"{r['mode']:<15}{r['adapters']:>9}{r['tokens_per_s']:>10.1f}{r['p50_s']:>9.3f}{r['p99_s']:>9.3f}"
              f"{r.get('ttft_p50_s', float('nan')):>10.3f}{r.get('ttft_p99_s', float('nan')):>10.3f}")
    for n, r in ratios.items():
        print(f"adapters={n}: tunesmith/hf-base={r['vs_hf_base']:.2f} tunesmith/base={r['vs_base']:.2f} "
              f"tunesmith/peft-mixed={r['vs_peft_mixed']:.2f} tunesmith/naive={r['vs_naive']:.2f}  (median of "
              f"{len(r['rounds'])}; per rotation " + ", ".join(
                  f"{x['vs_hf_base']:.2f}/{x['vs_base']:.2f}/{x['vs_peft_mixed']:.2f}/{x['vs_naive']:.2f}"
                  for x in r["rounds"]) + ")")
    met = {}
    if ratios:
        top = ratios[max(ratios)]
        targets = {"vs_hf_base": 0.9, "vs_base": 0.9, "vs_peft_mixed": 1.5, "vs_naive": 4.0}
        met = {k: top[k] >= v for k, v in targets.items()}
        print(f"targets at {max(ratios)} adapters (>=0.9 / >=0.9 / >=1.5 / >=4): "
              + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in met.items()))
    if slora:
        print(f"S-LoRA case: {slora['registered']} registered, cache of {slora['cache_slots']} (max hot "
              f"{slora['max_hot']}), {slora['distinct_adapters_requested']} distinct requested: tunesmith/hf-base "
              f"{slora['cold_vs_hf_base']:.2f} (all-hot {slora['hot_vs_hf_base']:.2f}); p99 TTFT cold/hot "
              f"{slora['ttft_p99_cold_over_hot']:.2f}; loads {slora['loads']}, evictions {slora['evictions']} "
              "(per rotation: " + ", ".join(f"{x['cold_vs_hf_base']:.2f}/{x['ttft_p99_cold_over_hot']:.2f}"
                                            for x in slora["rounds"]) + ")")
        met["slora_vs_hf_base"] = slora["cold_vs_hf_base"] >= 0.8
        met["slora_ttft_p99"] = slora["ttft_p99_cold_over_hot"] <= 3.0
    if args.json:
        print(json.dumps({"bench": "serve", "records": records, "ratios": ratios, "slora": slora, "targets_met": met}))
    if ratios:
        top = ratios[max(ratios)]
        print(f"ratio={top['vs_hf_base']:.3f} (tunesmith/hf-base tokens/s at {max(ratios)} adapters; vs tunesmith "
              f"base {top['vs_base']:.2f}, vs peft mixed {top['vs_peft_mixed']:.2f}x, vs naive {top['vs_naive']:.2f}x)")
    else:
        print(f"ratio={slora['cold_vs_hf_base']:.3f} (tunesmith/hf-base tokens/s, {slora['registered']} adapters over "
              f"{slora['cache_slots']} cache slots)")


if __name__ == "__main__":
    sys.exit(main())
