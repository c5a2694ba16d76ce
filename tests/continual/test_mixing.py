"""Mixture sampler, task formatting and the replay buffer (data/mixing.py)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from scipy import stats

from tunesmith.data.formats import Conversation
from tunesmith.data.mixing import (
    MixingError,
    ReservoirBuffer,
    TaskSource,
    apply_task_format,
    apportion,
    mix,
    replay_counts,
    stratified_sample,
    tag_replay,
    with_general,
)


def records(task: str, n: int, system: bool = False) -> list[Conversation]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"{task} question {i}"}, {"role": "assistant", "content": f"{task} {i}"}]
        if system:
            messages.insert(0, {"role": "system", "content": "own system"})
        out.append(Conversation(messages, source=f"{task}.jsonl", line=i + 1))
    return out


def test_apportion_sums_and_stays_within_one():
    for total, weights in [(100, [0.5, 0.3, 0.2]), (7, [1, 1, 1]), (1000, [0.01, 0.99]), (0, [1, 2])]:
        counts = apportion(total, weights)
        assert sum(counts) == total
        for n, w in zip(counts, weights, strict=True):
            assert abs(n - total * w / sum(weights)) < 1
    with pytest.raises(MixingError, match="weights"):
        apportion(10, [0, 0])


def test_realised_proportions_match_weights():
    """Whole mixture: |realised share - weight| < 1/N exactly (apportionment). Windows of the shuffled stream:
    the count of task s in the first m records is hypergeometric(N, n_s, m); every window and task must lie within
    4.5 standard deviations (a false alarm has probability < 1e-4 across the 3 tasks x 8 windows checked)."""
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    sources = [TaskSource(name, records(name, 2000), weight) for name, weight in weights.items()]
    total = 3000
    mixed, report = mix(sources, total=total, seed=1)
    assert len(mixed) == total
    realised = Counter(c.meta["task"] for c in mixed)
    for name, weight in weights.items():
        assert abs(realised[name] / total - weight) < 1 / total
        assert report["tasks"][name]["drawn"] == realised[name]
        assert report["tasks"][name]["realised_share"] == pytest.approx(realised[name] / total)
        assert report["tasks"][name]["drawn"] + report["tasks"][name]["unused"] - report["tasks"][name]["repeats"] \
            == report["tasks"][name]["available"]
    for m in (50, 100, 200, 400, 800, 1200, 2000, 2500):
        window = Counter(c.meta["task"] for c in mixed[:m])
        for name in weights:
            k = realised[name]
            mean = m * k / total
            sd = math.sqrt(m * (k / total) * (1 - k / total) * (total - m) / (total - 1))
            assert abs(window[name] - mean) <= 4.5 * sd, (name, m, window[name], mean, sd)


def test_without_replacement_until_exhausted_then_counted_repeats():
    sources = [TaskSource("a", records("a", 10), 0.5), TaskSource("b", records("b", 100), 0.5)]
    mixed, report = mix(sources, total=40, seed=0)
    a_lines = [c.line for c in mixed if c.meta["task"] == "a"]
    assert len(a_lines) == 20 and report["tasks"]["a"]["repeats"] == 10
    assert sorted(Counter(a_lines).values()) == [2] * 10  # every record twice: a full second cycle
    b_lines = [c.line for c in mixed if c.meta["task"] == "b"]
    assert len(set(b_lines)) == 20 and report["tasks"]["b"]["unused"] == 80


def test_default_size_needs_no_repeats():
    sources = [TaskSource("a", records("a", 30), 1), TaskSource("b", records("b", 100), 3)]
    mixed, report = mix(sources, seed=0)
    assert report["total"] == 120  # min(30 / 0.25, 100 / 0.75)
    assert all(row["repeats"] == 0 for row in report["tasks"].values())


def test_task_prefixes_appear_where_configured_and_nowhere_else():
    sources = [TaskSource("extract", records("extract", 50), 1, prefix="[Extract clauses]"),
               TaskSource("risk", records("risk", 50, system=True), 1, prefix="[Classify risk]",
                          system_prompt="Answer low, medium or high."),
               TaskSource("plain", records("plain", 50), 1)]
    mixed, _ = mix(sources, total=150, seed=3)
    prefixes = {"extract": "[Extract clauses]", "risk": "[Classify risk]"}
    for c in mixed:
        task = c.meta["task"]
        text_all = [m["content"] for m in c.messages]
        first_user = next(m for m in c.messages if m["role"] == "user")
        for name, prefix in prefixes.items():
            occurrences = sum(t.count(prefix) for t in text_all)
            if name == task:
                assert first_user["content"].startswith(prefix + " ") and occurrences == 1
            else:
                assert occurrences == 0
        for m in c.messages:
            if m["role"] != "user":
                assert not any(p in m["content"] for p in prefixes.values())
        systems = [m["content"] for m in c.messages if m["role"] == "system"]
        # a record's own system prompt wins; the task's is added only where there is none
        assert systems == (["own system"] if task == "risk" else [])
    # the same function formats test records (eval prompts look like training prompts)
    test = apply_task_format(records("risk", 2), "[Classify risk]", "Answer low, medium or high.", "risk")
    assert test[0].messages[0] == {"role": "system", "content": "Answer low, medium or high."}
    assert test[0].messages[1]["content"] == "[Classify risk] risk question 0"
    # the inputs are not modified in place
    original = records("risk", 1)
    apply_task_format(original, "[X]")
    assert original[0].messages[0]["content"] == "risk question 0"


def test_prefix_without_user_turn_is_an_error():
    bad = Conversation([{"role": "assistant", "content": "x"}], source="f.jsonl", line=7)
    with pytest.raises(MixingError, match="f.jsonl:7"):
        apply_task_format([bad], "[X]")


def test_general_share():
    sources = with_general([TaskSource("a", records("a", 500), 2), TaskSource("b", records("b", 500), 2)],
                           records("general", 500), share=0.2)
    mixed, report = mix(sources, total=1000, seed=0)
    assert report["tasks"]["general"]["drawn"] == 200 and report["tasks"]["general"]["origin"] == "general"
    assert report["tasks"]["a"]["drawn"] == report["tasks"]["b"]["drawn"] == 400
    with pytest.raises(MixingError, match="share"):
        with_general(sources, records("g", 3), share=1.0)


def test_reservoir_is_uniform_over_subsets():
    """Every 3-subset of 6 items is equally likely (20 subsets, chi-square goodness of fit, alpha = 1e-4), and each
    item's inclusion rate is k/n = 0.5 within 5 binomial standard deviations. The stream is split across two 'runs'
    (3 + 3 records) to check that uniformity survives the buffer's save/resume boundary."""
    n, k, trials = 6, 3, 12000
    items = records("x", n)
    subsets: Counter[tuple[int, ...]] = Counter()
    inclusion: Counter[int] = Counter()
    for seed in range(trials):
        buffer = ReservoirBuffer(capacity=k, seed=seed)
        buffer.add(items[:3])
        buffer.add(items[3:])
        lines = tuple(sorted(c.line for c in buffer.items))
        subsets[lines] += 1
        inclusion.update(lines)
    all_subsets = list(itertools.combinations(range(1, n + 1), k))
    observed = [subsets[s] for s in all_subsets]
    assert sum(observed) == trials
    assert stats.chisquare(observed).pvalue > 1e-4
    sd = math.sqrt(trials * 0.5 * 0.5)
    for line in range(1, n + 1):
        assert abs(inclusion[line] - trials * k / n) < 5 * sd


