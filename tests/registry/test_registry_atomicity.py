"""A registration that fails or is killed midway leaves the registry in its old state (never a half record, never
a record pointing at a missing artifact); two writer processes at once corrupt nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tunesmith.registry import artifacts as art
from tunesmith.registry import hooks
from tunesmith.registry.aliases import alias_history, promote, resolve_alias
from tunesmith.registry.maintenance import check, gc
from tunesmith.registry.runs import list_runs, register_run
from tunesmith.registry.store import open_registry

STAGES = ["artifact-staged", "artifact-renamed", "artifacts-stored", "in-transaction"]


def _refs(url) -> list[str]:
    return [r["ref"] for r in list_runs(url, include_archived=True)]


def _old_state(make_run, url) -> dict:
    """A registry holding m@1, promoted to production: what every failed write must leave untouched."""
    first = register_run(make_run("m-v1", seed=1), url=url, name="m")
    promote("m@1", "production", url)
    return first


@pytest.mark.parametrize(("stage", "strays"), [("artifact-renamed", 1), ("in-transaction", 2)])
def test_exception_inside_the_write_leaves_the_old_state(make_run, sqlite_url, monkeypatch, stage, strays):
    first = _old_state(make_run, sqlite_url)

    def fail(at: str) -> None:
        if at == stage:
            raise RuntimeError(f"injected failure at {at}")

    monkeypatch.setattr(hooks, "checkpoint", fail)
    with pytest.raises(RuntimeError, match="injected"):
        register_run(make_run("m-v2", seed=2), url=sqlite_url, name="m")
    monkeypatch.undo()
    assert _refs(sqlite_url) == ["m@1"]
    assert art.hash_folder(resolve_alias("production", sqlite_url))[0] == first["adapter_digest"]
    result = check(sqlite_url, deep=True)
    assert result["ok"] and result["runs"] == 1 and result["artifacts"] == 2
    # stored but never committed: the adapter object (failed before its manifest), or adapter + logs
    assert len(result["stray_objects"]) == strays
    assert len(gc(sqlite_url, grace_seconds=0)["stray_objects_deleted"]) == strays
    assert register_run(make_run("m-v3", seed=3), url=sqlite_url, name="m")["version"] == 2  # no version lost


CHILD_KILL = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tunesmith.registry import hooks
    from tunesmith.registry.runs import register_run
    stage, flag, run_dir, url = sys.argv[1:5]
    def checkpoint(at):
        if at == stage:
            Path(flag).write_text(at)
            time.sleep(120)  # killed here
    hooks.checkpoint = checkpoint
    register_run(run_dir, url=url, name="m")
    print("finished without reaching the stage", flush=True)
""")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child never reached the stage")
        time.sleep(0.02)


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_mid_registration_leaves_a_consistent_store(make_run, sqlite_url, tmp_path, stage):
    first = _old_state(make_run, sqlite_url)
    run_dir = make_run("m-v2", seed=2)
    flag = tmp_path / "reached"
    proc = subprocess.Popen([sys.executable, "-c", CHILD_KILL, stage, str(flag), str(run_dir), sqlite_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    _wait_for(flag, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # old state intact: one run, the alias still serves v1's exact adapter, every record resolves
    assert _refs(sqlite_url) == ["m@1"]
    assert art.hash_folder(resolve_alias("production", sqlite_url))[0] == first["adapter_digest"]
    result = check(sqlite_url, deep=True)
    assert result["ok"] and (result["runs"], result["artifacts"]) == (1, 2), result
    # the same registration, run again, completes cleanly as version 2
    again = register_run(run_dir, url=sqlite_url, name="m")
    assert again["version"] == 2 and again["created"]
    assert art.verify(open_registry(sqlite_url).store, again["adapter_digest"])
    swept = gc(sqlite_url, grace_seconds=0)
    assert swept["deleted"] == [] and swept["stray_objects_deleted"] == []
    assert swept["staging_deleted"] == (1 if stage == "artifact-staged" else 0)
    assert check(sqlite_url, deep=True) == {"runs": 2, "artifacts": 4, "problems": [], "stray_objects": [], "ok": True}


CHILD_WRITER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from tunesmith.registry.aliases import promote
    from tunesmith.registry.runs import register_run
    url, go, *run_dirs = sys.argv[1:]
    while not Path(go).exists():
        time.sleep(0.005)
    versions = []
    for run_dir in run_dirs:
        record = register_run(run_dir, url=url, name="shared")
        promote(record["ref"], "production", url)
        versions.append(record["version"])
    print(json.dumps(versions))
""")


def test_two_concurrent_writer_processes(make_run, sqlite_url, tmp_path):
    per_writer = 4
    dirs = [[str(make_run(f"w{w}-{i}", seed=10 * w + i)) for i in range(per_writer)] for w in range(2)]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_WRITER, sqlite_url, str(go), *d],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in dirs]
    time.sleep(0.5)  # both children importing; then they open the fresh database (and migrate it) at once
    go.write_text("go")
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    versions = [json.loads(out) for out, _ in outputs]
    assert sorted(versions[0] + versions[1]) == list(range(1, 2 * per_writer + 1))
    assert all(v == sorted(v) for v in versions)
    runs = list_runs(sqlite_url)
    assert sorted(r["run_dir"] for r in runs) == sorted(str(Path(d).resolve()) for ds in dirs for d in ds)
    history = alias_history("production", sqlite_url)
    assert [e["revision"] for e in history] == list(range(1, 2 * per_writer + 1))
    assert all(e["previous"] == prev["ref"] for prev, e in zip(history[:-1], history[1:], strict=True))
    result = check(sqlite_url, deep=True)
    assert result["ok"] and result["runs"] == 2 * per_writer and result["artifacts"] == 2 * 2 * per_writer  # adapter + logs per run
