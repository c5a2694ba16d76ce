"""Heap kept after one training forward pass on the CPU (fp32), by method: the evidence for the planner's per-method
heap shares (methods/base.py `cpu_fp32_heap_share`, plan/memory.py retention_share).

What `tunesmith train` runs on a CPU without native bf16: fp32 weights, packed rows of four examples through
per-example attention (models/attention.py), the fused norm and rotary (models/fused_ops.py), selective logits with
the chunked head loss (train/loop.py forward_loss). Per method and shape, each in a fresh process (glibc's heap
starts empty): the model is loaded and the method applied, then one forward pass runs under
`torch.autograd.graph.saved_tensors_hooks`, counting the unique storages autograd keeps (parameters excluded), and
the process's RSS (/proc/self/status VmRSS) is read before and after it.

    heap = RSS growth over the forward pass - saved bytes     (freed tensors glibc keeps resident, + a constant part)

Per method the slope of heap per token between the smallest and the largest shape, and the same slope of the saved
bytes; the planner's share multiplies the saved layer bytes, so heap slope / saved slope is what differs by method.
Summary line: `ratio=` the adapters' heap slope over LoRA's (both measured in this invocation).

    python bench/forward_heap.py [--methods full,lora,adapters] [--shapes 1x256,2x1024] [--threads 2] [--json]
    python bench/forward_heap.py --quick --json          # the tiny random model (tests/test_benches.py)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
MiB = 2**20


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))


def measure_one(model_path: str, method_name: str, batch: int, seq: int, threads: int) -> dict:
    """One forward pass in this process (run it in a fresh one): saved bytes and RSS growth."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.config import MethodConfig
    from tunesmith.data.pack import Pack, collate
    from tunesmith.data.render import Example
    from tunesmith.methods.registry import get_method
    from tunesmith.models.attention import segment_attention
    from tunesmith.models.fused_ops import fused_norm_and_rotary
    from tunesmith.train.loop import forward_loss

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    owner = get_method(method_name)
    if not owner.supports_packing:
        raise SystemExit(f"{method_name}: the trainer does not pack its rows; this bench measures packed rows")
    model = owner.apply(model, MethodConfig.model_validate({"name": method_name}))
    model.train()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    part = seq // 4
    packs = []
    for _ in range(batch):  # four examples per row, each labelled on its second half
        ids = torch.randint(0, vocab, (seq,), generator=generator).tolist()
        packs.append(Pack([Example(ids[i * part:(i + 1) * part],
                                   [-100] * (part // 2) + ids[i * part + part // 2:(i + 1) * part]) for i in range(4)]))
    inputs = collate(packs, 0, block_mask=False, segments=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    before = _status_kib("VmRSS")
    with segment_attention(model), fused_norm_and_rotary(model), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_loss(model, owner, inputs, "fp32", torch.device("cpu"))
    growth = (_status_kib("VmRSS") - before) * 1024
    kept = sum(saved.values())
    return {"method": method_name, "batch": batch, "seq": seq, "tokens": batch * seq, "saved_bytes": kept,
            "rss_growth_bytes": growth, "heap_bytes": growth - kept}


def slopes(rows: list[dict]) -> dict[str, dict]:
    """Per method: heap and saved bytes per token between its smallest and largest shape, and their ratio."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])
        low, high = mine[0], mine[-1]
        tokens = high["tokens"] - low["tokens"]
        if tokens <= 0:
            continue
        heap = (high["heap_bytes"] - low["heap_bytes"]) / tokens
        kept = (high["saved_bytes"] - low["saved_bytes"]) / tokens
        out[method] = {"heap_per_token": heap, "saved_per_token": kept, "heap_over_saved": heap / kept}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local model folder (default: the reference model's cache)")
    parser.add_argument("--methods", default="full,lora,adapters")
    parser.add_argument("--shapes", default="1x256,2x1024", help="micro-batch x tokens, comma separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the tiny random model, lora and adapters, 1x64 and 2x128")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # method:batch:seq, in the child process
    args = parser.parse_args()
    if args.one:
        method, batch, seq = args.one.split(":")
        print(json.dumps(measure_one(args.model, method, int(batch), int(seq), args.threads)))
        return
    import tempfile

    methods, shapes = args.methods.split(","), args.shapes
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from tunesmith.models.tiny import save_tiny_model

            model, methods, shapes = str(save_tiny_model(Path(tmp) / "tiny")), ["lora", "adapters"], "1x64,2x128"
        else:
            from tunesmith.models.reference import REFERENCE_ID, cached_path, is_available

            if args.model is None and not is_available():
                raise SystemExit("the reference model is not converted: run `tunesmith models fetch-reference`, "
                                 "or pass --model")
            model = args.model or str(cached_path(REFERENCE_ID))
        rows = []
        for method in methods:
            for shape in shapes.split(","):
                batch, seq = shape.split("x")
                out = subprocess.run([sys.executable, __file__, "--model", model, "--threads", str(args.threads),
                                      "--one", f"{method}:{batch}:{seq}"], capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{method} {shape}: {out.stderr[-2000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{method} {shape}: saved {row['saved_bytes'] / MiB:,.0f} MiB, RSS growth "
                      f"{row['rss_growth_bytes'] / MiB:,.0f} MiB, heap {row['heap_bytes'] / MiB:,.0f} MiB")
    per_method = slopes(rows)
    for method, s in per_method.items():
        print(f"{method}: heap {s['heap_per_token'] / MiB:.3f} MiB per token, saved {s['saved_per_token'] / MiB:.3f}, "
              f"heap / saved {s['heap_over_saved']:.2f}")
    ratio = (per_method["adapters"]["heap_per_token"] / per_method["lora"]["heap_per_token"]
             if {"adapters", "lora"} <= per_method.keys() and per_method["lora"]["heap_per_token"] > 0 else None)
    if args.json:
        print(json.dumps({"model": model, "threads": args.threads, "rows": rows, "slopes": per_method, "ratio": ratio}))
    print(f"ratio={ratio:.2f} (adapters' heap per token / LoRA's)" if ratio is not None else "ratio=n/a")


if __name__ == "__main__":
    main()
