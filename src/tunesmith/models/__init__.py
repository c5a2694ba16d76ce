"""Base models: loading (local path, hub id, GGUF), the reference model, tiny test models, hardware facts."""