def test_reservoir_save_load_roundtrip(tmp_path):
    buffer = ReservoirBuffer(capacity=4, seed=2)
    buffer.add(tag_replay(records("a", 10), run="a@1", task="a"))
    buffer.save(tmp_path / "replay.jsonl")
    again = ReservoirBuffer.load(tmp_path / "replay.jsonl")
    assert (again.capacity, again.seen, again.seed) == (4, 10, 2)
    assert [c.messages for c in again.items] == [c.messages for c in buffer.items]
    assert replay_counts(again.items) == {"a@1:a": 4}
    assert again.items[0].meta["replay"]["source"] == "a.jsonl"


def test_stratified_sample_follows_cluster_sizes():
    items = records("x", 100)
    labels = [0] * 60 + [1] * 30 + [2] * 10
    chosen = stratified_sample(items, labels, 20, seed=0)
    by_cluster = Counter(labels[c.line - 1] for c in chosen)
    assert by_cluster == {0: 12, 1: 6, 2: 2}
    assert len({c.line for c in chosen}) == 20


def test_run_replay_buffer_reservoir_and_stratified(tmp_path):
    """The buffer a run leaves for the next one: its own records only (not the ones it replayed), tagged with the
    run and task; stratified keeps the same size and traces every record too."""
    from tunesmith.config import load_config
    from tunesmith.data.mixing import ReservoirBuffer
    from tunesmith.recipes.continual import REPLAY_FILE, _write_replay

    own = [Conversation(c.messages, c.source, c.line, {"task": "t"}) for c in records("t", 12)]
    replayed = tag_replay(records("old", 3), run="parent@1", task="old")
    for strategy in ("reservoir", "stratified"):
        config = load_config(None, ["output.name=child", "continual.replay_size=5",
                                    f"continual.replay_strategy={strategy}"])
        parent = ReservoirBuffer(capacity=5, seed=0)
        parent.add(replayed)
        _write_replay(config, tmp_path, parent, own + replayed, log=lambda *a: None)
        buffer = ReservoirBuffer.load(tmp_path / REPLAY_FILE)
        assert len(buffer.items) == 5 and buffer.seen == 3 + 12, strategy
        runs = {c.meta["replay"]["run"] for c in buffer.items}
        assert runs <= {"parent@1", "child"}, runs
        assert all(c.meta["replay"]["task"] == ("old" if c.meta["replay"]["run"] == "parent@1" else "t")
                   for c in buffer.items)
