"""Every format in every container round-trips with every turn; the CLI converts between formats."""

from __future__ import annotations

import csv
import json

import pytest

from tunesmith.cli import main
from tunesmith.data.convert import convert_file
from tunesmith.data.formats import FORMATS, to_format
from tunesmith.data.readers import container_of, file_format, load_records

MULTI = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who are you?"},
     {"role": "assistant", "content": "A helper."}, {"role": "user", "content": "Say 2+2, with \"quotes\", ünï."},
     {"role": "assistant", "content": "4\nand a second line"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]
SINGLE = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
           {"role": "assistant", "content": "Paris."}],
          [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]


def _conversations(fmt):
    return SINGLE if fmt == "alpaca" else MULTI


def _write(path, records, container):
    if container == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif container == "json":
        path.write_text(json.dumps(records, indent=2))
    elif container == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif container == "csv":
        keys = sorted({k for r in records for k in r})
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            for r in records:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif container == "hf":
        from datasets import Dataset

        Dataset.from_list(records).save_to_disk(str(path))


@pytest.mark.parametrize("container", ["jsonl", "json", "parquet", "csv", "hf"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_every_turn(tmp_path, fmt, container):
    conversations = _conversations(fmt)
    path = tmp_path / (f"data.{container}" if container != "hf" else "saved")
    _write(path, [to_format(c, fmt) for c in conversations], container)
    loaded = load_records([path])
    assert loaded.quarantine == []
    assert loaded.formats[str(path)] == fmt  # detected per file
    assert [c.messages for c in loaded.conversations] == conversations
    lines = [c.line for c in loaded.conversations]
    if container == "csv":  # the physical line where each row starts (multi-line cells push later rows down)
        assert lines[0] == 2 and lines[1] > lines[0]
    else:
        assert lines == [1, 2]


def test_container_detection(tmp_path):
    (tmp_path / "folder").mkdir()
    assert container_of(tmp_path / "x.parquet") == "parquet"
    assert container_of(tmp_path / "x.tsv") == "csv"
    assert container_of(tmp_path / "x.jsonl") == "json"
    with pytest.raises(Exception, match="save_to_disk"):
        container_of(tmp_path / "folder")


def test_forced_format_reports_against_that_schema(tmp_path):
    path = tmp_path / "a.jsonl"
    _write(path, [to_format(c, "messages") for c in MULTI], "jsonl")
    assert file_format(path, "sharegpt") == "sharegpt"
    loaded = load_records([path], "sharegpt")
    assert len(loaded.conversations) == 0
    assert [q["field"] for q in loaded.quarantine] == ["conversations", "conversations"]


@pytest.mark.parametrize("target", FORMATS)
def test_convert_between_formats(tmp_path, target):
    source = tmp_path / "in.jsonl"
    conversations = _conversations(target)
    _write(source, [to_format(c, "sharegpt") for c in conversations], "jsonl")
    out = tmp_path / f"out.{target}.jsonl"
    assert main(["data", "convert", str(source), "--to", target, "--out", str(out)]) == 0
    back = load_records([out])
    assert back.formats[str(out)] == target
    assert [c.messages for c in back.conversations] == conversations


def test_convert_reports_what_alpaca_cannot_hold(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    _write(source, [to_format(c, "messages") for c in MULTI] + [{"messages": "oops"}], "jsonl")
    records, problems = convert_file(source, "alpaca")
    assert len(records) == 1  # the single-exchange conversation
    assert [(p["line"], p["field"]) for p in problems] == [(1, None), (3, "messages")]
    assert "one user/assistant exchange" in problems[0]["reason"]
    assert main(["data", "convert", str(source), "--to", "alpaca"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and "in.jsonl:3 field 'messages'" in captured.err


def test_damaged_json_array_keeps_items_before_the_damage(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"}, {broken')
    loaded = load_records([path])
    assert [c.line for c in loaded.conversations] == [1, 2]
    assert [(q["line"], "array item 3" in q["reason"]) for q in loaded.quarantine] == [(3, True)]


def test_jsonl_whose_first_line_is_an_array(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('["x"]\n{"instruction": "a", "output": "b"}\n')
    loaded = load_records([path])
    assert [c.line for c in loaded.conversations] == [2]
    assert [(q["line"], q["reason"]) for q in loaded.quarantine] == [(1, "expected a JSON object, got list")]


def test_csv_bad_rows_are_quarantined_alone(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"instruction,output\nq1,a1\nq2,\xff\xfe\nq3,a3,extra\nq4,a4\n")
    loaded = load_records([path])
    assert [c.line for c in loaded.conversations] == [2, 5]
    assert [(q["line"], q["field"]) for q in loaded.quarantine] == [(3, "output"), (4, None)]
