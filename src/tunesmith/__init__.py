"""tunesmith: from a labelled dataset to a fine-tuned, evaluated, versioned and served language model.

Layers, bottom to top (a package imports only its own modules and those below it; tests/core/test_layers.py holds
this): errors, atomic, hashing, config, records, models → data → methods → plan → train → eval → registry →
serve | ui → recipes → cli. See DESIGN.md for the picture."""

__version__ = "0.1.0"
