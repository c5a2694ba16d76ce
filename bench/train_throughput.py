"""Training throughput: `tunesmith train` vs transformers Trainer + peft and TRL SFTTrainer, in one run.

All three train LoRA (same rank, alpha, dropout, all-linear targets, learning rate, fp32, micro-batch size,
sequence length) on the same model and data, each in a fresh subprocess (own peak RSS), with the same number of
torch threads (`--threads`, set in every child with torch.set_num_threads and printed):
  baseline  transformers `Trainer` + peft, batches padded to their longest example (`DataCollatorForSeq2Seq`),
            what a plain Trainer script does;
  trl       TRL `SFTTrainer` with its best CPU setting: packing (best-fit decreasing) + padding-free batches,
            `bf16=False` (CPUs without native bf16); the same pre-tokenized rows, prompt tokens masked;
  tunesmith `tunesmith train` (packed sequences, each example attended on its own on CPUs (per-example causal
            SDPA, models/attention.py; before 2026-12-02 a block-diagonal mask over the row); logits only at
            labelled positions, head and loss in one chunked pass (train/head_loss.py); LoRA's update in one
            addmm_, as one autograd Function keeping each input once and a bool dropout mask
            (methods/lora_forward.py)).

What is counted: useful (non-padding) tokens of the batches actually trained. The Trainer sides count them in
`training_step` (the trainer's inputs), not in the collator: accelerate's loader prepares one batch ahead, so a
collator count includes a batch that is never trained. tunesmith logs each step's real tokens (metrics.jsonl).
Timing window, the same on every side: from the end of optimizer step 1 to the end of optimizer step N
(`--steps`), i.e. steps 2..N, each including its batch fetch/collation, forward, backward, clipping and
optimizer update; excluded on every side: model loading, data preparation, step 1 (warm-up: first-call
allocations and kernel selection) and everything after step N. Step ends are taken at the same point on every
side: right after the optimizer's step (a global optimizer step post-hook).

After step N each side runs N more steps, outside the window: steps N+1..2N-1 (as many as were timed) under
torch's FlopCounterMode (matmul and attention FLOPs of forward and backward, as executed: a masked or full
attention call at T x T, a causal one (is_causal) at its T(T+1)/2 computed pairs, the flash backward as 5
matmuls, torch's formula otherwise) and step 2N under torch.profiler, whose self times
are grouped into attention, MLP, LoRA, head (projection + loss), optimizer, collation and other (and the largest
ops of "other" are listed). Achieved FLOP/s = the counted steps' FLOPs per useful token x the window's useful
tokens/s, against a matmul peak (fp32 1024^3 torch.mm) measured in the same child, on the same threads, during the
window: at the end of every step 1..N (best of 5 matmuls, ~0.05 s, excluded from the steps' seconds on every side),
the median of those probes is the denominator (since 2026-12-02 08:00; before, one best-of-10 measurement right
after training, still printed beside it as `utilisation_after`: a shared host's speed drifts within minutes, and a
single probe after training saw 169-211 GFLOP/s in children whose steps ran alike). `utilisation_per_step` holds each
timed step's own FLOP/s against the probes on either side of it.

`--repeats R` runs the three sides in R rotations (order rotated each time); each ratio is taken within one
rotation (adjacent runs) and the median over rotations is reported, as bench/serve_bench.py does.

    python bench/train_throughput.py --tiny                  # tiny random model, about a minute
    python bench/train_throughput.py --repeats 3             # reference model, demo data (make reference)
    python bench/train_throughput.py --data my.jsonl         # any chat/instruction JSONL a user brings
    python bench/train_throughput.py --long-tailed 300 --seq-len 1024   # synthetic long-tailed lengths (below)
The TRL side needs `trl` (`pip install -e '.[bench]'`, or `.venv/bin/pip install trl`); `--sides` picks sides.
Last line: ratio=<tunesmith / Trainer+peft useful tokens/s>; --json prints a JSON record before it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("baseline", "trl", "tunesmith")
LABELS = {"baseline": "Trainer+peft (padded)", "trl": "TRL SFTTrainer (packing, padding-free)",
          "tunesmith": "tunesmith (packed)"}
CATEGORIES = ("attention", "mlp", "lora", "head", "optimizer", "collation", "other")


# ----------------------------------------------------------------------------------------------- instruments
class StepInstruments:
    """Step-end timestamps, plus a FLOP count of the `flop_steps` steps after the timed window and a profile of the
    step after those (all outside the timed window).

    The FLOP count runs after the window because FlopCounterMode slows a step by ~14% (measured on the reference
    model, 4 x 512, LoRA). It spans as many steps as were timed, so that FLOPs per useful token are averaged over a
    comparable mix of batches: packed steps all cost about the same FLOPs but carry different numbers of useful tokens
    (3,118 to 4,087 of 4,096 positions on the long-tailed data), and a single counted step made the utilisation of
    2026-12-01 (before this fix) depend on which batch it was (59% from one step, 45% from FLOPs / mean step time).

    A step ends at the same point on every side: right after the optimizer's step (torch's global optimizer
    step post-hook, which fires for the Trainer's accelerate-wrapped optimizer and tunesmith's alike)."""

    def __init__(self, timed_steps: int, on_step_end=None, flop_steps: int | None = None):
        self.timed_steps = timed_steps
        self.flop_steps = self.counted_steps(timed_steps, flop_steps)
        self.on_step_end = on_step_end
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: self.step_end())
        self.ends: list[float] = []
        self.resumes: list[float] = []  # when training resumed after each step end (after the peak probe)
        self.window_peaks: list[float] = []  # the matmul peak probed at the end of steps 1..timed_steps
        self.rss_at_step_end: list[int] = []  # ru_maxrss (bytes) at each step end
        self.flop_counter = None
        self.profiler = None
        self.flops = 0

    @property
    def total_steps(self) -> int:
        return self.steps_needed(self.timed_steps, self.flop_steps)

    @staticmethod
    def counted_steps(timed_steps: int, flop_steps: int | None = None) -> int:
        """FLOP-counted steps: as many as were timed (steps 2..N) unless given."""
        return max(1, timed_steps - 1 if flop_steps is None else flop_steps)

    @classmethod
    def steps_needed(cls, timed_steps: int, flop_steps: int | None = None) -> int:
        """Optimizer steps a side must run: the timed window, the FLOP-counted steps and the profiled step."""
        return timed_steps + cls.counted_steps(timed_steps, flop_steps) + 1

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        # the process's peak RSS so far at every step end: the timed steps' own peak apart from the FLOP-counted and
        # profiled steps after them (whose instruments hold memory of their own)
        self.rss_at_step_end.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if self.on_step_end is not None:
            self.on_step_end()
        done = len(self.ends)
        if done <= self.timed_steps:  # before any FLOP counter opens: the probe's matmuls are not the step's FLOPs
            self.window_peaks.append(matmul_peak_flops(repeats=PROBE_REPEATS))
        # One counter per counted step: with one counter kept open over 7 steps the tunesmith side peaked at 22.8 GiB
        # (long-tailed data, 4 x 1,024), against 15.7 GiB with a single counted step; the machine has 23 GB.
        if self.flop_counter is not None:
            self.flop_counter.__exit__(None, None, None)
            self.flops += int(self.flop_counter.get_total_flops())
            self.flop_counter = None
        if self.timed_steps <= done < self.timed_steps + self.flop_steps:
            self.flop_counter = flop_counter()
            self.flop_counter.__enter__()
        elif done == self.timed_steps + self.flop_steps:
            import torch

            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
            self.profiler.__enter__()
        elif done == self.total_steps and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
        self.resumes.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Seconds of steps 2..timed_steps, each from the end of the previous step's probe to its own end."""
        return [end - resume for resume, end in zip(self.resumes[: self.timed_steps - 1], self.ends[1: self.timed_steps],
                                                    strict=True)]


