"""Serving: one base model, many LoRA adapters in mixed batches, behind an OpenAI-compatible API.

segments (pure routing/padding), batched_lora (reference + fast path), adapters (PEFT folder checks, malformed
files refused), identity (is an adapter's recorded base this server's base: local copy, config + weights
fingerprint), cache (hot adapters, LRU, pins), kv (cache join/leave), engine (continuous batching; GenResult /
GenError records, cancel(), stats()), router (tenants, A/B), metrics, api, server, testing (helpers for tests and
benchmarks). It reads adapters through registry and methods and may import those, eval, data, models, config and
records; never train, ui or recipes."""
