"""`tunesmith runs`: the run registry's commands (thin handlers; the work is in tunesmith.registry)."""

from __future__ import annotations

import argparse
import json

from tunesmith.cli import command


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
    p = command(sub, "runs", "the run registry: list, compare, promote, roll back, export runs",
                "tunesmith runs show contracts@latest")
    rsub = p.add_subparsers(dest="runs_command", required=True)

    def runs_command(name: str, func, help: str, example: str) -> argparse.ArgumentParser:
        q = command(rsub, name, help, f"tunesmith runs {example}", parents=[common])
        q.set_defaults(func=func)
        return q

    q = runs_command("register", cmd_runs_register, "record a run directory as the next version of its name", "register runs/demo")
    q.add_argument("run_dir", metavar="RUN_DIR")
    q.add_argument("--continued-from", default=None, metavar="REF", help="parent run (NAME@VERSION) it continued")
    q.add_argument("--merged-from", action="append", default=[], metavar="REF", help="a run merged into it (repeat)")
    q.add_argument("--name", default=None, help="register under this name (default: the run's own name)")
    q.add_argument("--status", default=None, choices=["running", "finished", "failed"], help="default: finished if summary.json exists, else failed")
    q.add_argument("--artifacts", default=None, metavar="URL", help="artifact store (folder or fsspec URL) for a new registry")
    q = runs_command("list", cmd_runs_list, "list registered runs", "list --name contracts")
    q.add_argument("--name", default=None, help="only versions of this name")
    q.add_argument("--all", action="store_true", help="include archived runs")
    q = runs_command("show", cmd_runs_show, "everything recorded for one run", "show contracts@latest --json")
    q.add_argument("ref", metavar="REF", help="NAME@VERSION, NAME@latest, NAME or an alias")
    q = runs_command("compare", cmd_runs_compare, "config differences and metrics of two runs side by side", "compare contracts@1 contracts@2")
    q.add_argument("a", metavar="REF_A")
    q.add_argument("b", metavar="REF_B")
    q = runs_command("promote", cmd_runs_promote, "point an alias at a run (history kept)", "promote contracts@2 --alias production")
    q.add_argument("ref", metavar="NAME@VERSION")
    q.add_argument("--alias", required=True, help="e.g. production")
    q = runs_command("rollback", cmd_runs_rollback, "give an alias back to its previous holder", "rollback --alias production")
    q.add_argument("--alias", required=True)
    q = runs_command("aliases", cmd_runs_aliases, "list aliases, or one alias's history", "aliases production")
    q.add_argument("alias", nargs="?", default=None)
    q = runs_command("lineage", cmd_runs_lineage, "ancestors and descendants of a run", "lineage contracts@2")
    q.add_argument("ref", metavar="REF")
    q = runs_command("archive", cmd_runs_archive, "hide a run from list and from promotion (artifacts kept)", "archive contracts@1")
    q.add_argument("ref", metavar="REF")
    q.add_argument("--restore", action="store_true", help="un-archive")
    q = runs_command("gc", cmd_runs_gc, "delete artifacts no run refers to", "gc --dry-run")
    q.add_argument("--dry-run", action="store_true", help="report what would be deleted")
    q.add_argument("--grace-seconds", type=float, default=3600.0, help="keep anything touched more recently (in-flight registrations)")
    q = runs_command("check", cmd_runs_check, "verify every record points at complete artifacts (exit 1 if not)", "check --deep")
    q.add_argument("--deep", action="store_true", help="also re-hash every artifact's files")
    q = runs_command("export", cmd_runs_export, "write a self-contained folder (PEFT adapter + model card)", "export contracts@2 --out export/contracts")
    q.add_argument("ref", metavar="NAME@VERSION")
    q.add_argument("--out", required=True, metavar="DIR")
