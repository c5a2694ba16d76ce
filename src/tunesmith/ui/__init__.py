"""`tunesmith ui`: a local web dashboard over the registry and the run directories.

It reads only what the other layers already wrote (the registry through `tunesmith.registry`, and the files of a
run directory: config.yaml, summary.json, metrics.jsonl, eval.json, diagnosis.json, data_manifest.json); it never
trains or evaluates (it may import registry, records, config and the bottom helpers; never train, serve or
recipes). Registry actions (promote, rollback, archive) call the same registry functions as the CLI.

Modules:
  sources.py   where runs come from (registry + a runs folder), safe run-dir lookup, metrics.jsonl series
  views.py     the JSON the pages draw: runs table, compare, examples that differ, the data report
  app.py       FastAPI routes, the admin key, security headers, static assets
  server.py    binds (127.0.0.1 by default; elsewhere only with a key) and runs uvicorn
  cli.py       `tunesmith ui` argument parsing
  static/      index.html, app.js, app.css and the vendored uPlot chart library (MIT, see static/LICENSE.uPlot)
"""
