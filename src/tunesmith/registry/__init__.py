"""Run registry: every fine-tune versioned like a release (SQLAlchemy store, content-addressed artifacts, aliases).

It may import eval, train, methods, data, models, config, records and the bottom helpers (it reads run
directories), never serve, ui or recipes.

Public API (imported lazily, so `import tunesmith.registry` costs nothing until a function is used):
    register_run(run_dir, url=None, continued_from=None, merged_from=(), status=None) -> dict  (name, version, ...)
    resolve_alias(alias, url=None) -> Path        adapter folder in PEFT layout
    alias_etag(alias, url=None) -> str | None     changes whenever the alias moves; cheap to poll
    alias_info(alias, url=None) -> dict           {alias, ref, etag, adapter_digest, base_model, path}
    resolve_ref(ref, url=None) -> Path            any ref: NAME@VERSION, NAME@latest, alias, NAME
    promote(ref, alias, url=None), rollback(alias, url=None), alias_history(alias, url=None), list_aliases(url)
    list_runs(url=None, name=None, include_archived=False), show_run(ref, url=None), lineage(ref, url=None)
    compare_runs(a, b, url=None), export_run(ref, out, url=None), gc(url=None, ...), check(url=None, deep=False)
    open_registry(url=None, artifacts=None), RegistryError
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "register_run": "runs", "list_runs": "runs", "show_run": "runs", "lineage": "runs", "set_archived": "runs",
    "resolve_alias": "aliases", "resolve_ref": "aliases", "alias_etag": "aliases", "alias_info": "aliases",
    "promote": "aliases", "rollback": "aliases", "alias_history": "aliases", "list_aliases": "aliases",
    "compare_runs": "compare", "export_run": "export", "gc": "maintenance", "check": "maintenance",
    "open_registry": "store", "RegistryError": "errors", "ArtifactError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tunesmith.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tunesmith.registry.{module}"), name)
