"""`tunesmith ui` arguments; cli.py registers them with one call to `add_ui(sub)`."""

from __future__ import annotations

import argparse


def cmd_ui(args: argparse.Namespace) -> int:
    from tunesmith.config import ConfigError
    from tunesmith.ui.server import UIConfigError, run_ui

    try:
        run_ui(registry=args.registry, runs_dir=args.runs, host=args.host, port=args.port,
               admin_key_file=args.admin_key_file)
    except UIConfigError as exc:
        raise ConfigError(str(exc)) from None
    return 0


def add_ui(sub) -> None:
    p = sub.add_parser("ui", help="local web dashboard: compare runs, examples that differ, data report, promote",
                       epilog="example:\n  tunesmith ui --runs runs --port 8080",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", default=None, metavar="URL",
                   help="SQLAlchemy URL or path (default: $TUNESMITH_REGISTRY, else runs/registry.db)")
    p.add_argument("--runs", default="runs", metavar="DIR", help="folder of run directories, shown live (default runs)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; others need --admin-key-file)")
    p.add_argument("--port", type=int, default=8765, help="listen port (default 8765)")
    p.add_argument("--admin-key-file", default=None, metavar="FILE",
                   help="file holding the admin key; enables promote/rollback/archive (off without it)")
    p.set_defaults(func=cmd_ui)
