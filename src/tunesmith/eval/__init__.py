"""Evaluation: batched generation, task metrics, forgetting measures, loss-curve diagnosis, tables and reports.

It may import data, methods (to load a trained run), train (nothing needed today), models, config and records;
never registry, serve, ui or recipes. Its trainer callbacks (forgetting.ForgettingCallback) implement the protocol
of train/callbacks.py by duck typing, so the trainer never imports eval."""
