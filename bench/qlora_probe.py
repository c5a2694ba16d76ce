"""Why does QLoRA trail LoRA on the method table? A focused probe of the candidate causes, on the reference model.

1. Quantization error of the base, alone: the base model's token-weighted validation loss (assistant tokens of the
   demo task) in fp32, NF4 with fp32 compute, NF4 with bf16 compute, and the fp32 base under bf16 autocast (what the
   trainer runs where bf16 is native). If the NF4 base starts far above the fp32 base, QLoRA has more to learn.
2. Which modules bitsandbytes quantized (is the tied embedding / output head 4-bit?).
3. Dequantization on this CPU: every quantized weight dequantized (bitsandbytes' own dequantize_4bit) against
   the fp32 original (relative Frobenius error; NF4 is expected near 0.1), and one layer's forward against
   F.linear with that dequantized weight (is the CPU 4-bit matmul what it claims to be?).
4. `--train-steps N`: LoRA and QLoRA trained side by side at the same rate and seed for N steps (the trainer's own
   runs, no packing, as the method table), their training and validation losses printed per step: a constant
   offset means the starting point (1.) explains the gap; a slower fall means the optimisation differs.

    python bench/qlora_probe.py --examples 32                       # part 1 and 2 (~2 min)
    python bench/qlora_probe.py --examples 32 --train-steps 12 --lr 2e-4
Last line: ratio=<NF4 (fp32 compute) base loss / fp32 base loss>.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def validation_loss(model, examples, autocast_bf16: bool = False) -> float:
    """Token-weighted cross-entropy over the labelled (assistant) tokens, one example at a time (no padding)."""
    total, count = 0.0, 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
        for example in examples:
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            logits = model(input_ids=ids).logits.float()
            shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
            mask = shift_labels != -100
            loss = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
            total += float(loss)
            count += int(mask.sum())
    return total / count


def load(compute: str | None):
    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.methods.qlora import METHOD
    from tunesmith.models.load import load_model

    config = ModelConfig(name_or_path=REFERENCE, dtype="float32")
    if compute is None:
        return load_model(config, log=lambda *a, **k: None)
    method = MethodConfig(name="qlora", quant={"compute_dtype": compute})
    return load_model(config, log=lambda *a, **k: None, **METHOD.base_load_kwargs(method))


def quantized_modules(model) -> dict:
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    head = model.get_output_embeddings()
    return {"quantized_linear": len(names), "head_quantized": isinstance(head, bnb.nn.Linear4bit),
            "head_dtype": str(head.weight.dtype), "embedding_dtype": str(model.get_input_embeddings().weight.dtype),
            "tied": bool(getattr(model.config, "tie_word_embeddings", False)), "example": names[:2]}


def dequantization_check(fp32_model, nf4_model) -> dict:
    """Relative error of NF4 weights vs the fp32 originals, and the CPU 4-bit forward vs F.linear(dequantized)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    originals = dict(fp32_model.named_modules())
    errors, forward_error = [], None
    for name, module in nf4_model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        original = originals[name].weight.detach().float()
        errors.append(float((weight - original).norm() / original.norm()))
        if forward_error is None:
            x = torch.randn(3, original.shape[1], generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                expected = torch.nn.functional.linear(x, weight, None if module.bias is None else module.bias.float())
                got = module(x.to(module.compute_dtype or torch.float32)).float()
            forward_error = float((got - expected).abs().max() / expected.abs().max())
    return {"weights": len(errors), "relative_error_median": sorted(errors)[len(errors) // 2],
            "relative_error_max": max(errors), "cpu_forward_vs_dequantized_linear": forward_error}


def train_side_by_side(data: Path, steps: int, lr: float, examples: int) -> dict:
    from tunesmith.config import load_config
    from tunesmith.recipes.finetune import run_finetune
    from tunesmith.records.metrics import read_metrics

    curves = {}
    with tempfile.TemporaryDirectory() as out:
        for name in ("lora", "qlora"):
            config = load_config(None, [
                f"model.name_or_path={REFERENCE}", f"data.train=[{data / 'train.jsonl'}]",
                f"data.validation=[{data / 'validation.jsonl'}]", f"data.max_validation_examples={examples}",
                "data.max_seq_len=384", "data.packing=false", f"train.max_steps={steps}", "train.batch_size=4",
                f"train.learning_rate={lr}", "train.warmup_ratio=0.1", f"train.eval_steps={max(1, steps // 3)}",
                "train.show_progress=false", "train.seed=0", f"method.name={name}", "method.lora.r=16",
                "method.lora.alpha=32", "method.lora.target_modules=all-linear", f"output.dir={out}",
                f"output.name={name}", "output.register_run=false",
            ])
            t0 = time.perf_counter()
            summary = run_finetune(config, log=lambda *a, **k: None).to_dict()
            records = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
            curves[name] = {"train_loss": [r["train_loss"] for r in records if "train_loss" in r],
                            "eval_loss": {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r},
                            "precision": summary.get("precision"), "seconds": round(time.perf_counter() - t0, 1)}
            print(name, json.dumps(curves[name]), flush=True)
    return curves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32, help="validation examples for the loss")
    parser.add_argument("--train-steps", type=int, default=0, help="also train LoRA and QLoRA side by side")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dequant-only", action="store_true", help="only part 3 (seconds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from tunesmith.config import ModelConfig
    from tunesmith.data.formats import read_conversations
    from tunesmith.data.render import render_dataset
    from tunesmith.models.load import load_tokenizer

    sys.path.insert(0, str(ROOT / "examples" / "contracts"))
    from generate import generate

    data = Path(tempfile.mkdtemp(prefix="qlora-probe-"))
    generate(data, seed=0)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=REFERENCE), log=lambda *a, **k: None)
    examples, _ = render_dataset(tokenizer, read_conversations(str(data / "validation.jsonl"))[: args.examples], 384)
    if args.dequant_only:
        check = dequantization_check(load(None), load("float32"))
        print(json.dumps({"dequantization": check}))
        print(f"ratio={check['relative_error_median']:.3f} (median relative error of the NF4 weights)")
        return 0
    losses = {}
    for label, compute, autocast in (("fp32 base", None, False), ("fp32 base, bf16 autocast", None, True),
                                     ("NF4 base, fp32 compute", "float32", False),
                                     ("NF4 base, bf16 compute", "bfloat16", False),
                                     ("NF4 base, bf16 compute + bf16 autocast", "bfloat16", True)):
        model = load(compute)
        t0 = time.perf_counter()
        losses[label] = validation_loss(model, examples, autocast)
        print(f"{label:42s} validation loss {losses[label]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if compute == "float32":
            modules = quantized_modules(model)
            print(f"quantized modules: {json.dumps(modules)}", flush=True)
        del model
    curves = train_side_by_side(data, args.train_steps, args.lr, args.examples) if args.train_steps else None
    ratio = losses["NF4 base, fp32 compute"] / losses["fp32 base"]
    print(json.dumps({"losses": losses, "modules": modules, "curves": curves}))
    print(f"ratio={ratio:.3f} (NF4 base loss / fp32 base loss on {len(examples)} validation examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
