"""The `tunesmith` command line: one thin function per subcommand; no logic beyond parsing and printing.

Each subcommand group has an `add_<group>(sub)` function that builds its parser (through `command`, so that its
help ends with an example) and thin `cmd_*` handlers, listed in `build_parser` (the larger groups live beside this
file: cli_data.py, cli_runs.py); handlers import their modules
lazily so that `tunesmith --help` stays fast. `main` is the one place errors become `error:`/`hint:` lines and
exit statuses (see EXIT_STATUSES).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DESCRIPTION = "tunesmith: fine-tune a language model on your own data, then evaluate, version and serve it."
PATH_STEPS = (  # (command, what it is for, one example)
    ("plan", "what fits your hardware, which method",
     "tunesmith plan --model HuggingFaceTB/SmolLM2-135M-Instruct --examples 2000 --data train.jsonl --write run.yaml"),
    ("data", "validate, dedup, screen and split", "tunesmith data prepare raw.jsonl --out data/"),
    ("train", "fine-tune from a run config", "tunesmith train run.yaml"),
    ("eval", "score the run, compare with the base", "tunesmith eval runs/run --data data/test.jsonl --base"),
    ("merge", "fold the adapter into the base weights", "tunesmith merge runs/run --out merged/"),
    ("serve", "base + adapters, OpenAI-compatible API",
     "tunesmith serve --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter run=runs/run/adapter"),
    ("runs", "list, compare, promote, roll back runs", "tunesmith runs list"),
)
TYPICAL_PATH = "\n".join([
    "the typical path, plan -> data -> train -> eval -> merge/serve -> runs (`tunesmith COMMAND --help` for options):",
    *(f"  {name:<6} {what}\n           {example}" for name, what, example in PATH_STEPS),
    "",
    "docs: README.md (tour, run directory, exit statuses) and docs/; every config key: tunesmith config --keys",
    "exit status: 0 success, 1 failure, 2 usage or configuration error; --debug (or TUNESMITH_DEBUG=1) prints tracebacks",
])
EXIT_STATUSES = {"success": 0, "failure": 1, "usage or configuration error": 2, "interrupted (Ctrl-C)": 130,
                 "output pipe closed early": 141}


def command(sub, name: str, help: str, example: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser whose --help starts with what it does and ends with an example invocation."""
    parser = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter,
                            **kwargs)
    # SUPPRESS: when absent here, the top-level `tunesmith --debug COMMAND` value is kept
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks of errors")
    return parser


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# --------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.config import load_config
    from tunesmith.recipes.checks import check_run_paths
    from tunesmith.recipes.finetune import run_finetune

    config = load_config(args.config, args.set)
    check_run_paths(config, args.config)  # before the model loads: every missing path in one message
    from tunesmith.recipes.continual import needs_continual, run_continual  # continual/multi-task: recipes/continual.py

    if args.continue_from:
        config.continual.continue_from = args.continue_from
    summary = run_continual(config, args.resume) if needs_continual(config) else run_finetune(config, resume=args.resume)
    print(json.dumps(summary.to_dict() if summary else {}, indent=2) if args.json else "")
    return 0


def add_train(sub) -> None:
    p = command(sub, "train", "fine-tune a model from a YAML run config",
                "tunesmith train run.yaml --set train.learning_rate=1e-4")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. train.learning_rate=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--continue-from", default=None, metavar="NAME@VERSION|RUN_DIR",
                   help="start from an earlier run's weights and record the lineage (continual fine-tuning)")
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
    p = command(sub, "config", "validate a run config and print it resolved (or list every key)",
                "tunesmith config run.yaml --set method.lora.r=8")
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
    p = command(sub, "models", "base-model utilities", "tunesmith models fetch-reference")
    msub = p.add_subparsers(dest="models_command", required=True)
    f = command(msub, "fetch-reference", "convert the packaged SmolLM2-135M-Instruct GGUF into the local cache",
                "tunesmith models fetch-reference")
    f.set_defaults(func=cmd_models_fetch_reference)


