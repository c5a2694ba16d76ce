"""Datasets: formats, validation, deduplication, quality screening, splitting, rendering with masks, packing.

The lowest library layer: it may import only models (tokenizers), config, records and the bottom helpers
(errors, atomic, hashing), never methods, train, eval, registry, serve, ui or recipes."""
