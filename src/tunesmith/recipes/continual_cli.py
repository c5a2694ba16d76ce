"""CLI for multi-task and continual fine-tuning: `tunesmith multitask train|interference`, `tunesmith merge-adapters`.

(`tunesmith train run.yaml --continue-from NAME@VERSION|RUN_DIR` is a flag of `train`, in cli.py.) Thin
handlers: parse, call recipes/multitask.py, print. It lives in recipes/ (like ui/cli.py in ui/) so that cli.py
only registers it with one line and the import layers stay one-way.
"""

from __future__ import annotations

import argparse
import json


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def cmd_multitask_train(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.recipes.multitask import train_per_task

    _quiet_libraries()
    runs = train_per_task(load_config(args.config, args.set))
    if args.json:
        print(json.dumps(runs, indent=2))
    return 0


def cmd_multitask_interference(args: argparse.Namespace) -> int:
    from tunesmith.config import ConfigError, load_config
    from tunesmith.recipes.multitask import interference_matrix

    _quiet_libraries()
    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {item!r}: expected NAME=PATH (a run directory or an adapter folder)")
        adapters[name] = path
    result = interference_matrix(load_config(args.config, args.set), adapters, max_examples=args.max_examples,
                                 log=lambda *a: None)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))
        return 0
    tasks = result["tasks"]
    width = max(len(n) for n in result["rows"]) + 2
    print(f"interference matrix: {result['metric']} of each task (columns) under each adapter (rows)")
    print(" " * width + "".join(f"{t:>12}" for t in tasks))
    for name, row in result["rows"].items():
        print(f"{name:<{width}}" + "".join(f"{'-' if row[t] is None else format(row[t], '.3f'):>12}" for t in tasks))
    return 0


def cmd_merge_adapters(args: argparse.Namespace) -> int:
    from tunesmith.recipes.multitask import merge_runs

    _quiet_libraries()
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    report = merge_runs(args.runs, args.out, args.combination, weights, args.density, register=not args.no_register,
                        registry_url=args.registry)
    if args.eval:  # the merged adapter on every task of a multi-task config
        from pathlib import Path

        from tunesmith.atomic import write_json
        from tunesmith.config import load_config
        from tunesmith.recipes.multitask import interference_matrix

        result = interference_matrix(load_config(args.eval), {"merged": Path(args.out) / "adapter"},
                                     include_base=False, log=print)
        write_json(Path(args.out) / "task_eval.json", result)
        report["task_eval"] = result["rows"]["merged"]
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _example(example: str) -> dict:
    """Help that ends with an example invocation, like every other subcommand (cli.command; not imported: layers)."""
    import argparse

    return {"epilog": f"example:\n  {example}", "formatter_class": argparse.RawDescriptionHelpFormatter}


def add_continual(sub) -> None:
    from tunesmith.methods.combine import COMBINATIONS

    p = sub.add_parser("multitask", help="one adapter per task; the interference matrix (task x adapter)",
                       **_example("tunesmith multitask train examples/tasks/multitask.yaml"))
    msub = p.add_subparsers(dest="multitask_command", required=True)
    t = msub.add_parser("train", help="train one LoRA per task of data.datasets and print the serve line",
                        **_example("tunesmith multitask train examples/tasks/multitask.yaml"))
    t.add_argument("config", help="run config (YAML) with data.datasets")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_multitask_train)
    i = msub.add_parser("interference", help="score every task of data.datasets under every adapter (and the base)",
                        **_example("tunesmith multitask interference examples/tasks/multitask.yaml "
                                   "--adapter risk=runs/tasks-multitask-risk"))
    i.add_argument("config", help="run config (YAML) with data.datasets (their test files are used)")
    i.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="a run directory or adapter")
    i.add_argument("--max-examples", type=int, default=None, help="test records per task (default eval.max_examples)")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_multitask_interference)

    m = sub.add_parser("merge-adapters", help="merge the LoRA adapters of several runs into one run (merged_from)",
                       **_example("tunesmith merge-adapters A@1 B@1 --out runs/merged --combination ties"))
    m.add_argument("runs", nargs="+", help="runs to merge: NAME@VERSION, alias or run directory")
    m.add_argument("--out", required=True, help="new run directory for the merged adapter")
    m.add_argument("--combination", default="cat", choices=COMBINATIONS,
                   help="cat = exact sum of the deltas (task arithmetic); others approximate (logit drift reported)")
    m.add_argument("--weights", default=None, help="comma-separated weight per run (default 1 each)")
    m.add_argument("--density", type=float, default=None, help="kept share for ties/dare (default 0.5)")
    m.add_argument("--registry", default=None, help="registry location (default: the usual one)")
    m.add_argument("--no-register", action="store_true", help="do not record the merged run in the registry")
    m.add_argument("--eval", default=None, metavar="CONFIG",
                   help="also score the merged adapter on every task of this multi-task config (task_eval.json)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_merge_adapters)
