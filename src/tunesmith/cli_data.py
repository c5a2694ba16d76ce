"""`tunesmith data`: check, prepare and convert datasets (thin handlers; the work is in tunesmith.data)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunesmith.cli import _quiet_libraries, command


def _prepare_options(args: argparse.Namespace):
    from tunesmith.data.columns import parse_columns
    from tunesmith.data.prepare import PrepareOptions

    return PrepareOptions(
        format=args.format, dedup=tuple(k for k in args.dedup.split(",") if k not in ("", "none")),
        near_threshold=args.near_threshold,
        num_perm=args.num_perm, shingle=args.shingle, pii=args.pii, max_tokens=args.max_tokens,
        trim_percentile=args.trim_percentile, seq_len=args.seq_len, split=args.split, seed=args.seed,
        tokenizer=args.tokenizer, stratify_clusters=args.stratify_clusters, remove_leakage=args.remove_leakage,
        clusters=args.clusters, embedder=args.embedder, diversity=not args.no_diversity,
        columns=parse_columns(args.columns),
    )


def _print_counts(manifest: dict) -> None:
    rows = ("input", "kept", "quarantined", "duplicates_exact", "duplicates_near", "trimmed", "pii_dropped",
            "leakage_removed")
    for row in rows:
        print(f"{row:>17}: {manifest[row]}")
    print(f"{'pii':>17}: {manifest['pii'] or 'none'} (mode {manifest['pii_mode']})")
    for name, split_info in manifest["splits"].items():
        print(f"{name:>17}: {split_info['count']} {split_info['hash']}")
    print(f"identity {'holds' if manifest['identity']['holds'] else 'BROKEN'}: {manifest['identity']['formula']}")
    kept_lengths = manifest["lengths"]["after_trim"]
    if kept_lengths.get("count"):
        print(f"lengths in {manifest['lengths']['unit']}: p50 {kept_lengths['p50']}, p99 {kept_lengths['p99']}, "
              f"max {kept_lengths['max']}; over seq_len {kept_lengths.get('seq_len')}: {kept_lengths.get('over_seq_len')}")
    if manifest["diversity"].get("sizes"):
        print(f"diversity: {manifest['diversity']['clusters']} clusters, largest {manifest['diversity']['largest_share']:.0%}, "
              f"near-empty {manifest['diversity']['near_empty'] or 'none'} ({manifest['diversity']['embedder']})")
    if manifest["leakage"]["pairs"]:
        print(f"leakage: {len(manifest['leakage']['pairs'])} validation/test records near-duplicate train records")


def cmd_data_check(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.data.prepare import check

    manifest = check(args.files, _prepare_options(args)).to_dict()
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
    else:
        _print_counts(manifest)
        for reason, count in manifest["quarantine_reasons"].items():
            print(f"  quarantined x{count}: {reason}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.data.prepare import prepare

    manifest = prepare(args.files, args.out, _prepare_options(args)).to_dict()
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
    else:
        _print_counts(manifest)
        print(f"wrote {Path(args.out) / 'manifest.json'} and {manifest['report']['markdown']}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from tunesmith.atomic import write_text as atomic_write_text
    from tunesmith.data.columns import parse_columns
    from tunesmith.data.convert import convert_file, to_jsonl

    records, problems = convert_file(args.file, args.to, args.format, parse_columns(args.columns))
    for problem in problems:
        where = f"{problem['file']}:{problem['line']}"
        field = f" field '{problem['field']}'" if problem["field"] else ""
        print(f"skipped {where}{field}: {problem['reason']}", file=sys.stderr)
    if args.out:
        atomic_write_text(Path(args.out), to_jsonl(records))
        print(f"wrote {len(records)} records to {args.out} ({len(problems)} skipped)", file=sys.stderr)
    else:
        sys.stdout.write(to_jsonl(records))
    return 1 if problems else 0


def _add_data_common(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="JSONL, JSON, CSV, Parquet files, saved datasets folders "
                   "(FOLDER[:SPLIT]) or hub datasets (hf:ORG/NAME[:SPLIT][@REVISION])")
    p.add_argument("--columns", default=None, metavar="NAME=COLUMN,...",
                   help="map non-standard fields, e.g. prompt=question,response=answer (names: prompt/instruction, "
                   "query/input, response/output, system, tools, messages, conversations, text, role, content)")
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages", "chatml"],
                   help="record format for every file (default: detected per file)")
    p.add_argument("--dedup", default="exact,near", help="dedup kinds: exact,near | exact | near | none")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard of word shingles for near duplicates")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--shingle", type=int, default=5, help="words per shingle")
    p.add_argument("--pii", default="redact", choices=["report", "redact", "drop"], help="what to do with PII")
    p.add_argument("--max-tokens", type=int, default=None, help="trim records longer than this")
    p.add_argument("--trim-percentile", type=float, default=None, help="trim records above this length percentile")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length (count would-be-truncated)")
    p.add_argument("--split", default="0.9,0.05,0.05", help="train,validation,test fractions")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="measure lengths with this model's tokenizer (default: a labelled word-count estimate)")
    p.add_argument("--stratify-clusters", action="store_true", help="split each diversity cluster proportionally")
    p.add_argument("--remove-leakage", action="store_true",
                   help="remove validation/test records that near-duplicate a train record")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (default sqrt(n/2) in [2, 20])")
    p.add_argument("--embedder", default="auto", choices=["auto", "minilm", "tfidf"], help="diversity embeddings")
    p.add_argument("--no-diversity", action="store_true", help="skip embedding and clustering")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def add_data(sub) -> None:
    p = command(sub, "data", "validate, convert, deduplicate, screen, split and report a dataset",
                "tunesmith data prepare raw.jsonl --out data/")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = command(dsub, "check", "validate and report; writes nothing", "tunesmith data check raw.jsonl --pii report")
    _add_data_common(c)
    c.set_defaults(func=cmd_data_check)
    r = command(dsub, "prepare", "write cleaned splits, quarantine, manifest and report",
                "tunesmith data prepare raw.jsonl --out data/ --split 0.9,0.05,0.05")
    _add_data_common(r)
    r.add_argument("--out", required=True, metavar="DIR", help="output folder")
    r.set_defaults(func=cmd_data_prepare)
    v = command(dsub, "convert", "rewrite a file in another format (JSONL)",
                "tunesmith data convert chats.json --to messages --out chats.jsonl")
    v.add_argument("file", metavar="FILE")
    v.add_argument("--to", required=True, choices=["alpaca", "sharegpt", "messages", "chatml"])
    v.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages", "chatml"])
    v.add_argument("--out", default=None, metavar="FILE", help="output JSONL (default: stdout)")
    v.add_argument("--columns", default=None, metavar="NAME=COLUMN,...", help="map non-standard fields (as in data check)")
    v.set_defaults(func=cmd_data_convert)
