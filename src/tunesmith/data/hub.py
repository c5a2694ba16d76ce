"""Hugging Face `datasets` as a data source: a hub id or a folder written by `Dataset(Dict).save_to_disk`.

Syntax (on the command line and in `data.train`/`data.validation`):
    hf:ORG/NAME[:SPLIT][@REVISION]     a hub dataset, e.g. hf:tatsu-lab/alpaca:train@main
    FOLDER[:SPLIT]                     a saved dataset folder (all splits, or one)
Rows are read through `datasets` (never re-implemented). The hub is asked first with a short timeout
(`HfApi.dataset_info(timeout=10)`) so an unreachable hub fails in seconds with a message naming the dataset and what
to do, instead of `load_dataset` retrying; with HF_HUB_OFFLINE=1 only the local cache is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.errors import RecordError

HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"(?P<name>[\w.\-]+(?:/[\w.\-]+)?)(?::(?P<split>[\w.\-]+))?(?:@(?P<revision>[\w.\-/]+))?")
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DatasetSource:
    text: str  # as the user wrote it (named in errors and in `source` of every record)
    name: str  # hub id or folder
    split: str | None = None
    revision: str | None = None
    local: bool = False


def parse_source(text: str) -> DatasetSource | None:
    """A `datasets` source, or None for an ordinary file path."""
    text = str(text)
    if text.startswith(HUB_PREFIX):
        match = _HUB_ID.fullmatch(text[len(HUB_PREFIX):])
        if not match:
            raise RecordError(text, None, None, "expected hf:ORG/NAME[:SPLIT][@REVISION], e.g. hf:tatsu-lab/alpaca:train")
        return DatasetSource(text, match["name"], match["split"], match["revision"])
    path = Path(text)
    if path.is_dir():
        return DatasetSource(text, text, local=True)
    folder, sep, split = text.rpartition(":")
    if sep and split and "/" not in split and Path(folder).is_dir():
        return DatasetSource(text, folder, split=split, local=True)
    return None


def is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _unreachable(source: DatasetSource, why: str) -> RecordError:
    return RecordError(source.text, None, None, f"cannot load dataset {source.name!r} from the Hugging Face hub ({why}). "
                       "On a machine with network: `python -c \"import datasets; datasets.load_dataset("
                       f"'{source.name}').save_to_disk('DIR')\"`, copy DIR here and pass DIR instead; or, if it is "
                       "in the local cache already, set HF_HUB_OFFLINE=1")


def _load_hub(source: DatasetSource) -> Any:
    import datasets

    if not _offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            HfApi().dataset_info(source.name, revision=source.revision, timeout=TIMEOUT_S)
        except RevisionNotFoundError:
            raise RecordError(source.text, None, None, f"dataset {source.name!r} has no revision "
                              f"{source.revision!r}") from None
        except RepositoryNotFoundError:
            raise RecordError(source.text, None, None, f"no dataset {source.name!r} on the Hugging Face hub (or it "
                              "is private: log in with `hf auth login`)") from None
        except Exception as exc:  # noqa: BLE001 - any transport failure means the same thing to the user
            raise _unreachable(source, f"{type(exc).__name__}: {exc}") from None
    try:
        return datasets.load_dataset(source.name, split=source.split, revision=source.revision)
    except (ValueError, KeyError) as exc:
        if "split" in str(exc).lower():
            raise RecordError(source.text, None, None, f"dataset {source.name!r}: {exc}") from None
        raise _unreachable(source, f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - offline cache miss, connection errors: same advice
        raise _unreachable(source, f"{type(exc).__name__}: {exc}") from None


def _load_local(source: DatasetSource) -> Any:
    from datasets import DatasetDict, load_from_disk

    path = Path(source.name)
    if not is_saved_dataset(path):
        raise RecordError(source.text, None, None, "a folder, but not one saved by datasets.save_to_disk "
                          "(no dataset_info.json / dataset_dict.json); pass its files instead")
    loaded = load_from_disk(str(path))
    if source.split is None:
        return loaded
    if not isinstance(loaded, DatasetDict):
        raise RecordError(source.text, None, None, f"split {source.split!r} asked, but {path} holds one dataset "
                          f"without splits; pass {path} alone")
    if source.split not in loaded:
        raise RecordError(source.text, None, None, f"no split {source.split!r}; it has {', '.join(loaded)}")
    return loaded[source.split]


def iter_dataset_rows(source: DatasetSource) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(source label, 1-based row, row without null fields) of every row of every selected split."""
    from datasets import DatasetDict

    loaded = _load_local(source) if source.local else _load_hub(source)
    splits = loaded.items() if isinstance(loaded, DatasetDict) else [(source.split or "", loaded)]
    for split, dataset in splits:
        label = source.text if source.split or not split else f"{source.text}:{split}" if not source.local \
            else f"{source.name}/{split}"
        for index, row in enumerate(dataset, start=1):
            yield label, index, {key: value for key, value in dict(row).items() if value is not None}
