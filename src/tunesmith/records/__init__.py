"""Typed records shared between layers (plan, run summary, eval report, data manifest): one type per file, written and read through it, versioned."""
