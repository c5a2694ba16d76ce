"""Pure index arithmetic for mixed-adapter batches: which rows use which adapter slot, and left-padding positions.

No model code here, so it is tested on its own (tests/serve/test_serve_batched_lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BASE_SLOT = -1  # a row served by the base model alone


@dataclass(frozen=True)
class RowSlots:
    """Per-step routing: `rows` (k,) indices of the batch rows that carry an adapter, `slots` (k,) their slots.

    Semantics: delta[rows[j]] = B[slots[j]] @ A[slots[j]] @ x[rows[j]]; every other row gets no delta.
    `all_rows` is True when rows == arange(batch) (no index_add needed).
    """

    rows: torch.Tensor
    slots: torch.Tensor
    all_rows: bool

    @property
    def empty(self) -> bool:
        return self.rows.numel() == 0


def route(slot_per_row: list[int], device: torch.device | str = "cpu") -> RowSlots:
    """[2, -1, 0, 2] -> rows [0, 2, 3], slots [2, 0, 2]; computed once per step, shared by every LoRA layer."""
    rows = [i for i, s in enumerate(slot_per_row) if s != BASE_SLOT]
    slots = [slot_per_row[i] for i in rows]
    return RowSlots(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        all_rows=len(rows) == len(slot_per_row),
    )


def segments(slot_per_row: list[int]) -> list[tuple[int, list[int]]]:
    """Group rows by adapter slot, base rows left out: [2, -1, 0, 2] -> [(0, [2]), (2, [0, 3])] (Punica's SGMV segments)."""
    groups: dict[int, list[int]] = {}
    for row, slot in enumerate(slot_per_row):
        if slot != BASE_SLOT:
            groups.setdefault(slot, []).append(row)
    return sorted(groups.items())


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one length.

    Returns input_ids (b, L), attention_mask (b, L) with 0 on padding, position_ids (b, L) = cumsum(mask) - 1
    (0 on padding), so every row's real tokens sit at positions 0..len-1 exactly as when it runs alone.
    """
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, length - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions
