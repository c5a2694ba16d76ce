"""Multi-task data: task formatting, weighted mixtures, and the replay buffer of a continual sequence.

Task format. A task may carry a prefix (`[Classify risk]`) and/or a system prompt. `apply_task_format` puts the
prefix at the start of the *first user turn* (and nowhere else: never in system or assistant turns) and inserts
the system prompt into records that have none. The same function formats training, validation and test records,
so a test prompt looks exactly like the training prompts of its task.

Mixture (`mix`). Given sources with weights w_s (normalised to sum 1) and a total size N:
    n_s = largest-remainder apportionment of N * w_s      (so |n_s - N w_s| < 1 and sum_s n_s = N)
Inside a source the n_s records are drawn WITHOUT replacement in a seeded random order; only when n_s exceeds the
source's size is the source cycled again in a fresh random order (those draws are counted as `repeats`). The
mixed list is then shuffled, so any window of it is a hypergeometric sample of the mixture. Unused records are
counted (`unused`), never dropped silently. The default N is the largest size that needs no repeats:
N = min_s |source_s| / w_s. A general-purpose dataset joins as one more source whose weight is the configured
share of the mixture (the forgetting guard).

Replay (`ReservoirBuffer`). A uniform sample of everything the earlier runs trained on, kept across runs as a
stream: Vitter's Algorithm R (1985) keeps `capacity` records such that after seeing n records each one is in the
buffer with probability capacity / n, without keeping the n records. It is written by hand because it is eight
lines and the stream spans several processes (the count seen and the RNG state are stored with the buffer);
`random.sample` needs the whole population at once. `stratified_sample` draws per diversity cluster
(data/diversity.py's k-means labels) in proportion to cluster size, for a buffer that covers every topic.
Every replayed record carries `meta["replay"] = {"run", "task", "source", "line"}` so it traces to its run.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.formats import Conversation, parse_record, to_format
from tunesmith.errors import UsageError


class MixingError(UsageError):
    """A mixture or replay request that cannot be met (bad weight, empty source, ...); says what to change."""


@dataclass
class TaskSource:
    """One component of a mixture: a task's training records, its weight and its format."""

    name: str
    conversations: list[Conversation]
    weight: float = 1.0
    prefix: str | None = None
    system_prompt: str | None = None
    origin: str = "dataset"  # dataset | replay | general


# ------------------------------------------------------------------------------------------ task format
def format_conversation(conversation: Conversation, prefix: str | None = None, system_prompt: str | None = None,
                        task: str | None = None) -> Conversation:
    """A copy with `prefix + " "` before the first user turn's content and `system_prompt` inserted if none."""
    messages = [dict(m) for m in conversation.messages]
    if prefix:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            where = f"{conversation.source}:{conversation.line}" if conversation.source else "a record"
            raise MixingError(f"{where}: task prefix {prefix!r} needs a user turn, and this record has none")
        messages[first_user]["content"] = f"{prefix} {messages[first_user]['content']}"
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    meta = copy.deepcopy(conversation.meta)
    if task is not None:
        meta["task"] = task
    return Conversation(messages, conversation.source, conversation.line, meta)


def apply_task_format(conversations: Iterable[Conversation], prefix: str | None = None,
                      system_prompt: str | None = None, task: str | None = None) -> list[Conversation]:
    return [format_conversation(c, prefix, system_prompt, task) for c in conversations]


