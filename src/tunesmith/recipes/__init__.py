"""Recipes: the end-to-end runs a user starts, and the only layer that wires several packages together.

finetune.py is `tunesmith train` (data → method → train → eval → register); splits.py reads a run's training
splits; report.py ends a run (evaluation table, plots, diagnosis, registration); checks.py validates a config
before any heavy work. Recipes may import every library package (data, methods, train, eval, registry, records,
models, config); nothing in the library imports a recipe — only cli.py does (torchtune's recipes/ vs library).
"""
