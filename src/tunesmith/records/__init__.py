"""Typed records: the files one layer writes and another reads, each defined once and versioned.

One module per record (run.py: `RunSummary` for summary.json and the `RunDir` loader; eval.py: `EvalReport` for
eval.json; data.py, plan.py: the data manifest and the plan report). Each record is written and read through the
same type and carries a `schema_version`; files written before versioning still read. Records sit at the bottom
of the house beside `config`, `errors` and `atomic`: they may import those, never a package above them.
"""
