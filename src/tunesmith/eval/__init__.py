"""Evaluation: batched generation, task metrics, forgetting measures, loss-curve diagnosis and reports."""
