"""Typed records: the files one layer writes and another reads, each defined once and versioned."""
