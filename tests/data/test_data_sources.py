"""Where data comes from and how it is described: column mappings (CLI and run config), Hugging Face datasets (a
saved folder with splits; the hub path's errors), the typed manifest, and the redaction list in report.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.data import hub
from tunesmith.data.errors import PrepareError, RecordError
from tunesmith.data.formats import read_conversations
from tunesmith.data.prepare import PrepareOptions, check, prepare
from tunesmith.data.readers import load_records
from tunesmith.records.data import DataManifest, SplitInfo

FIXTURES = Path(__file__).parent / "fixtures"
QA = FIXTURES / "qa_columns.jsonl"
FAST = dict(diversity=False, pii="report", dedup=())


# ------------------------------------------------------------------------------------------- columns
def test_column_mapping_reads_a_question_answer_file():
    loaded = load_records([QA], columns={"prompt": "question", "response": "answer"})
    assert loaded.quarantine == [] and loaded.formats[str(QA)] == "alpaca"
    assert [m["content"] for m in loaded.conversations[1].messages] == ["Who wrote Hamlet?", "William Shakespeare."]
    strict = read_conversations(QA, columns={"instruction": "question", "output": "answer", "query": "context"})
    assert strict[2].messages[0]["content"] == "What is 7 times 8?\n\nmath"


def test_unknown_mapped_column_names_the_file_and_its_columns():
    with pytest.raises(RecordError) as caught:
        load_records([QA], columns={"prompt": "query_text", "response": "answer"})
    message = str(caught.value)
    assert str(QA) in message and "query_text" in message and "answer, context, question" in message
    with pytest.raises(PrepareError, match="unknown name"):
        check([str(QA)], PrepareOptions(columns={"question_field": "question"}, **FAST))


def test_turn_key_mapping(tmp_path):
    path = tmp_path / "dialog.jsonl"
    path.write_text(json.dumps({"conversations": [{"speaker": "human", "text": "hi"},
                                                  {"speaker": "gpt", "text": "hello"}]}) + "\n")
    (conversation,) = load_records([path], columns={"role": "speaker", "content": "text"}).conversations
    assert conversation.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_columns_on_the_cli_and_in_the_run_config(tmp_path, capsys):
    assert main(["data", "check", str(QA), "--columns", "prompt=question,response=answer", "--no-diversity",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 3
    assert main(["data", "check", str(QA), "--columns", "prompt=missing"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "question" in err
    assert main(["data", "check", str(QA), "--columns", "prompt"]) == 2
    assert "NAME=COLUMN" in capsys.readouterr().err
    from tunesmith.config import DataConfig
    from tunesmith.data.prepare import options_for_training

    config = DataConfig(train=[str(QA)], columns={"prompt": "question", "response": "answer"})
    assert options_for_training(config).columns == {"prompt": "question", "response": "answer"}
    assert len(read_conversations(QA, config.format, config.columns)) == 3


# ------------------------------------------------------------------------------------ HF datasets
@pytest.fixture
def saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = lambda n, tag: {"instruction": [f"{tag} question {i}" for i in range(n)],  # noqa: E731
                           "output": [f"{tag} answer {i}" for i in range(n)]}
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict(rows(5, "train")), "test": Dataset.from_dict(rows(2, "test"))}
                ).save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_folder_with_and_without_a_split(saved_dataset):
    everything = load_records([str(saved_dataset)])
    assert everything.input == 7 and {c.source for c in everything.conversations} == {
        f"{saved_dataset}/train", f"{saved_dataset}/test"}
    train = load_records([f"{saved_dataset}:train"])
    assert train.input == 5 and all(c.source == f"{saved_dataset}:train" for c in train.conversations)
    assert [c.line for c in train.conversations] == [1, 2, 3, 4, 5]
    manifest = check([f"{saved_dataset}:test"], PrepareOptions(**FAST))
    assert manifest.input == manifest.kept == 2 and manifest.files[0]["sha256"] is None
    with pytest.raises(RecordError, match="no split 'validation'; it has train, test"):
        load_records([f"{saved_dataset}:validation"])


def test_hub_source_syntax():
    assert hub.parse_source("hf:tatsu-lab/alpaca:train@v1.0") == hub.DatasetSource(
        "hf:tatsu-lab/alpaca:train@v1.0", "tatsu-lab/alpaca", "train", "v1.0")
    assert hub.parse_source("hf:squad") == hub.DatasetSource("hf:squad", "squad")
    assert hub.parse_source("data/train.jsonl") is None
    with pytest.raises(RecordError, match="expected hf:ORG/NAME"):
        hub.parse_source("hf:")


def test_unreachable_hub_names_the_dataset_and_what_to_do(monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(hub, "_offline", lambda: False)
    started = time.monotonic()
    with pytest.raises(RecordError) as caught:
        load_records(["hf:someone/some-dataset:train"])
    message = str(caught.value)
    assert "someone/some-dataset" in message and "save_to_disk" in message and "HF_HUB_OFFLINE=1" in message
    assert time.monotonic() - started < 5


def test_offline_cache_miss_is_the_same_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_offline", lambda: True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(RecordError, match="cannot load dataset 'nobody/nothing'"):
        load_records(["hf:nobody/nothing"])
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------------------- manifest
def test_manifest_round_trips_and_old_files_still_read(tmp_path):
    manifest = check([str(QA)], PrepareOptions(columns={"prompt": "question", "response": "answer"}, **FAST))
    manifest.write(tmp_path)
    assert DataManifest.read(tmp_path / "manifest.json") == manifest
    old = {k: v for k, v in manifest.to_dict().items() if k not in ("schema_version", "tool_conversations",
                                                                    "findings_path")}
    old["splits"] = {"train": {"count": 3, "hash": "sha256:x", "path": "t.jsonl"}}
    old["future_field"] = {"kept": True}
    (tmp_path / "old.json").write_text(json.dumps(old))
    read = DataManifest.read(tmp_path / "old.json")
    assert read.schema_version == 1 and read.splits["train"] == SplitInfo(3, "sha256:x", "t.jsonl")
    assert read.extra == {"future_field": {"kept": True}} and read.to_dict()["future_field"] == {"kept": True}


def test_report_lists_every_redaction_never_the_value(tmp_path):
    out = tmp_path / "out"
    manifest = prepare([str(FIXTURES / "alpaca_urls.jsonl")], out, PrepareOptions(pii="redact", diversity=False))
    assert manifest.pii == {"EMAIL": 1, "PHONE": 1}
    report = (out / "report.md").read_text()
    source = FIXTURES / "alpaca_urls.jsonl"
    for kind in ("EMAIL", "PHONE"):
        assert f"| {source} | 6 | `messages[1].content` | {kind} | `[{kind}]` | redacted |" in report
    assert "help.desk@example.org" not in report and "7946 0958" not in report
    findings = [json.loads(line) for line in (out / "pii_findings.jsonl").read_text().splitlines()]
    assert len(findings) == 2 and manifest.findings_path == str(out / "pii_findings.jsonl")
    train = "".join((out / f"{name}.jsonl").read_text() for name in manifest.splits)
    assert "https://www.bbc.co.uk/news/science-environment-56837908" in train and "[SECRET]" not in train
    assert "https://upload.wikimedia.org/wikipedia/commons/a/ab/File.jpg" in train


# ------------------------------------------------------------------------------------ training path
def test_training_reads_tool_calls_from_a_saved_dataset_with_mapped_columns(tmp_path, tiny_model_dir):
    """One optimizer step end to end: a `datasets` folder (split `train`) whose turns live in a non-standard
    column, tool calls rendered by the ChatML template's fallback, the notice and the counts in data_manifest.json."""
    from datasets import Dataset, DatasetDict

    from tunesmith.config import load_config
    from tunesmith.recipes.finetune import run_finetune

    good = [json.loads(line) for line in (FIXTURES / "openai_toolcalls.jsonl").read_text().splitlines()][:4]
    # Arrow unifies the turns into one struct type, so absent keys come back as nested nulls (tool_calls=None on
    # a user turn, ...); tools are kept as LLaMA-Factory's JSON string
    rows = [{"dialog": r["messages"], "tools": json.dumps(r.get("tools", []))} for r in good]
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(folder))
    config = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train=[{folder}:train]", "data.validation=[]",
        "data.validation_fraction=0", "data.max_seq_len=1024", "data.columns={messages: dialog}",
        "train.batch_size=2", "train.max_steps=1", "train.show_progress=false", "method.lora.r=4",
        f"output.dir={tmp_path / 'runs'}", "output.name=tools", "output.register_run=false"])
    run_finetune(config, log=lambda *a, **k: None)
    manifest = json.loads((tmp_path / "runs" / "tools" / "data_manifest.json").read_text())
    assert manifest["train_records"] == 4 and manifest["files"][0]["sha256"] is None
    render = manifest["render"]["train"]
    assert render["examples_out"] == 4 and render["tool_fallback"] == 3 and "no tool support" in render["notices"][0]
