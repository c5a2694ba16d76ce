"""Training throughput: `tunesmith train` vs a plain transformers.Trainer + peft baseline, in one run.

Both train LoRA (same rank, targets, learning rate) on the same model and data for the same number of optimizer
steps with the same micro-batch size, each in a fresh subprocess (so peak RSS is its own). Measured: useful
(non-padding) tokens per second and peak memory. tunesmith packs several examples per sequence; the baseline
pads each batch to its longest example, as a plain Trainer + DataCollatorForSeq2Seq script does.

    python bench/train_throughput.py            # reference model (SmolLM2-135M-Instruct), demo data
    python bench/train_throughput.py --tiny     # tiny random model, seconds
Last line: ratio=<useful tokens/s of tunesmith / baseline>; --json prints a JSON record before it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_tunesmith(args) -> dict:
    from tunesmith.config import load_config
    from tunesmith.recipes.finetune import run_finetune

    config = load_config(None, [
        f"model.name_or_path={args.model}", f"data.train=[{args.data}]", "data.validation_fraction=0",
        f"data.max_seq_len={args.seq_len}", "data.packing=true", f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}", "train.learning_rate=2e-4", "train.show_progress=false",
        f"method.lora.r={args.rank}", f"output.dir={args.out}", "output.name=tunesmith", "output.register_run=false",
        "train.save_steps=100000",
    ])
    summary = run_finetune(config, log=lambda *a, **k: None).to_dict()
    records = [json.loads(x) for x in (Path(args.out) / "tunesmith/metrics.jsonl").read_text().splitlines()]
    # Time of the optimizer steps alone (as the baseline's trainer.train(): no model loading, data rendering,
    # checkpoint or report time): each record logs the tokens so far and that step's tokens per second.
    seconds, previous = 0.0, 0
    for record in records:
        seconds += (record["tokens"] - previous) / record["tokens_per_second"]
        previous = record["tokens"]
    return {"useful_tokens": summary["tokens_seen"], "steps": summary["steps"], "seconds": seconds}


def child_baseline(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunesmith.config import ModelConfig
    from tunesmith.data.formats import read_conversations
    from tunesmith.data.render import render_dataset
    from tunesmith.models.load import resolve_source

    source = resolve_source(ModelConfig(name_or_path=args.model))
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    examples, _ = render_dataset(tokenizer, read_conversations(args.data), args.seq_len)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    useful = {"tokens": 0}

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def counting_collator(features):
        batch = collator(features)
        useful["tokens"] += int(batch["attention_mask"].sum())
        return batch

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    training_args = TrainingArguments(
        output_dir=str(Path(args.out) / "baseline"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=2e-4, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), report_to=[],
        save_strategy="no", logging_steps=1, dataloader_num_workers=0, remove_unused_columns=False, seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=Rows(), data_collator=counting_collator)
    t0 = time.perf_counter()
    trainer.train()
    return {"useful_tokens": useful["tokens"], "steps": args.steps, "seconds": time.perf_counter() - t0}


def run_child(kind: str, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--data", args.data, "--steps",
               str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--out", out]
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if result.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (quick)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=None, help="JSONL training data (default: generated demo data)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=["tunesmith", "baseline"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        result = (child_tunesmith if args.child == "tunesmith" else child_baseline)(args)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.tiny:
        from tunesmith.models.tiny import save_tiny_model

        args.model = args.model or str(save_tiny_model(workdir / "tiny"))
        args.steps = args.steps or 8
    else:
        args.model = args.model or "HuggingFaceTB/SmolLM2-135M-Instruct"
        args.steps = args.steps or 8
    if args.data is None:
        sys.path.insert(0, str(ROOT / "examples" / "contracts"))
        from generate import generate

        generate(workdir / "data", seed=0)
        args.data = str(workdir / "data" / "train.jsonl")
    results = {kind: run_child(kind, args) for kind in ("baseline", "tunesmith")}
    for r in results.values():
        r["useful_tokens_per_second"] = r["useful_tokens"] / r["seconds"]
    ratio = results["tunesmith"]["useful_tokens_per_second"] / results["baseline"]["useful_tokens_per_second"]
    memory_ratio = results["tunesmith"]["peak_rss_bytes"] / results["baseline"]["peak_rss_bytes"]
    print(f"model={args.model} steps={args.steps} batch={args.batch} seq_len={args.seq_len} rank={args.rank}")
    for kind, r in results.items():
        print(f"{kind:10s} useful tokens {r['useful_tokens']:7d} in {r['seconds']:7.1f}s = "
              f"{r['useful_tokens_per_second']:8.1f} tok/s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    record = {"results": results, "ratio": ratio, "memory_ratio": memory_ratio, "model": args.model,
              "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len}
    if args.json:
        print(json.dumps(record))
    print(f"ratio={ratio:.2f} (useful tokens/s, tunesmith / Trainer+peft); memory_ratio={memory_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
