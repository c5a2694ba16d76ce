"""Datasets: the records users bring, read, checked and turned into labelled token sequences.

Reading (`containers` → `formats`/`readers`, with `columns` and `hub`): JSONL/JSON/CSV/Parquet files, saved or hub
`datasets`, in Alpaca, ShareGPT, OpenAI messages or ChatML form, tool calls included (`toolcalls`), parsed into one
canonical `Conversation`. Checking (`prepare`, with `dedup`, `pii`, `lengths`, `diversity`, `split`, `report`):
validation with a quarantine, dedup, the secrets/PII screen, splits, and a manifest (`records.data`) whose counts
add up. Training input (`render`, `pack`, `mixing`): the chat template with assistant-only labels, packing.
This package may import the base of the house (errors, atomic, hashing, config, records, models), never a
package above it.
"""
