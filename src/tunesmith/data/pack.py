"""Packing several examples into one sequence without cross-example attention, and batch collation.

A pack is a list of examples whose lengths sum to at most max_seq_len. In the batch each token carries its
example's segment id and a position id that restarts at 0 for each example. Attention is block-diagonal and
causal: query i may attend key j iff segment[i] == segment[j] and j <= i. The first label of every example is
set to -100, so no example is trained to predict across a boundary.

Semantics (one row): mask[i, j] = 0 if (seg[i] == seg[j] and j <= i) else finfo.min;  mask: (batch, 1, seq, seq).
transformers' SDPA and eager attention accept this additive 4-D mask as is; FlashAttention-2 instead reads
packed boundaries from position ids (both are built). On CPUs the trainer gives the same view without the mask:
`segment_lengths` and one causal SDPA call per example (models/attention.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.data.render import IGNORE_INDEX, Example


@dataclass
class Pack:
    examples: list[Example]

    @property
    def length(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def pack_examples(examples: list[Example], max_seq_len: int) -> list[Pack]:
    """Best-fit-decreasing bin packing (deterministic): fewer, fuller packs than packing in arrival order."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    packs: list[Pack] = []
    free: list[int] = []  # remaining room per pack
    for index in order:
        size = len(examples[index].input_ids)
        best, best_room = -1, max_seq_len + 1
        for p, room in enumerate(free):
            if size <= room < best_room:
                best, best_room = p, room
        if best < 0:
            packs.append(Pack([examples[index]]))
            free.append(max_seq_len - size)
        else:
            packs[best].examples.append(examples[index])
            free[best] -= size
    return packs


def single_packs(examples: list[Example]) -> list[Pack]:
    """No packing: one example per sequence."""
    return [Pack([e]) for e in examples]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which packs are visited in an epoch: a seeded shuffle, reproducible for resume."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def collate(packs: list[Pack], pad_token_id: int, dtype: torch.dtype = torch.float32,
            block_mask: bool = True, segments: bool = False) -> dict[str, Any]:
    """Right-padded batch with input_ids, labels, position_ids and an attention mask.

    block_mask=True: the additive 4-D block-diagonal causal mask (needed whenever a row holds several examples);
    False: a plain 2-D padding mask (one example per row, or FlashAttention-2 reading position ids).
    segments=True (instead of the block mask): the 2-D padding mask, per-example position ids and
    `segment_lengths`, per row the lengths of its examples in order, for per-example attention
    (models/attention.py), which gives every example the block mask's view of the row without the mask.
    """
    if segments and block_mask:
        raise ValueError("collate: segments=True replaces the block mask; pass block_mask=False with it")
    width = max(p.length for p in packs)
    batch = len(packs)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment_ids = torch.full((batch, width), -1, dtype=torch.long)  # -1 = padding
    for row, pack in enumerate(packs):
        offset = 0
        for seg, example in enumerate(pack.examples):
            n = len(example.input_ids)
            input_ids[row, offset: offset + n] = torch.tensor(example.input_ids)
            example_labels = torch.tensor(example.labels)
            example_labels[0] = IGNORE_INDEX
            labels[row, offset: offset + n] = example_labels
            position_ids[row, offset: offset + n] = torch.arange(n)
            segment_ids[row, offset: offset + n] = seg
            offset += n
        position_ids[row, offset:] = torch.arange(width - offset)
    padding = (segment_ids >= 0).long()
    out = {"input_ids": input_ids, "labels": labels}
    if block_mask:
        out["attention_mask"] = block_diagonal_mask(segment_ids, dtype)
    else:
        out["attention_mask"] = padding
    # Position ids restart per example. With one example per row the model derives the same ones itself, and
    # prompt-learning methods (which prepend virtual tokens) must not be given any.
    if block_mask or segments or any(len(p.examples) > 1 for p in packs):
        out["position_ids"] = position_ids
    if segments:
        out["segment_lengths"] = tuple(tuple(len(e.input_ids) for e in p.examples) for p in packs)
    out["real_tokens"] = padding.sum()
    return out


def block_diagonal_mask(segments: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """segments: (batch, seq) with -1 for padding → additive mask (batch, 1, seq, seq).

    Padding tokens form their own segment (they sit after all real tokens, so causality keeps real tokens from
    seeing them, and every query row keeps at least its diagonal: no all-masked rows, no NaNs).
    """
    seq = segments.shape[1]
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # (batch, seq, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)

