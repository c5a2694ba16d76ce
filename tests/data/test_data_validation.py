"""Each validation rule names file, line and field; counts add up on a corrupted file; a seeded fuzz test."""

from __future__ import annotations

import json
import random
import time

import pytest

from tunesmith.data.prepare import PrepareOptions, check, prepare
from tunesmith.data.readers import load_records

GOOD_ALPACA = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
GOOD_CHATML = {"text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"}
GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
GOOD_MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}

# (record or raw line, field named in the error, words in the reason)
RULES = [
    ({"instruction": "x"}, "output", "missing"),  # missing field
    ({"instruction": 3, "output": "x"}, "instruction", "expected a string, got int"),  # wrong type
    ({"instruction": "x", "output": "   "}, "output", "empty"),  # empty turn
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     "messages[1].role", "unknown role 'robot'"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     "messages[0].role", "turns out of order"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "does not end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "messages[1].content", "empty"),
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "b"}]},
     "turn[0].content", "invalid UTF-8"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}, "conversations[1].value", "missing"),
    ({"text": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>wizard\nyo<|im_end|>"}, "text[turn 1].role",
     "unknown role"),
]


@pytest.mark.parametrize("record,field,reason", RULES)
def test_each_rule_names_file_line_and_field(tmp_path, record, field, reason):
    path = tmp_path / "rules.jsonl"
    good = {"instruction": GOOD_ALPACA, "messages": GOOD_MESSAGES, "text": GOOD_CHATML,
            "conversations": GOOD_SHAREGPT}[next(k for k in record if k != "output")]
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")  # the good first line sets the format
    loaded = load_records([path])
    assert len(loaded.quarantine) == 1, loaded.quarantine
    bad = loaded.quarantine[0]
    assert (bad["file"], bad["line"], bad["field"]) == (str(path), 2, field)
    assert reason in bad["reason"]


@pytest.mark.parametrize("raw,reason", [(b"{not json\n", "not valid JSON"), (b'{"a": "\xff\xfe"}\n', "invalid UTF-8"),
                                        (b"[1, 2]\n", "expected a JSON object")])
def test_unreadable_lines_are_quarantined_with_line(tmp_path, raw, reason):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(json.dumps(GOOD_ALPACA).encode() + b"\n\n" + raw)
    loaded = load_records([path])
    assert len(loaded.conversations) == 1
    assert [(q["line"], reason in q["reason"]) for q in loaded.quarantine] == [(3, True)]


def test_counting_identity_on_a_corrupted_file(tmp_path):
    lines = [json.dumps({"instruction": f"Question number {i} about item {i * 7}", "output": f"Answer {i}"})
             for i in range(30)]
    lines[3] = lines[3][:20]  # truncated
    lines[5] = json.dumps({"instruction": "q"})  # missing output
    lines[8] = lines[2]  # exact duplicate
    lines[9] = lines[2].replace("Question", "question")  # exact after normalisation
    lines[12] = json.dumps({"instruction": "Long " + "word " * 400, "output": "x"})  # trimmed by --max-tokens
    path = tmp_path / "corrupted.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken bytes\n")
    manifest = prepare([str(path)], tmp_path / "out", PrepareOptions(max_tokens=100, diversity=False, pii="report"))
    assert manifest.input == 31
    assert (manifest.quarantined, manifest.duplicates_exact, manifest.trimmed) == (3, 2, 1)
    assert manifest.kept == 31 - 3 - 2 - 1
    assert manifest.identity["holds"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert manifest.identity["formula"] in report
    quarantine = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["line"] for q in quarantine) == [4, 6, 31]
    removed = [json.loads(x) for x in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert sorted((r["line"], r["reason"]) for r in removed) == [(9, "duplicate_exact"), (10, "duplicate_exact"),
                                                                 (13, "trimmed")]


# ------------------------------------------------------------------------------------------------- fuzz
def _good_record(rng: random.Random, index: int) -> dict:
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) for _ in range(8))
    if rng.random() < 0.5:
        return {"instruction": f"Task {index}: {words}", "input": "", "output": f"Result {index} {words}"}
    return {"instruction": f"Task {index}: {words}", "output": f"Result {index}"}


def _corrupt(rng: random.Random, record: dict) -> tuple[bytes, bool]:
    """(line bytes, still valid?) after one random corruption."""
    line = json.dumps(record)
    kind = rng.choice(["truncate", "wrong_type", "binary", "huge_good", "huge_bad", "delete", "empty", "not_object",
                       "control_char", "keep"])
    if kind == "truncate":
        return line[: rng.randrange(1, len(line) - 1)].encode(), False
    if kind == "wrong_type":
        field = rng.choice(["instruction", "output"])
        return json.dumps({**record, field: rng.choice([1, 2.5, True, ["x"], {"a": 1}, None])}).encode(), False
    if kind == "binary":
        raw = bytearray(line.encode())
        raw[rng.randrange(len(raw))] = rng.choice([0xFF, 0xFE, 0xC0, 0x80])
        return bytes(raw), False
    if kind == "huge_good":
        return json.dumps({**record, "output": record["output"] + " z" * 100_000}).encode(), True
    if kind == "huge_bad":
        return b'{"instruction": "' + b"y" * 200_000, False
    if kind == "delete":
        deleted = rng.choice(["instruction", "output"])
        return json.dumps({k: v for k, v in record.items() if k != deleted}).encode(), False
    if kind == "empty":
        return json.dumps({**record, "output": " \t "}).encode(), False
    if kind == "not_object":
        return json.dumps(rng.choice([[record], "text", 42, None])).encode(), False
    if kind == "control_char":
        return line.replace("Task", "Ta\x01sk", 1).encode(), False  # raw control characters are invalid JSON
    return line.encode(), True


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_corrupted_file(tmp_path, seed):
    rng = random.Random(seed)
    started = time.monotonic()
    lines, good_lines, bad_lines = [], set(), set()
    for index in range(80):
        record = _good_record(rng, index)
        raw, valid = _corrupt(rng, record) if rng.random() < 0.5 else (json.dumps(record).encode(), True)
        lines.append(raw)
        (good_lines if valid else bad_lines).add(index + 1)
    if seed % 2:  # also cut the whole file mid-line
        data = b"\n".join(lines)
        cut = data.rfind(b"\n", 0, len(data) - 5) + 5
        last_line = data[:cut].count(b"\n") + 1
        good_lines = {n for n in good_lines if n < last_line}
        bad_lines = {n for n in bad_lines if n < last_line} | {last_line}
        data = data[:cut]
    else:
        data = b"\n".join(lines) + b"\n"
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    loaded = load_records([path], "alpaca")
    assert {c.line for c in loaded.conversations} == good_lines
    assert {q["line"] for q in loaded.quarantine} == bad_lines
    assert all(q["reason"] and q["file"] == str(path) for q in loaded.quarantine)
    counts = check([str(path)], PrepareOptions(format="alpaca", dedup=(), diversity=False, pii="report"))
    assert counts.input == len(good_lines) + len(bad_lines)
    assert counts.kept == len(good_lines) and counts.quarantined == len(bad_lines)
    assert time.monotonic() - started < 60
