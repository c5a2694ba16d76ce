"""Base models: loading (local path, hub id, GGUF), the reference model, tiny test models, hardware facts,
model facts and the eos/pad discovery (tokens.py).

Part of the bottom layer: it may import config, records and errors/atomic/hashing, and nothing else of tunesmith."""
