"""Serving: one base model, many LoRA adapters in mixed batches, behind an OpenAI-compatible API.

segments (pure routing/padding), batched_lora (reference + fast path), adapters (PEFT folder checks), cache (hot
adapters, LRU), kv (cache join/leave), engine (continuous batching), router (tenants, A/B), metrics, api, server.
It reads adapters through registry and methods and may import those, eval, data, models, config and records;
never train, ui or recipes."""