def flop_counter():
    """torch's FlopCounterMode, taught the CPU flash-attention kernels (torch 2.x CPU SDPA) and in-place addmm_,
    which it does not count."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def causal_share(query_shape, key_shape, is_causal) -> float:
        # A causal call (is_causal=True: per-example attention, models/attention.py) computes only the n(n+1)/2
        # query-key pairs on and below the diagonal (the kernel skips the blocks above it); torch's formula
        # counts all n^2.
        n = query_shape[-2]
        return (n + 1) / (2 * n) if is_causal and n == key_shape[-2] else 1.0

    def forward(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None,
                **kwargs):
        flops = fc.sdpa_flop_count(query_shape, key_shape, value_shape)
        return int(flops * causal_share(query_shape, key_shape, kwargs.get("is_causal", is_causal)))

    def backward(grad_out_shape, query_shape, key_shape, value_shape, out=None, logsumexp=None, dropout_p=0.0,
                 is_causal=False, *args, out_shape=None, **kwargs):
        flops = fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
        return int(flops * causal_share(query_shape, key_shape, kwargs.get("is_causal", is_causal)))

    def addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # (m, k) @ (k, n), as torch's addmm formula

    # In-place addmm_ (tunesmith's LoRA update, methods/lora_forward.py) is a matmul that torch's table misses.
    mapping = {aten.addmm_: addmm_inplace}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


PROBE_REPEATS = 5  # matmuls per in-window peak probe (~0.05 s at 200 GFLOP/s), outside the steps' seconds


def matmul_peak_flops(size: int = 1024, repeats: int = 10) -> float:
    """Best fp32 torch.mm FLOP/s of size^3 on this process's threads (a machine's practical matmul peak)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def categorize_profile(profiler, dims: dict[str, int]) -> dict[str, float]:
    """Seconds of the profiled step by category, from each op's self CPU time.

    Ranges take precedence (anything under "Optimizer.*" or clip_grad_norm is optimizer; under "collation" is
    collation); otherwise a matmul is classified by its last two dimensions: the vocabulary -> head, the MLP's
    intermediate size -> mlp, the LoRA rank -> lora, anything else (q/k/v/o projections) -> attention; SDPA kernels
    -> attention; log-softmax / cross-entropy / nll -> head; everything else (norms, rotary, elementwise, dropout,
    copies, autograd bookkeeping) -> other."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in profiler.events():
        own = event.self_cpu_time_total / 1e6
        if own <= 0:
            continue
        seconds[_category(event, dims)] += own
    return seconds


def top_other_ops(profiler, dims: dict[str, int], n: int = 8) -> dict[str, float]:
    """The n ops with the most self CPU seconds inside "other" (where the step's time outside the matmuls goes)."""
    seconds: dict[str, float] = {}
    for event in profiler.events():
        own = event.self_cpu_time_total / 1e6
        if own > 0 and _category(event, dims) == "other":
            seconds[event.name] = seconds.get(event.name, 0.0) + own
    return {name: round(v, 4) for name, v in sorted(seconds.items(), key=lambda kv: -kv[1])[:n]}


def _category(event, dims: dict[str, int]) -> str:
    node = event
    while node is not None:
        name = node.name
        if name.startswith("Optimizer.") or "clip_grad" in name or "_foreach" in name:
            return "optimizer"
        if name == "collation":
            return "collation"
        node = node.cpu_parent
    name = event.name.lower()
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if "log_softmax" in name or "cross_entropy" in name or "nll_loss" in name:
        return "head"
    if any(k in name for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")):
        last_dims = {d for shape in (event.input_shapes or []) if isinstance(shape, list) for d in shape[-2:]}
        if dims["vocab"] in last_dims:
            return "head"
        if dims["intermediate"] in last_dims:
            return "mlp"
        if dims["rank"] in last_dims:
            return "lora"
        return "attention"
    return "other"


def model_dims(config, rank: int) -> dict[str, int]:
    return {"vocab": config.vocab_size, "intermediate": config.intermediate_size, "rank": rank}


def finish(instruments: StepInstruments, tokens_per_step: list[int], dims: dict[str, int]) -> dict:
    """The child's measured record; steps are 1-based, tokens_per_step[i] = useful tokens of step i+1."""
    n, k = instruments.timed_steps, instruments.flop_steps
    window_tokens = sum(tokens_per_step[1:n])
    step_seconds = instruments.step_seconds()
    seconds = sum(step_seconds)
    counted_tokens = sum(tokens_per_step[n:n + k])  # the useful tokens of the FLOP-counted steps n+1..n+k
    flops_per_token = instruments.flops / counted_tokens if counted_tokens else 0.0
    tokens_per_second = window_tokens / seconds
    profile_seconds = instruments.ends[n + k] - instruments.resumes[n + k - 1]
    categories = categorize_profile(instruments.profiler, dims) if instruments.profiler is not None else {}
    # The peak: probed at the end of every step of the window (steps 1..n, outside the steps' seconds), so it sees
    # the machine the steps saw (a shared host's speed drifts within minutes); the median of the probes is the
    # denominator. The old single measurement after training is kept beside it.
    probes = instruments.window_peaks
    peak = statistics.median(probes)
    peak_after = matmul_peak_flops()
    achieved = flops_per_token * tokens_per_second
    # per step i (2..n): its own FLOP/s against the mean of the probes taken just before and just after it
    per_step = [flops_per_token * tokens_per_step[i] / step_seconds[i - 1] / ((probes[i - 1] + probes[i]) / 2)
                for i in range(1, n)]
    return {"useful_tokens": window_tokens, "seconds": seconds, "useful_tokens_per_second": tokens_per_second,
            "timed_steps": f"2..{n}", "step_seconds": [round(x, 4) for x in step_seconds],
            "tokens_per_step": tokens_per_step[: n + k + 1], "flops_counted_steps": f"{n + 1}..{n + k}",
            "flops_counted": instruments.flops,
            "flops_per_token": flops_per_token, "achieved_flops": achieved, "matmul_peak_flops": peak,
            "matmul_peak_probes": [round(x / 1e9, 1) for x in probes], "utilisation": achieved / peak,
            "utilisation_per_step": [round(x, 4) for x in per_step],
            "matmul_peak_after_flops": peak_after, "utilisation_after": achieved / peak_after,
            "profile_step_seconds": profile_seconds,
            "peak_rss_timed_steps_bytes": instruments.rss_at_step_end[n - 1],
            "peak_rss_at_step_end_bytes": list(instruments.rss_at_step_end),
            "profile_seconds": {k: round(v, 4) for k, v in categories.items()},
            "profile_top_other": top_other_ops(instruments.profiler, dims) if instruments.profiler is not None else {}}


# ----------------------------------------------------------------------------------------------- the sides
def child_tunesmith(args) -> dict:
    import tunesmith.train.loop as loop
    from tunesmith.config import load_config
    from tunesmith.recipes.finetune import run_finetune
    from tunesmith.records.metrics import read_metrics

    instruments = StepInstruments(args.steps)
    collate = loop.collate

    def named_collate(*a, **k):
        import torch

        with torch.profiler.record_function("collation"):
            return collate(*a, **k)

    loop.collate = named_collate
    config = load_config(None, [
        f"model.name_or_path={args.model}", f"data.train=[{args.data}]", "data.validation_fraction=0",
        f"data.max_seq_len={args.seq_len}", "data.packing=true", f"train.batch_size={args.batch}",
        f"train.max_steps={instruments.total_steps}", "train.learning_rate=2e-4", "train.show_progress=false",
        "train.precision=fp32", "train.logging_steps=1", f"method.lora.r={args.rank}",
        f"method.lora.alpha={2 * args.rank}", "method.lora.dropout=0.05", "method.lora.target_modules=all-linear",
        f"output.dir={args.out}", "output.name=tunesmith", "output.register_run=false", "train.save_steps=100000",
    ])
    run_finetune(config, log=lambda *a, **k: None)
    records = read_metrics(Path(args.out) / "tunesmith/metrics.jsonl")
    cumulative = [r["tokens"] for r in records if "tokens" in r]
    tokens_per_step = [b - a for a, b in zip([0, *cumulative], cumulative, strict=False)]
    from transformers import AutoConfig

    from tunesmith.config import ModelConfig
    from tunesmith.models.load import resolve_source

    dims = model_dims(AutoConfig.from_pretrained(resolve_source(ModelConfig(name_or_path=args.model))), args.rank)
    return finish(instruments, tokens_per_step, dims)


def _rows(args, tokenizer) -> list[dict]:
    from tunesmith.data.formats import read_conversations
    from tunesmith.data.render import render_dataset

    examples, _ = render_dataset(tokenizer, read_conversations(args.data), args.seq_len)
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def _trainer_class(base, counted: list[int]):
    """`base` (Trainer or SFTTrainer) that counts the useful tokens of the inputs it actually trains on."""

    class Counting(base):
        def training_step(self, model, inputs, *rest, **kw):
            if "attention_mask" in inputs:
                counted[-1] += int(inputs["attention_mask"].sum())
            else:  # padding-free: one flattened row, no padding
                counted[-1] += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *rest, **kw)

    return Counting


def _name_collation(trainer) -> None:
    import torch

    collator = trainer.data_collator

    def named(features):
        with torch.profiler.record_function("collation"):
            return collator(features)

    trainer.data_collator = named


def _lora(args):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def _common_args(args) -> dict:
    import torch

    return {"output_dir": str(Path(args.out) / "side"), "per_device_train_batch_size": args.batch,
            "max_steps": StepInstruments.steps_needed(args.steps), "learning_rate": 2e-4, "bf16": False, "fp16": False,
            "use_cpu": not torch.cuda.is_available(), "report_to": [], "save_strategy": "no", "logging_steps": 1,
            "dataloader_num_workers": 0, "seed": 0, "disable_tqdm": True, "max_grad_norm": 1.0}


def child_baseline(args) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    source = _source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in _rows(args, tokenizer)]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = get_peft_model(model, _lora(args))
    counted = [0]
    instruments = StepInstruments(args.steps, on_step_end=lambda: counted.append(0))
    trainer = _trainer_class(Trainer, counted)(
        model=model, args=TrainingArguments(**_common_args(args), remove_unused_columns=False), train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    _name_collation(trainer)
    trainer.train()
    return finish(instruments, counted, model_dims(model.config, args.rank))


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    source = _source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    dataset = Dataset.from_list(_rows(args, tokenizer))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = SFTConfig(**_common_args(args), max_length=args.seq_len, packing=True, packing_strategy="bfd",
                       padding_free=True, dataset_num_proc=None)
    counted = [0]
    instruments = StepInstruments(args.steps, on_step_end=lambda: counted.append(0))
    trainer = _trainer_class(SFTTrainer, counted)(model=model, args=config, train_dataset=dataset,
                                                  processing_class=tokenizer, peft_config=_lora(args))
    _name_collation(trainer)
    trainer.train()
    return finish(instruments, counted, model_dims(model.config, args.rank))


def _source(model: str) -> str:
    from tunesmith.config import ModelConfig
    from tunesmith.models.load import resolve_source

    return str(resolve_source(ModelConfig(name_or_path=model)))


CHILDREN = {"baseline": child_baseline, "trl": child_trl, "tunesmith": child_tunesmith}


def run_child(kind: str, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--data", args.data, "--steps",
               str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--threads", str(args.threads), "--out", out]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- parent
def long_tailed(demo: Path, out: Path, records: int, seed: int = 0) -> Path:
    """A synthetic set with long-tailed lengths (where padding costs most), made from the demo records: record i
    asks for k_i clauses at once, k_i ~ 1 + Poisson-like geometric tail (P(k) ~ 0.55^k: most 1-2, a few 6-10), the
    reply a JSON list of their extractions. Real instruction data (Alpaca-style) has this shape; no public copy
    is on this offline machine, so the bench builds one. Lengths: ~150 to ~1,500 tokens."""
    import random

    rows = [json.loads(line) for line in demo.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    with out.open("w") as f:
        for _ in range(records):
            k = 1
            while k < 10 and rng.random() < 0.55:
                k += 1
            chosen = rng.sample(rows, k)
            system = chosen[0]["messages"][0]["content"] + " Several clauses: answer with a JSON list, one per clause."
            user = "\n\n".join(f"Clause {i + 1}: {c['messages'][1]['content']}" for i, c in enumerate(chosen))
            reply = "[" + ", ".join(c["messages"][2]["content"] for c in chosen) + "]"
            f.write(json.dumps({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    return out


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", "--quick", action="store_true", help="tiny random model (quick)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=None, help="JSONL training data (default: generated demo data)")
    parser.add_argument("--long-tailed", type=int, default=0, metavar="N",
                        help="instead of --data: N synthetic records with long-tailed lengths, built from the demo data")
    parser.add_argument("--steps", type=int, default=None, help="last timed optimizer step N (steps 2..N timed)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="default 256 (1024 with --tiny: byte tokens)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads, every side")
    parser.add_argument("--repeats", type=int, default=1, help="rotations of all sides; ratios are medians over them")
    parser.add_argument("--concurrent", action="store_true",
                        help="run a rotation's sides at the same time (a machine shared with other work: every side "
                             "then sees the same load; on an idle machine leave this off)")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=SIDES)
    parser.add_argument("--out")
    return parser.parse_args(argv)


def child_main(args) -> int:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    result = CHILDREN[args.child](args)
    result["threads"] = torch.get_num_threads()
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))
    return 0


def rotation_ratios(rotations: list[dict[str, dict]]) -> dict[str, dict]:
    """tunesmith / each other side, per rotation (adjacent runs) and their median."""
    out = {}
    for other in (s for s in rotations[0] if s != "tunesmith"):
        per = [r["tunesmith"]["useful_tokens_per_second"] / r[other]["useful_tokens_per_second"] for r in rotations]
        out[other] = {"median": statistics.median(per), "per_rotation": [round(x, 4) for x in per]}
    return out


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        return child_main(args)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if "tunesmith" not in sides or not set(sides) <= set(SIDES) or len(sides) < 2:
        raise SystemExit(f"--sides: tunesmith and at least one of baseline, trl (got {args.sides!r})")
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.tiny:
        from tunesmith.models.tiny import save_tiny_model

        args.model = args.model or str(save_tiny_model(workdir / "tiny"))
        args.steps = args.steps or 4
        args.seq_len = args.seq_len or 1024
    else:
        args.model = args.model or "HuggingFaceTB/SmolLM2-135M-Instruct"
        args.steps = args.steps or 8
    args.seq_len = args.seq_len or 256
    if args.steps < 2:
        raise SystemExit("--steps: at least 2 (step 1 is warm-up and not timed)")
    if args.data is None:
        sys.path.insert(0, str(ROOT / "examples" / "contracts"))
        from generate import generate

        generate(workdir / "data", seed=0)
        args.data = str(workdir / "data" / "train.jsonl")
        if args.long_tailed:
            args.data = str(long_tailed(Path(args.data), workdir / "long_tailed.jsonl", args.long_tailed))
    elif not Path(args.data).is_file():
        raise SystemExit(f"--data: {args.data} is not a file (give a JSONL of conversations or instructions)")
    print(f"model={args.model} data={args.data} steps=1+{args.steps - 1} timed (+{args.steps - 1} FLOP-counted, +1 profiled) "
          f"batch={args.batch} seq_len={args.seq_len} rank={args.rank} threads={args.threads} repeats={args.repeats}"
          f" load={os.getloadavg()[0]:.2f} concurrent={args.concurrent}", flush=True)
    rotations = []
    for r in range(args.repeats):
        order = sides[r % len(sides):] + sides[: r % len(sides)]
        rotation = {}
        if args.concurrent:  # every side at once: the same (shared-machine) load for all, not adjacent runs
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(order)) as pool:
                rotation = dict(zip(order, pool.map(lambda kind: run_child(kind, args), order), strict=True))
        for kind in order:
            if kind not in rotation:
                rotation[kind] = run_child(kind, args)
            x = rotation[kind]
            print(json.dumps({"rotation": r + 1, "side": kind, **x}), flush=True)  # each side's record, as it ends
            print(f"rotation {r + 1} {kind:9s} {x['useful_tokens']:7d} useful tokens in {x['seconds']:7.2f}s = "
                  f"{x['useful_tokens_per_second']:8.1f} tok/s; {x['achieved_flops'] / 1e9:6.1f} GFLOP/s = "
                  f"{100 * x['utilisation']:4.1f}% of the matmul peak {x['matmul_peak_flops'] / 1e9:.1f} (median of "
                  f"{len(x['matmul_peak_probes'])} probes in the window; {100 * x['utilisation_after']:4.1f}% of "
                  f"{x['matmul_peak_after_flops'] / 1e9:.1f} after training); "
                  f"threads {x['threads']}; peak RSS {x['peak_rss_bytes'] / 2**30:.2f} GiB (timed steps "
                  f"{x['peak_rss_timed_steps_bytes'] / 2**30:.2f})", flush=True)
        rotations.append({k: rotation[k] for k in sides})
    ratios = rotation_ratios(rotations)
    last = rotations[-1]["tunesmith"]
    total = last["profile_step_seconds"]
    print(f"tunesmith profile of one step ({total:.2f}s wall): " + ", ".join(
        f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in last["profile_seconds"].items()))
    print("largest ops in 'other': " + ", ".join(f"{k} {v:.2f}s" for k, v in last.get("profile_top_other", {}).items()))
    for other, r in ratios.items():
        print(f"tunesmith / {LABELS[other]}: {r['median']:.2f} (median of {len(r['per_rotation'])}; per rotation "
              + ", ".join(f"{x:.2f}" for x in r["per_rotation"]) + ")")
    headline = ratios.get("baseline") or next(iter(ratios.values()))
    if args.json:
        print(json.dumps({"bench": "train_throughput", "model": args.model, "data": args.data, "steps": args.steps,
                          "batch": args.batch, "seq_len": args.seq_len, "rank": args.rank, "threads": args.threads,
                          "repeats": args.repeats, "concurrent": args.concurrent, "timing_window": "end of step 1 to end of step N",
                          "rotations": rotations, "ratios": ratios, "ratio": headline["median"]}))
    others = ", ".join(f"vs {k} {v['median']:.2f}" for k, v in ratios.items())
    print(f"ratio={headline['median']:.2f} (useful tokens/s, tunesmith / {'Trainer+peft' if 'baseline' in ratios else 'TRL'}; "
          f"{others})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
