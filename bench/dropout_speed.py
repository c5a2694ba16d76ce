"""LoRA input dropout on the CPU: torch's dropout (what peft runs) vs tunesmith's BulkDropout (methods/dropout.py).

One training step of LoRA on all linear layers draws a dropout mask over the input of every adapted projection. This
times what one decoder layer of the chosen model draws per micro-batch: for each of its adapted projections, the
dropout of a (tokens, in_features) fp32 input, forward and backward (the product with the upstream gradient), for
    torch      nn.Dropout(p), i.e. F.dropout: bernoulli_ on a float tensor, div_, product
    tunesmith  BulkDropout(p): only the dropped positions drawn (geometric gaps), the same fp32 scaled mask saved
Same process, same threads (set and printed), same inputs, both warmed up; `--repeats` rotations alternate the
order; the ratio is the median over rotations of torch time / tunesmith time.

    python bench/dropout_speed.py                       # reference model's shapes (576 x 6, 1,536 x 1), 4,096 tokens
    python bench/dropout_speed.py --tokens 256 --iterations 2 --repeats 3 --json   # quick (tests/test_benches.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.methods.dropout import BulkDropout  # noqa: E402

REFERENCE_INPUTS = [576] * 6 + [1536]  # q, k, v, o, gate, up read 576 features; down reads 1,536


def time_side(kind: str, inputs: list[torch.Tensor], p: float, iterations: int) -> float:
    bulk = BulkDropout(p).train()

    def once():
        for x in inputs:
            out = bulk(x) if kind == "tunesmith" else F.dropout(x, p, True)
            out.backward(torch.ones_like(out))

    once()  # warm-up, both sides
    start = time.perf_counter()
    for _ in range(iterations):
        once()
    return (time.perf_counter() - start) / iterations


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch (4 x 1,024 by default)")
    parser.add_argument("--inputs", default=",".join(map(str, REFERENCE_INPUTS)),
                        help="in_features of the adapted projections of one layer")
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    widths = [int(w) for w in args.inputs.split(",")]
    inputs = [torch.randn(args.tokens, w, requires_grad=True) for w in widths]
    print(f"threads={torch.get_num_threads()} tokens={args.tokens} inputs={widths} p={args.p} "
          f"iterations={args.iterations} repeats={args.repeats} (seconds per layer, forward + backward)")
    rotations = []
    for r in range(args.repeats):
        order = ("torch", "tunesmith") if r % 2 == 0 else ("tunesmith", "torch")
        seconds = {kind: time_side(kind, inputs, args.p, args.iterations) for kind in order}
        rotations.append({**seconds, "ratio": seconds["torch"] / seconds["tunesmith"]})
        print(f"rotation {r + 1} ({' then '.join(order)}): torch {seconds['torch'] * 1e3:.2f} ms, "
              f"tunesmith {seconds['tunesmith'] * 1e3:.2f} ms, ratio {rotations[-1]['ratio']:.2f}")
    ratio = statistics.median(r["ratio"] for r in rotations)
    record = {"threads": torch.get_num_threads(), "tokens": args.tokens, "inputs": widths, "p": args.p,
              "rotations": rotations, "ratio": ratio}
    if args.json:
        print(json.dumps(record))
    print(f"ratio={ratio:.2f} (LoRA dropout forward + backward per layer, torch / tunesmith; median of "
          f"{args.repeats} rotations)")
    return record


if __name__ == "__main__":
    main()