# -------------------------------------------------------------------------------------------- mixture
def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder (Hamilton) apportionment: integers n_i with sum n_i = total and |n_i - total*w_i| < 1."""
    if total < 0:
        raise MixingError(f"mixture size must be >= 0, got {total}")
    if not weights or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise MixingError(f"weights must be finite, >= 0 and not all zero, got {list(weights)}")
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def default_mixture_size(sources: Sequence[TaskSource]) -> int:
    """The largest N at which no source needs repeats: min over sources of size / normalised weight."""
    norm = sum(s.weight for s in sources)
    sizes = [len(s.conversations) / (s.weight / norm) for s in sources if s.weight > 0]
    return int(math.floor(min(sizes) + 1e-9)) if sizes else 0


def _draw(items: list[Any], n: int, rng: random.Random) -> tuple[list[Any], int]:
    """n items without replacement; past len(items), cycle in a new random order. Returns (items, repeats)."""
    out: list[Any] = []
    while len(out) < n:
        order = list(range(len(items)))
        rng.shuffle(order)
        out.extend(items[i] for i in order[: n - len(out)])
    return out, max(0, n - len(items))


def mix(sources: Sequence[TaskSource], total: int | None = None, seed: int = 0) -> tuple[list[Conversation], dict]:
    """Mixed, task-formatted, shuffled training records and the per-task counts for data_manifest.json.

    Counts per task: available, weight (normalised), target share, drawn, repeats, unused, realised share.
    """
    if not sources:
        raise MixingError("no datasets to mix")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise MixingError(f"task names must be unique, got {names}")
    for source in sources:
        if source.weight > 0 and not source.conversations:
            raise MixingError(f"task {source.name!r}: weight {source.weight} but no records")
    total = default_mixture_size(sources) if total is None else total
    counts = apportion(total, [s.weight for s in sources])
    rng = random.Random(f"mix:{seed}")
    mixed: list[Conversation] = []
    norm = sum(s.weight for s in sources)
    report: dict[str, Any] = {"total": total, "seed": seed, "sampling": "without replacement within a source; "
                              "cycled in a new order only past its size (counted as repeats)", "tasks": {}}
    for source, n in zip(sources, counts, strict=True):
        drawn, repeats = _draw(source.conversations, n, rng)
        mixed.extend(format_conversation(c, source.prefix, source.system_prompt, source.name) for c in drawn)
        report["tasks"][source.name] = {
            "origin": source.origin, "available": len(source.conversations), "weight": source.weight / norm,
            "drawn": n, "repeats": repeats, "unused": max(0, len(source.conversations) - n),
            "prefix": source.prefix, "system_prompt": source.system_prompt,
        }
    rng.shuffle(mixed)
    realised = Counter(c.meta["task"] for c in mixed)
    for name, row in report["tasks"].items():
        row["realised_share"] = realised[name] / len(mixed) if mixed else 0.0
    assert sum(r["drawn"] for r in report["tasks"].values()) == len(mixed) == total
    return mixed, report


def with_general(sources: list[TaskSource], general: list[Conversation], share: float) -> list[TaskSource]:
    """Add a general-purpose source that makes up `share` of the mixture (the task weights keep their ratios)."""
    if not 0 <= share < 1:
        raise MixingError(f"general-data share must be in [0, 1), got {share}")
    if share == 0:
        return list(sources)
    if not general:
        raise MixingError(f"general-data share {share} but no general records were given")
    norm = sum(s.weight for s in sources)
    scaled = [TaskSource(s.name, s.conversations, s.weight / norm * (1 - share), s.prefix, s.system_prompt, s.origin)
              for s in sources]
    return [*scaled, TaskSource("general", general, share, origin="general")]


# --------------------------------------------------------------------------------------------- replay
@dataclass
class ReservoirBuffer:
    """A uniform sample of at most `capacity` records from a stream spanning several runs (Algorithm R)."""

    capacity: int
    seen: int = 0
    items: list[Conversation] = field(default_factory=list)
    seed: int = 0

    def _rng(self) -> random.Random:
        # One RNG per (seed, position in the stream): deterministic, and resumable across runs without pickling.
        return random.Random(f"reservoir:{self.seed}:{self.seen}")

    def add(self, records: Iterable[Conversation]) -> None:
        """Algorithm R: record number i (1-based) replaces a uniform slot with probability capacity / i."""
        if self.capacity < 0:
            raise MixingError(f"replay capacity must be >= 0, got {self.capacity}")
        rng = self._rng()
        for record in records:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(record)
            else:
                slot = rng.randrange(self.seen)
                if slot < self.capacity:
                    self.items[slot] = record

    def save(self, path: str | Path) -> None:
        """JSONL of the records (messages + meta) with a header line {capacity, seen, seed}; written atomically."""
        from tunesmith.atomic import write_text

        lines = [json.dumps({"replay_buffer": {"capacity": self.capacity, "seen": self.seen, "seed": self.seed}})]
        for item in self.items:
            lines.append(json.dumps({**to_format(item, "messages"), "meta": item.meta}, ensure_ascii=False))
        write_text(Path(path), "\n".join(lines) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ReservoirBuffer:
        path = Path(path)
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows or "replay_buffer" not in rows[0]:
            raise MixingError(f"{path}:1: not a replay buffer (missing the replay_buffer header line)")
        head = rows[0]["replay_buffer"]
        items = []
        for number, row in enumerate(rows[1:], start=2):
            conversation = parse_record({"messages": row["messages"]}, "messages", str(path), number)
            conversation.meta = row.get("meta", {})
            items.append(conversation)
        return cls(capacity=head["capacity"], seen=head["seen"], items=items, seed=head.get("seed", 0))


def tag_replay(conversations: Iterable[Conversation], run: str, task: str) -> list[Conversation]:
    """Copies whose meta traces each record to its run, task, file and line (what the manifest counts)."""
    out = []
    for c in conversations:
        meta = {**copy.deepcopy(c.meta), "replay": {"run": run, "task": task, "source": c.source, "line": c.line}}
        out.append(Conversation([dict(m) for m in c.messages], c.source, c.line, meta))
    return out


def stratified_sample(conversations: Sequence[Conversation], labels: Sequence[int], size: int,
                      seed: int = 0) -> list[Conversation]:
    """`size` records, per cluster label in proportion to the cluster's size (largest remainder), uniform within."""
    if len(labels) != len(conversations):
        raise MixingError(f"{len(labels)} cluster labels for {len(conversations)} records")
    size = min(size, len(conversations))
    clusters: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        clusters.setdefault(int(label), []).append(index)
    keys = sorted(clusters)
    quotas = apportion(size, [len(clusters[k]) for k in keys])
    rng = random.Random(f"stratified:{seed}")
    chosen: list[int] = []
    for key, quota in zip(keys, quotas, strict=True):
        chosen.extend(rng.sample(clusters[key], quota))
    return [conversations[i] for i in sorted(chosen)]


def replay_counts(conversations: Iterable[Conversation]) -> dict[str, int]:
    """How many replayed records come from each earlier run (for data_manifest.json)."""
    counts: Counter[str] = Counter()
    for c in conversations:
        origin = c.meta.get("replay")
        if origin:
            counts[f"{origin['run']}:{origin['task']}"] += 1
    return dict(counts)


def write_conversations(path: str | Path, conversations: Iterable[Conversation]) -> int:
    """Write records as OpenAI-messages JSONL (atomically); returns the count. Meta is not written (the training
    reader ignores it); the manifest holds the counts."""
    from tunesmith.atomic import write_text

    lines = [json.dumps(to_format(c, "messages"), ensure_ascii=False) for c in conversations]
    write_text(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)