# --------------------------------------------------------------------------------------------- merge
def cmd_merge(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.methods.merge import merge_run

    report = merge_run(args.run, args.out, log=lambda message: print(message, file=sys.stderr))
    if args.json:
        print(json.dumps(report))
    elif report["merged"]:
        print(f"merged {report['method']} into {report['base_model']} -> {report['out']}; logit difference vs "
              f"{report['compared_to']}: max {report['max_abs_logit_diff']:.3g}, mean {report['mean_abs_logit_diff']:.3g}")
    else:
        print(f"{report['method']} cannot merge: {report['reason']}.\nexported the base + adapter pair -> {report['out']}")
    return 0


def add_merge(sub) -> None:
    p = command(sub, "merge", "merge a trained adapter into the base weights (or export base + adapter)",
                "tunesmith merge runs/demo --out merged/demo")
    p.add_argument("run", metavar="RUN_DIR", help="run directory (or a saved adapter folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the merged model or the export")
    p.add_argument("--json", action="store_true", help="print the merge report as JSON")
    p.set_defaults(func=cmd_merge)


# --------------------------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.config import ConfigError
    from tunesmith.serve.config import load_serve_config, parse_adapter_flag
    from tunesmith.serve.router import TenantsError
    from tunesmith.serve.server import serve

    flags = {"model": args.model, "host": args.host, "port": args.port, "tenants": args.tenants,
             "admin_key_file": args.admin_key_file, "cache_budget": args.cache_budget,
             "max_batch_size": args.max_batch_size, "registry_url": args.registry, "threads": args.threads,
             "allow_base_mismatch": args.allow_base_mismatch or None,
             "adapters": dict(parse_adapter_flag(a) for a in args.adapter)}
    if args.config is None and args.model is None:
        raise ConfigError("tunesmith serve: give --model BASE (or --config serve.yaml with a 'model' field)")
    try:
        serve(load_serve_config(args.config, flags))
    except TenantsError as exc:
        raise ConfigError(f"--tenants: {exc}") from None
    return 0


def add_serve(sub) -> None:
    p = command(sub, "serve", "serve a base model and many LoRA adapters over an OpenAI-compatible API",
                "tunesmith serve --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter demo=runs/demo/adapter")
    p.add_argument("--model", help="base model: local folder or hub id (a merged model works too)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="LoRA adapter folder (safetensors), or NAME=registry:ALIAS; repeatable")
    p.add_argument("--host", help="listen address (default 127.0.0.1; other hosts need --tenants)")
    p.add_argument("--port", type=int, help="listen port (default 8000)")
    p.add_argument("--tenants", metavar="FILE", help="tenants.yaml: API keys -> tenants -> their adapters")
    p.add_argument("--admin-key-file", metavar="FILE", help="file with the admin key (enables /admin endpoints)")
    p.add_argument("--cache-budget", metavar="SIZE", help="memory for hot adapters, e.g. 512MB (default)")
    p.add_argument("--max-batch-size", type=int, help="rows per forward pass (default 32)")
    p.add_argument("--registry", metavar="URL", help="registry URL for registry:ALIAS adapters")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="serve adapters recorded for another base model anyway (logged; for experts)")
    p.add_argument("--config", metavar="FILE", help="serve.yaml with the same fields (flags win)")
    p.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------------------------------- eval
def _split_names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name for value in values for name in value.split(",") if name]


