"""Near-duplicate detection: tunesmith (rensa MinHash + numpy banding + exact verification) vs a straightforward
datasketch MinHashLSH loop, on synthetic records with planted near-duplicate pairs, in one process.

Records: random word sequences (60–120 words from a 20,000-word vocabulary); a share of them (`--dup-share`) gets a
copy with one word replaced, which has word-5-shingle Jaccard between 0.83 and 0.92 with its original (all planted
pairs are checked to be >= the threshold). Both methods get the same texts and the same shingles definition and
are timed end to end (shingling included). A detected pair is (kept record, removed record) for tunesmith and
(candidate, query) for the baseline; recall = planted pairs found / planted pairs, precision = planted pairs
found / pairs reported.

    nice python bench/dedup_bench.py            # 100,000 records
    python bench/dedup_bench.py --n 5000 --json  # quick run
Ends with one line: `ratio=<tunesmith records/s ÷ baseline records/s> ...`.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tunesmith.data import dedup


def make_records(n: int, dup_share: float, seed: int, shingle: int) -> tuple[list[str], set[tuple[int, int]]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20000)]
    n_pairs = int(n * dup_share / 2)
    texts: list[str] = []
    planted: list[tuple[int, int]] = []
    for _ in range(n - 2 * n_pairs):
        texts.append(" ".join(rng.choices(vocab, k=rng.randint(60, 120))))
    for _ in range(n_pairs):
        words = rng.choices(vocab, k=rng.randint(60, 120))
        copy = list(words)
        copy[rng.randrange(len(copy))] = f"edited{rng.randrange(10**6)}"
        texts += [" ".join(words), " ".join(copy)]
        planted.append((len(texts) - 2, len(texts) - 1))
    # shuffle positions so planted pairs are not adjacent
    order = list(range(len(texts)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    shuffled = [texts[old] for old in order]
    pairs = {tuple(sorted((position[a], position[b]))) for a, b in planted}
    return shuffled, pairs


def run_tunesmith(texts: list[str], threshold: float, num_perm: int, shingle: int) -> set[tuple[int, int]]:
    found = dedup.near_duplicates(texts, threshold, num_perm, shingle)
    return {tuple(sorted((d.kept, d.index))) for d in found}


def run_baseline(texts: list[str], threshold: float, num_perm: int, shingle: int) -> set[tuple[int, int]]:
    """The textbook loop: one datasketch MinHash per record, query the index, then insert."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    pairs = set()
    for index, text in enumerate(texts):
        minhash = MinHash(num_perm=num_perm)
        minhash.update_batch([s.encode("utf-8") for s in dedup.shingles(text, shingle)])
        for candidate in lsh.query(minhash):
            pairs.add((min(candidate, index), max(candidate, index)))
        lsh.insert(index, minhash)
    return pairs


def score(found: set[tuple[int, int]], planted: set[tuple[int, int]]) -> tuple[float, float]:
    hits = len(found & planted)
    return hits / len(planted) if planted else 1.0, hits / len(found) if found else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="records")
    parser.add_argument("--dup-share", type=float, default=0.1, help="share of records in planted pairs")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--shingle", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print a JSON record")
    args = parser.parse_args()

    texts, planted = make_records(args.n, args.dup_share, args.seed, args.shingle)
    low = min(dedup.jaccard(dedup.shingles(texts[a], args.shingle), dedup.shingles(texts[b], args.shingle))
              for a, b in list(planted)[:500])
    assert low >= args.threshold, f"a planted pair has Jaccard {low:.3f} < threshold"
    results = {}
    for name, runner in (("tunesmith", run_tunesmith), ("baseline", run_baseline)):
        start, cpu_start = time.perf_counter(), time.process_time()
        found = runner(texts, args.threshold, args.num_perm, args.shingle)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        recall, precision = score(found, planted)
        results[name] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
                         "records_per_s": round(len(texts) / seconds, 1),
                         "recall": round(recall, 4), "precision": round(precision, 4), "pairs": len(found)}
        # CPU seconds are printed too: on a shared machine wall time also measures the neighbours' load.
        print(f"{name:>9}: {results[name]['records_per_s']:>10.1f} records/s  ({seconds:.2f} s wall, "
              f"{cpu_seconds:.2f} s CPU)  recall {recall:.4f}  precision {precision:.4f}  pairs {len(found)}", flush=True)
    ratio = results["tunesmith"]["records_per_s"] / results["baseline"]["records_per_s"]
    cpu_ratio = results["baseline"]["cpu_seconds"] / max(results["tunesmith"]["cpu_seconds"], 1e-9)
    record = {"bench": "dedup", "n": len(texts), "planted_pairs": len(planted), "backend": dedup.backend(),
              "bands_rows": dedup.lsh_params(args.threshold, args.num_perm), **results, "ratio": round(ratio, 2),
              "cpu_ratio": round(cpu_ratio, 2)}
    if args.json:
        print(json.dumps(record))
    print(f"ratio={ratio:.2f} speed tunesmith/baseline n={len(texts)} recall {results['tunesmith']['recall']:.4f} vs "
          f"{results['baseline']['recall']:.4f} precision {results['tunesmith']['precision']:.4f} vs "
          f"{results['baseline']['precision']:.4f} cpu_ratio={cpu_ratio:.2f} (backend {dedup.backend()})")


if __name__ == "__main__":
    main()
