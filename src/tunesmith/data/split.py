"""Deterministic splits: order each record by a seeded hash of its content, then cut by the fractions.

Because the order is sha256(seed, canonical record) rather than a shuffle of the input order, a split does not
change when the input files are reordered or reformatted (key order, whitespace), only when the seed or the
records change. Sizes use the largest-remainder method so they always add up to n.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from tunesmith.errors import UsageError

SPLIT_NAMES = ("train", "validation", "test")


class SplitError(UsageError):
    pass


def parse_fractions(text: str | Sequence[float]) -> dict[str, float]:
    """"0.9,0.05,0.05" -> {"train": 0.9, "validation": 0.05, "test": 0.05}; they must sum to 1."""
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise SplitError(f"--split {text!r}: expected 1–3 non-negative fractions (train,validation,test) summing "
                         f"to 1, e.g. 0.9,0.05,0.05")
    return dict(zip(SPLIT_NAMES, values, strict=False))


def split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest remainder: floor(f_i * n), then +1 for the largest fractional parts until the sizes sum to n."""
    raw = [f * n for f in fractions]
    sizes = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (sizes[i] - raw[i], i))[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def seeded_order(keys: Sequence[str], seed: int) -> list[int]:
    """Indices sorted by sha256(f"{seed}:{key}") (ties by index)."""
    digest = [hashlib.sha256(f"{seed}:{key}".encode()).hexdigest() for key in keys]
    return sorted(range(len(keys)), key=lambda i: (digest[i], i))


def split_indices(keys: Sequence[str], fractions: dict[str, float], seed: int = 0,
                  strata: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Split names -> record indices. With `strata` (e.g. cluster labels) each stratum is cut separately."""
    groups: dict[int, list[int]] = {}
    for index, stratum in enumerate(strata if strata is not None else [0] * len(keys)):
        groups.setdefault(int(stratum), []).append(index)
    out: dict[str, list[int]] = {name: [] for name in fractions}
    for stratum in sorted(groups):
        members = groups[stratum]
        ordered = [members[i] for i in seeded_order([keys[m] for m in members], seed)]
        start = 0
        for name, size in zip(fractions, split_sizes(len(ordered), list(fractions.values())), strict=True):
            out[name] += ordered[start:start + size]
            start += size
    rank = {index: position for position, index in enumerate(seeded_order(keys, seed))}
    return {name: sorted(indices, key=rank.__getitem__) for name, indices in out.items()}
