"""Datasets: formats, validation, deduplication, quality screening, splitting, rendering with masks, packing."""