def cmd_eval(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.config import parse_override
    from tunesmith.eval.report import EvalRequest, compact, run_eval

    options = {}
    for text in args.option:
        keys, value = parse_override(text)
        options[".".join(keys)] = value
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    request = EvalRequest(
        path=args.path, data=args.data or None, metrics=_split_names(args.metrics), options=options, base=args.base,
        max_examples=args.max_examples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        forgetting=args.forgetting, forgetting_max_prompts=args.forgetting_max_prompts,
        forgetting_max_probes=args.forgetting_max_probes, forgetting_max_text_tokens=args.forgetting_max_text_tokens,
        lm_eval_tasks=_split_names(args.lm_eval), lm_eval_limit=args.lm_eval_limit)
    report = run_eval(request, log=log)
    if args.json:
        print(json.dumps(compact(report), indent=2))
    else:
        print(f"wrote {report.paths['eval_json']} and {report.paths['eval_html']}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from tunesmith.eval.diagnose import diagnose_file, format_diagnosis

    result = diagnose_file(args.path)
    if args.plot:
        from tunesmith.eval.plots import plot_loss_curves

        source = Path(result["source"])
        result["plot"] = str(plot_loss_curves(source, source.parent / "loss_curves.png", diagnosis=result))
    print(json.dumps(result, indent=2) if args.json else format_diagnosis(result))
    return 0


def add_eval(sub) -> None:
    p = command(sub, "eval", "generate on test data and score a trained run (task metrics, forgetting)",
                "tunesmith eval runs/demo --data data/test.jsonl --base")
    p.add_argument("path", help="run directory (runs/<name>) or a saved adapter folder")
    p.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="test file (repeatable); default: the run's data.test and eval.splits")
    p.add_argument("--metrics", action="append", metavar="NAMES",
                   help="metric names, comma-separated (default: the run's eval.metrics)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="metric option, e.g. closed_fields=[clause_type] or schema=schema.json")
    p.add_argument("--base", action="store_true", help="also evaluate the base model (side-by-side table)")
    p.add_argument("--max-examples", type=int, metavar="N", help="evaluate only the first N examples of each split")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="generation budget (default: eval.max_new_tokens)")
    p.add_argument("--batch-size", type=int, metavar="N", help="prompts per generation batch")
    p.add_argument("--forgetting", action="store_true",
                   help="measure drift (KL), general-probe retention and perplexity against the base model")
    p.add_argument("--forgetting-max-prompts", type=int, metavar="N", help="use only the first N general prompts")
    p.add_argument("--forgetting-max-probes", type=int, metavar="N", help="use only the first N probes")
    p.add_argument("--forgetting-max-text-tokens", type=int, default=4096, metavar="N",
                   help="perplexity on at most N tokens of the general text")
    p.add_argument("--lm-eval", action="append", metavar="TASKS",
                   help="lm-evaluation-harness tasks, e.g. mmlu,hellaswag (needs lm-eval and its data)")
    p.add_argument("--lm-eval-limit", type=int, metavar="N", help="examples per lm-eval task")
    p.add_argument("--json", action="store_true", help="print eval.json (without per-example records) as JSON")
    p.set_defaults(func=cmd_eval)

    d = command(sub, "diagnose", "classify a run's loss curves (healthy, overfitting, lr too low/high, spikes)",
                "tunesmith diagnose runs/demo --plot")
    d.add_argument("path", help="run directory or metrics.jsonl")
    d.add_argument("--plot", action="store_true", help="also redraw loss_curves.png with the diagnosis")
    d.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    d.set_defaults(func=cmd_diagnose)


# ---------------------------------------------------------------------------------------------- plan
def cmd_plan(args: argparse.Namespace) -> int:
    from tunesmith.plan.report import PlanRequest, build_plan, parse_memory, render, run_config, write_run_config

    targets = None
    if args.targets:
        targets = args.targets if args.targets in ("all-linear",) else [t.strip() for t in args.targets.split(",") if t.strip()]
    request = PlanRequest(
        model=args.model, gpu_memory_bytes=parse_memory(args.gpu_memory), gpus=args.gpus, device=args.device,
        examples=args.examples, task=args.task, method=args.method, rank=args.rank, targets=targets,
        virtual_tokens=args.virtual_tokens, batch_size=args.batch_size, seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, master_weights=args.master_weights,
        knowledge_changes_often=args.knowledge_changes_often, needs_citations=args.needs_citations,
        prompting_good_enough=args.prompting_good_enough, base_too_weak=args.base_too_weak, train_files=args.data,
        effective_batch=args.effective_batch, variants=args.variants,
    )
    plan = build_plan(request)
    if args.write:
        plan.written = str(write_run_config(args.write, run_config(request, plan), plan))
    if args.json:
        print(plan.to_json())
    else:
        render(plan)
        if args.write:
            print(f"wrote {plan.written} (method {run_config(request, plan).method.name}); train with `tunesmith train {args.write}`")
    return 0


def add_plan(sub) -> None:
    from tunesmith.methods.registry import method_names
    from tunesmith.plan.advice import TASK_KINDS

    p = command(sub, "plan", "parameter counts, memory per method, and advice before any GPU is rented",
                "tunesmith plan --model HuggingFaceTB/SmolLM2-135M-Instruct --examples 2000 --data train.jsonl "
                "--write run.yaml")
    p.add_argument("--model", required=True, help="hub id, catalogue id or local folder with config.json")
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU (80GB = 80 GiB; default 80GB)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs available (sharded with ZeRO-3/FSDP when > 1)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="plan for GPUs (bf16) or CPU (fp32)")
    p.add_argument("--examples", type=int, help="labelled examples you have")
    p.add_argument("--task", choices=TASK_KINDS, default="instruction", help="task kind (sets rank, data advice)")
    p.add_argument("--method", choices=method_names(), help="force a method")
    p.add_argument("--rank", type=int, help="LoRA rank (default by task)")
    p.add_argument("--targets", help="LoRA targets: q_proj,v_proj ... or all-linear (default all-linear)")
    p.add_argument("--virtual-tokens", type=int, help="prefix/prompt tuning virtual tokens (default 20)")
    p.add_argument("--batch-size", type=int, default=4, help="largest micro-batch to start the search from")
    p.add_argument("--effective-batch", type=int, default=16, help="sequences per optimizer step, kept by accumulation")
    p.add_argument("--variants", type=int, help="how many task variants you will train (many: cheap prompt learning)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (shortened only as a last resort)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="force checkpointing (else on when needed)")
    p.add_argument("--optimizer", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"], default="adamw")
    p.add_argument("--master-weights", action="store_true", help="count fp32 master weights for 16-bit full FT")
    p.add_argument("--knowledge-changes-often", action="store_true", help="decision step: knowledge changes often")
    p.add_argument("--needs-citations", action="store_true", help="decision step: answers must cite sources")
    p.add_argument("--prompting-good-enough", action="store_true", help="decision step: prompting meets the bar")
    p.add_argument("--base-too-weak", action="store_true", help="decision step: the base model lacks the ability")
    p.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="training file: lengths and labelled share for the plan, and data.train in the written config")
    p.add_argument("--write", metavar="RUN_YAML", help="write a run config that `tunesmith train` accepts")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description=DESCRIPTION, epilog=TYPICAL_PATH,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (or TUNESMITH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from tunesmith.cli_data import add_data  # the `data` and `runs` groups: cli_data.py, cli_runs.py
    from tunesmith.cli_runs import add_runs

    for add in (add_train, add_config, add_models, add_data, add_runs, add_merge, add_serve, add_eval, add_plan):
        add(sub)
    from tunesmith.ui.cli import add_ui  # `tunesmith ui` (the dashboard): its flags live in ui/cli.py

    add_ui(sub)
    from tunesmith.recipes.continual_cli import add_continual  # `multitask`, `merge-adapters`

    add_continual(sub)
    return parser


def _say_error(message: str, hint: str | None, debug: bool) -> None:
    """The one formatter of user-facing errors: `error: ...`, then `hint: ...` when a fix is known."""
    if debug:
        import traceback

        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _file_not_found(exc: FileNotFoundError) -> str:
    if exc.filename and str(exc).startswith("[Errno"):  # the OS's own wording: name the path first
        return f"{exc.filename}: no such file or directory"
    return str(exc)


def _stdout_closed() -> int:
    """The reader of our output went away (`... | head`): stop quietly, as other command-line tools do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    except (OSError, ValueError):
        pass
    return EXIT_STATUSES["output pipe closed early"]


def main(argv: list[str] | None = None) -> int:
    from tunesmith.errors import USAGE_EXIT_STATUS, TunesmithError

    args = build_parser().parse_args(argv)
    # bitsandbytes on AVX512-BF16 CPUs warns at import that an optional hub kernel (`kernels`) is missing, on every
    # command that touches it; tunesmith does not use that kernel (models/load.keep_4bit_kernels), so hide the line.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    debug = args.debug or os.environ.get("TUNESMITH_DEBUG", "") not in ("", "0")
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here for buffered output
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except TunesmithError as exc:
        _say_error(str(exc), exc.hint, debug)
        return exc.exit_status
    except FileNotFoundError as exc:
        _say_error(_file_not_found(exc), "check the path (relative paths start from the current folder)", debug)
        return USAGE_EXIT_STATUS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_STATUSES["interrupted (Ctrl-C)"]
    except Exception as exc:  # a failure nobody phrased for a person: say so, keep the traceback for --debug
        _say_error(f"{type(exc).__name__}: {exc}", None if debug else
                   "rerun with --debug (or TUNESMITH_DEBUG=1) for the traceback", debug)
        return EXIT_STATUSES["failure"]


if __name__ == "__main__":
    sys.exit(main())
