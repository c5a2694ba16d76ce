"""The same registry behaviour on SQLite and on PostgreSQL (a throwaway server started by the fixture, or
$TUNESMITH_TEST_POSTGRES_URL; skipped when neither is available). PostgreSQL runs store artifacts through
fsspec's memory:// filesystem, so the non-local artifact path is exercised too."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from tunesmith.registry import artifacts as art
from tunesmith.registry import hooks
from tunesmith.registry.aliases import alias_etag, promote, resolve_alias, rollback
from tunesmith.registry.maintenance import check, gc
from tunesmith.registry.runs import lineage, list_runs, register_run
from tunesmith.registry.store import open_registry


def test_core_behaviour_on_each_backend(backend_url, make_run, monkeypatch):
    url, artifacts = backend_url
    v1 = register_run(make_run("v1", seed=1), url=url, name="m", artifacts=artifacts)
    v2 = register_run(make_run("v2", seed=2), url=url, name="m", continued_from="m@1")
    dup = register_run(make_run("dup", seed=1), url=url)  # v1's adapter again: stored once
    registry = open_registry(url)
    assert registry.engine.dialect.name == ("sqlite" if artifacts is None else "postgresql")
    assert (v1["version"], v2["version"], dup["adapter_digest"]) == (1, 2, v1["adapter_digest"])
    assert len(art.stored_objects(registry.store)) == 4  # 2 adapters + 2 logs (dup shares v1's)
    assert lineage("m@1", url)["descendants"] == [{"ref": "m@2", "relation": "continued_from", "depth": 1}]
    promote("m@1", "production", url)
    promote("m@2", "production", url)
    tag = alias_etag("production", url)
    assert rollback("production", url)["ref"] == "m@1" and alias_etag("production", url) != tag
    assert art.hash_folder(resolve_alias("production", url))[0] == v1["adapter_digest"]

    monkeypatch.setattr(hooks, "checkpoint", lambda at: (_ for _ in ()).throw(RuntimeError(at)) if at == "in-transaction" else None)
    with pytest.raises(RuntimeError):
        register_run(make_run("v3", seed=3), url=url, name="m")
    monkeypatch.undo()
    assert [r["ref"] for r in list_runs(url)] == ["dup@1", "m@1", "m@2"]
    result = check(url, deep=True)
    assert result["ok"] and result["runs"] == 3 and len(result["stray_objects"]) == 2
    assert len(gc(url, grace_seconds=0)["stray_objects_deleted"]) == 2
    assert register_run(make_run("v4", seed=4), url=url, name="m")["version"] == 3


CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from tunesmith.registry.runs import register_run
    url, artifacts, go, *run_dirs = sys.argv[1:]
    while not Path(go).exists():
        time.sleep(0.005)
    print(json.dumps([register_run(d, url=url, name="shared", artifacts=artifacts)["version"] for d in run_dirs]))
""")


def test_concurrent_writers_on_postgresql(postgres_url, make_run, tmp_path):
    url, artifacts = postgres_url, str(tmp_path / "artifacts")
    dirs = [[str(make_run(f"w{w}-{i}", seed=10 * w + i)) for i in range(3)] for w in range(2)]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, url, artifacts, str(go), *d],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in dirs]
    time.sleep(0.5)
    go.write_text("go")
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    versions = sorted(v for out, _ in outputs for v in json.loads(out))
    assert versions == [1, 2, 3, 4, 5, 6]
    result = check(url, deep=True)
    assert result["ok"] and result["runs"] == 6 and result["artifacts"] == 12
