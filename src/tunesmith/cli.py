"""The `tunesmith` command line: one thin function per subcommand; no logic beyond parsing and printing.

Each subcommand group has an `add_<group>(sub)` function that builds its parser and thin `cmd_*` handlers, listed
in `build_parser`; handlers import their modules lazily so that `tunesmith --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# --------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.config import load_config
    from tunesmith.train.run import run_training

    config = load_config(args.config, args.set)
    result = run_training(config, resume=args.resume)
    print(json.dumps(result, indent=2) if args.json else "")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model from a YAML run config")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. train.learning_rate=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=cmd_train)


# -------------------------------------------------------------------------------------------- config
def cmd_config(args: argparse.Namespace) -> int:
    from tunesmith.config import config_help, load_config, resolved_yaml

    if args.keys:
        print("\n".join(config_help()))
        return 0
    print(resolved_yaml(load_config(args.config, args.set)), end="")
    return 0


def add_config(sub) -> None:
    p = sub.add_parser("config", help="validate a run config and print it resolved (or list every key)")
    p.add_argument("config", nargs="?", help="run config (YAML); omitted = defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    p.add_argument("--keys", action="store_true", help="list every key with its default and help")
    p.set_defaults(func=cmd_config)


# -------------------------------------------------------------------------------------------- models
def cmd_models_fetch_reference(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.models import reference

    path = reference.ensure_converted(reference.REFERENCE_ID)
    print(f"{reference.REFERENCE_ID}: {path}")
    return 0


def add_models(sub) -> None:
    p = sub.add_parser("models", help="base-model utilities")
    msub = p.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch-reference", help="convert the packaged SmolLM2-135M-Instruct GGUF into the local cache")
    f.set_defaults(func=cmd_models_fetch_reference)


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_config, add_models):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tunesmith.config import ConfigError
    from tunesmith.data.formats import RecordError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, RecordError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
