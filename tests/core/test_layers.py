"""The import layers of DESIGN.md, held by walking every module's imports (including imports inside functions).

Order, bottom to top (a module may import its own package and anything strictly below it):
    base (errors, atomic, hashing, config, records, models, the package root)
    data → methods → plan → train → eval → registry → serve | ui → recipes → cli
plus DESIGN's two sentences about serving and the dashboard: serve and ui never reach adapters through train.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tunesmith

SRC = Path(tunesmith.__file__).resolve().parent

BASE = ("errors", "atomic", "hashing", "config", "records", "models", "__init__", "__main__")
RANKS = {name: 0 for name in BASE}
RANKS.update(data=1, methods=2, plan=3, train=4, eval=5, registry=6, serve=7, ui=7, recipes=8, cli=9)
# Same-rank packages that must not import each other (peers), and imports DESIGN forbids beyond the order.
FORBIDDEN = {("serve", "ui"), ("ui", "serve"), ("serve", "train"), ("ui", "train")}

# Upward imports that exist today, each with the work that removes it. Shrink this list; never grow it.
ALLOWED_VIOLATIONS = {
    # By design (issue 12 item 2): the config schema's `method:` section is assembled from the method registry,
    # so a new method needs no edit in config.py. methods.registry and the options modules import no torch.
    ("tunesmith.config", "tunesmith.methods.registry"),
}


def package_of(module: str) -> str:
    """'tunesmith.train.loop' -> 'train'; 'tunesmith.cli' -> 'cli'; 'tunesmith' -> '__init__'."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1].startswith("cli_"):  # cli_data.py, cli_runs.py, ...: pieces of the command line
        return "cli"
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"


def _is_module(name: str) -> bool:
    return (SRC / name).is_dir() or (SRC / f"{name}.py").is_file()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every tunesmith import in a file, skipping `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "tunesmith":  # from tunesmith import registry (a module) or __version__ (a name)
                found.extend((node.lineno, f"tunesmith.{alias.name}" if _is_module(alias.name) else "tunesmith")
                             for alias in node.names)
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "files", "import_module") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))  # resources.files("tunesmith.plan") reads its data
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(line, name) for line, name in found if name == "tunesmith" or name.startswith("tunesmith.")]


def violations(root: Path | None = None) -> list[str]:
    root = root or SRC
    problems = []
    for path in sorted(root.rglob("*.py")):
        if "migrations" in path.parts:  # alembic scripts are run by alembic, not imported by the library
            continue
        source = module_name(path)
        mine = package_of(source)
        assert mine in RANKS, f"{source}: package {mine!r} has no layer; add it to RANKS (and to DESIGN.md)"
        for line, target in imported_modules(path):
            theirs = package_of(target)
            if theirs == mine or (RANKS.get(theirs) == 0 and RANKS[mine] == 0):
                continue
            assert theirs in RANKS, f"{source}:{line} imports {target}: package {theirs!r} has no layer"
            upward = RANKS[theirs] >= RANKS[mine] or (mine, theirs) in FORBIDDEN
            allowed = any(source == a and (target == b or target.startswith(b + ".")) for a, b in ALLOWED_VIOLATIONS)
            if upward and not allowed:
                why = ("forbidden by DESIGN" if (mine, theirs) in FORBIDDEN else
                       "a peer" if RANKS[theirs] == RANKS[mine] else "above it")
                problems.append(f"{path.relative_to(root.parent)}:{line}: {mine} imports {target} ({theirs}: {why})")
    return problems


def test_no_module_imports_a_layer_above_it():
    problems = violations()
    assert not problems, "imports against DESIGN.md's layer order:\n" + "\n".join(problems)


def test_allowed_violations_still_exist():
    """An allow-list entry whose import is gone must be removed, so the list only shrinks."""
    present = set()
    for path in SRC.rglob("*.py"):
        source = module_name(path)
        for _, target in imported_modules(path):
            present.update((a, b) for a, b in ALLOWED_VIOLATIONS
                           if source == a and (target == b or target.startswith(b + ".")))
    assert present == ALLOWED_VIOLATIONS, f"remove fixed entries: {sorted(ALLOWED_VIOLATIONS - present)}"


def test_the_walker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an import inside a function and a relative import are both found and resolved."""
    import sys

    package = tmp_path / "tunesmith" / "train"
    package.mkdir(parents=True)
    (package / "x.py").write_text("def f():\n    from tunesmith.eval import report\n    from ..registry import runs\n"
                                  "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tunesmith.cli\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "tunesmith")
    assert [t for _, t in imported_modules(package / "x.py")] == ["tunesmith.eval", "tunesmith.registry"]


def test_an_upward_import_is_reported(tmp_path, monkeypatch):
    import sys

    root = tmp_path / "tunesmith"
    for package in ("train", "eval", "serve"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "train" / "loop.py").write_text("import tunesmith.eval.metrics\nfrom tunesmith.data import pack\n")
    (root / "serve" / "api.py").write_text("def f():\n    from tunesmith.train import loop\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", root)
    problems = violations(root)
    assert len(problems) == 2
    assert "tunesmith/train/loop.py:1: train imports tunesmith.eval.metrics" in problems[1]
    assert "tunesmith/serve/api.py:2: serve imports tunesmith.train" in problems[0]
