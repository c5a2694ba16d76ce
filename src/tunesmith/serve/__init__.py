"""Serving: one base model, many LoRA adapters in mixed batches, behind an OpenAI-compatible API.

segments (pure routing/padding), batched_lora (reference + fast path), adapters (PEFT folder checks, malformed
files refused), identity (is an adapter's recorded base this server's base: local copy, config + weights
fingerprint), cache (hot adapters, LRU, pins), kv (cache join/leave), engine (continuous batching; GenResult /
GenError records, cancel(), stats()), router (tenants, A/B), metrics, api, server, testing (helpers for tests and
benchmarks). serve sits at the top of the library with ui: it may import models, methods and registry (adapters by
registry alias, the base-model resolver and hashes), never train, eval or recipes.
"""
