"""The training splits of a run config: optional `data prepare`, then strict reading, hold-out and hashing."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tunesmith.config import ConfigError, RunConfig
from tunesmith.data.formats import Conversation, read_conversations, snapshot_hash
from tunesmith.data.system_prompt import add_system_prompt
from tunesmith.hashing import file_sha256


def _read(paths: list[str], split: str, fmt: str, files: list[dict[str, Any]],
          columns: dict[str, str] | None = None) -> list[Conversation]:
    conversations: list[Conversation] = []
    for path in paths:
        records = read_conversations(path, fmt, columns)
        sha256 = file_sha256(path) if Path(path).is_file() else None  # a saved dataset folder or a hub id has none
        files.append({"path": str(path), "split": split, "sha256": sha256, "records": len(records)})
        conversations.extend(records)
    return conversations


def load_splits(config: RunConfig, log=print) -> tuple[list[Conversation], list[Conversation], dict[str, Any]]:
    """Read train/validation conversations (strict: a bad record is an error naming file, line and field).

    Without validation files, `data.validation_fraction` of train is held out (seeded by train.seed).
    Returns (train, validation, manifest) where the manifest lists every file with its hash and record count.
    """
    data = config.data
    if not data.train:
        raise ConfigError("data.train: no training files given")
    files: list[dict[str, Any]] = []
    train_conversations = _read(data.train, "train", data.format, files, data.columns)
    if data.max_train_examples is not None:
        train_conversations = train_conversations[: data.max_train_examples]
    validation = _read(data.validation, "validation", data.format, files, data.columns)
    held_out = 0
    if not data.validation and data.validation_fraction > 0 and len(train_conversations) > 1:
        order = list(range(len(train_conversations)))
        random.Random(config.train.seed).shuffle(order)
        held_out = max(1, int(round(len(order) * data.validation_fraction)))
        chosen = set(order[:held_out])
        validation = [c for i, c in enumerate(train_conversations) if i in chosen]
        train_conversations = [c for i, c in enumerate(train_conversations) if i not in chosen]
    if data.max_validation_examples is not None:
        validation = validation[: data.max_validation_examples]
    add_system_prompt(train_conversations, data.system_prompt)
    add_system_prompt(validation, data.system_prompt)
    manifest = {
        "files": files,
        "train_records": len(train_conversations),
        "validation_records": len(validation),
        "validation_held_out_from_train": held_out,
        "max_train_examples": data.max_train_examples,
        "max_validation_examples": data.max_validation_examples,
        "hash": snapshot_hash(train_conversations),
        "validation_hash": snapshot_hash(validation),
    }
    return train_conversations, validation, manifest


def prepare_data(config: RunConfig, run_dir: Path, log=print) -> dict[str, Any]:
    """`data.prepare: true`: run `tunesmith data prepare` on the raw training files (validate, dedup, PII screen,
    split) into run_dir/data and train on its output; the prepare manifest goes into data_manifest.json."""
    from tunesmith.data.prepare import options_for_training, prepare

    options = options_for_training(config.data, tokenizer=None, seed=config.train.seed)
    manifest = prepare(list(config.data.train), run_dir / "data", options).to_dict()
    splits = manifest["splits"]
    config.data.train = [splits["train"]["path"]]
    if not config.data.validation and splits.get("validation", {}).get("count"):
        config.data.validation = [splits["validation"]["path"]]
    log(f"prepared data: {manifest['input']} records in, {manifest['kept']} kept, {manifest['quarantined']} quarantined, "
        f"{manifest['duplicates_exact']} + {manifest['duplicates_near']} duplicates; report in {run_dir / 'data'}")
    return manifest
