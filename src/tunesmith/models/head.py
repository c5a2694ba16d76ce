"""The output head's chunked loss (train/head_loss.py): the rules the trainer and the planner share (no torch here,
so `tunesmith plan` does not import it).

The trainer computes the head and the cross-entropy in chunks of `chunk_rows(V)` labelled positions. Each chunk
reads the whole head weight twice (V x d, both matmuls), so a chunk of R rows does R/2 FLOPs per byte of weight
read and small chunks starve the matmul. Measured on the reference model (1,913 labelled rows, V = 49,152,
2 threads, forward + backward of head and loss, scratch A/B in one process): R = 42 took 1.5x the module path's
time, 85 1.15x, 170 0.93x, 256-768 0.74-0.79x. Each (R, V) fp32 buffer is capped at CHUNK_BYTES, so large
vocabularies get fewer rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CHUNK_ROWS = 512
CHUNK_BYTES = 256 * 2**20
MIN_ROWS = 64

# Config keys of transformers models whose forward changes the head's output before returning it (Gemma's logit
# soft-capping, Cohere's scale, Granite's division). The trainer does not rely on this list (it probes the model:
# train/head_loss.py fused_head_applies); the planner, which has only the config, does.
LOGIT_POSTPROCESSING_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: CHUNK_ROWS, fewer where a (rows, vocab) fp32 buffer would pass CHUNK_BYTES (never < MIN_ROWS)."""
    return max(MIN_ROWS, min(CHUNK_ROWS, CHUNK_BYTES // (4 * vocab_size)))


def config_returns_head_output(config: Mapping[str, Any]) -> bool:
    """The planner's guess of train/head_loss.py's probe: no logit post-processing key set in the model's config
    (or its text_config)."""
    for section in (config, config.get("text_config") or {}):
        if any(section.get(key) not in (None, 1, 1.0) for key in LOGIT_POSTPROCESSING_KEYS):
            return False
    return True


def fused_head_bytes(labelled: int, hidden_size: int, vocab_size: int, compute_bytes: int) -> int:
    """Bytes the chunked head loss holds at the end of the forward pass, beyond the activations: the hidden states'
    gradient (labelled x d, fp32) and the chunk's buffers, (rows, V) logits in the compute dtype, their fp32 copy
    under 16-bit compute, and the fp32 log-probabilities. (The head weight's own fp32 gradient, V x d when the head
    trains, is the planner's head-gradient term.)"""
    rows = min(chunk_rows(vocab_size), max(labelled, 1))
    per_element = 4 + 4 + (compute_bytes if compute_bytes < 4 else 0)
    return labelled * hidden_size * 4 + rows * vocab_size * per_element
