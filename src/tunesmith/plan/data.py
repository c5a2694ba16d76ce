"""What the planner needs from the user's data (`tunesmith plan --data FILE`): example lengths, so a shorter sequence
can say what share it would truncate, and the share of positions that carry a training target, which sizes the
selective-logits term (plan/activations.py).

Lengths are counted with the model's own tokenizer and chat template when it is on this machine (a local folder or
the reference model's cache), through the same `render_dataset` the trainer uses; otherwise whitespace words are
counted instead (data/lengths.py), which is said in `unit`, and the labelled share stays unknown (1.0 assumed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class DataProfile:
    lengths: list[int]  # per example, in `unit`
    unit: str
    labelled_fraction: float | None  # target tokens / tokens after rendering; None when no tokenizer was available
    examples: int
    quarantined: int

    def truncation(self, seq_len: int) -> dict[str, float]:
        """Share of examples longer than seq_len, and share of all tokens beyond it (what truncation would cut)."""
        total = sum(self.lengths) or 1
        over = [n for n in self.lengths if n > seq_len]
        return {"examples": round(len(over) / max(1, len(self.lengths)), 4),
                "tokens": round(sum(n - seq_len for n in over) / total, 4)}

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.lengths)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0  # noqa: E731
        return {"examples": self.examples, "quarantined": self.quarantined, "unit": self.unit,
                "length_p50": pick(0.5), "length_p95": pick(0.95), "length_max": ordered[-1] if ordered else 0,
                "labelled_fraction": self.labelled_fraction}


def local_tokenizer(model: str):
    """The model's tokenizer if it is on this machine (folder or reference cache), else None (no network)."""
    from tunesmith.models import reference

    for candidate in (Path(model).expanduser(), reference.cached_path(model)):
        if (candidate / "tokenizer_config.json").exists() or (candidate / "tokenizer.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(candidate))
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
    return None


def profile_data(files: list[str], model: str, seq_len: int) -> DataProfile:
    from tunesmith.data.lengths import token_lengths
    from tunesmith.data.readers import load_records

    loaded = load_records(files)
    conversations = [c.messages for c in loaded.conversations]
    tokenizer = local_tokenizer(model)
    lengths, unit = token_lengths(conversations, tokenizer)
    labelled = None
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) and loaded.conversations:
        from tunesmith.data.render import render_dataset

        _examples, stats = render_dataset(tokenizer, loaded.conversations, seq_len, "truncate")
        labelled = stats.target_tokens / stats.total_tokens if stats.total_tokens else None
    return DataProfile(lengths, unit, labelled, len(loaded.conversations), len(loaded.quarantine))
