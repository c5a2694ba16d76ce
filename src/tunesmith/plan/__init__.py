"""The planner: exact parameter counts per method, a memory estimate per method, and advice (`tunesmith plan`).

It iterates the method registry and may import methods, data, models, config, records and the bottom helpers;
never train, eval, registry, serve, ui or recipes."""
