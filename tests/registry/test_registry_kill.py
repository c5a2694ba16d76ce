"""SIGKILL of a real `tunesmith runs register` / `runs promote` / `runs rollback` process at every stage of its
write (TUNESMITH_TEST_PAUSE_AT makes it pause there; see registry/hooks.py), and at random moments of a busy
writer: afterwards `tunesmith runs check` passes and the alias points at the old or the new version, never nowhere."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.registry import artifacts as art
from tunesmith.registry.aliases import alias_history, list_aliases, promote, resolve_alias
from tunesmith.registry.hooks import PAUSE_ENV
from tunesmith.registry.maintenance import check
from tunesmith.registry.runs import list_runs, register_run


def _cli(*argv: str, pause: tuple[str, Path] | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if pause:
        env[PAUSE_ENV] = f"{pause[0]}={pause[1]}"
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "runs", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_at(proc: subprocess.Popen, flag: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before the stage: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the process never reached the stage")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _cli_check(url: str, capsys) -> dict:
    """`tunesmith runs check --deep --json`, in process: exit status 0 and no problems."""
    code = main(["runs", "check", "--deep", "--json", "--registry", url])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ok"] and result["problems"] == [], result
    return result


def _holder(url: str, alias: str = "production") -> str:
    return next(a["ref"] for a in list_aliases(url) if a["alias"] == alias)


@pytest.fixture
def two_versions(make_run, sqlite_url):
    """m@1 (holding production) and m@2 registered; returns their adapter digests."""
    first = register_run(make_run("m-v1", seed=1), url=sqlite_url, name="m")
    second = register_run(make_run("m-v2", seed=2), url=sqlite_url, name="m")
    promote("m@1", "production", sqlite_url)
    return {"m@1": first["adapter_digest"], "m@2": second["adapter_digest"]}


@pytest.mark.parametrize(("stage", "holder"), [("alias-locked", "m@1"), ("alias-moved", "m@1"),
                                               ("alias-committed", "m@2")])
def test_sigkill_during_promote(two_versions, sqlite_url, tmp_path, capsys, stage, holder):
    flag = tmp_path / "reached"
    _kill_at(_cli("promote", "m@2", "--alias", "production", "--registry", sqlite_url, pause=(stage, flag)), flag)
    _cli_check(sqlite_url, capsys)
    assert _holder(sqlite_url) == holder  # the old holder before the commit, the new one after: never nowhere
    assert art.hash_folder(resolve_alias("production", sqlite_url))[0] == two_versions[holder]
    statuses = {r["ref"]: r["status"] for r in list_runs(sqlite_url)}
    assert statuses[holder] == "promoted" and list(statuses.values()).count("promoted") == 1
    # the registry takes the next move normally
    assert promote("m@2" if holder == "m@1" else "m@1", "production", sqlite_url)["changed"]
    revisions = [e["revision"] for e in alias_history("production", sqlite_url)]
    assert revisions == list(range(1, len(revisions) + 1))
    _cli_check(sqlite_url, capsys)


def test_sigkill_during_rollback(two_versions, sqlite_url, tmp_path, capsys):
    promote("m@2", "production", sqlite_url)
    flag = tmp_path / "reached"
    _kill_at(_cli("rollback", "--alias", "production", "--registry", sqlite_url, pause=("alias-moved", flag)), flag)
    _cli_check(sqlite_url, capsys)
    assert _holder(sqlite_url) == "m@2"
    assert [e["action"] for e in alias_history("production", sqlite_url)] == ["promote", "promote"]


@pytest.mark.parametrize(("stage", "runs"), [("in-transaction", 2), ("registered", 3)])  # others: atomicity test
def test_sigkill_during_cli_register(two_versions, make_run, sqlite_url, tmp_path, capsys, stage, runs):
    run_dir = make_run("m-v3", seed=3)
    flag = tmp_path / "reached"
    _kill_at(_cli("register", str(run_dir), "--name", "m", "--registry", sqlite_url, pause=(stage, flag)), flag)
    result = _cli_check(sqlite_url, capsys)
    assert result["runs"] == runs and _holder(sqlite_url) == "m@1"
    again = register_run(run_dir, url=sqlite_url, name="m")  # registering again completes (or finds it done)
    assert again["version"] == 3 and again["created"] == (runs == 2)
    _cli_check(sqlite_url, capsys)


BUSY_WRITER = textwrap.dedent("""
    import itertools, sys
    from pathlib import Path
    from tunesmith.registry.aliases import promote, rollback
    from tunesmith.registry.runs import register_run
    url, flag, *run_dirs = sys.argv[1:]
    Path(flag).write_text("started")
    for i in itertools.count():
        run_dir = run_dirs[i % len(run_dirs)]
        record = register_run(run_dir, url=url, name="m")
        promote(record["ref"], "production", url)
        if i % 3 == 2:
            rollback("production", url)
""")


@pytest.mark.slow  # about 3 s per kill on an idle 2-core machine (a fresh Python process each time)
def test_random_sigkills_of_a_busy_writer(two_versions, make_run, sqlite_url, tmp_path, capsys):
    kills = int(os.environ.get("TUNESMITH_TEST_KILLS", "20"))
    run_dirs = [str(make_run(f"busy-{i}", seed=100 + i)) for i in range(4)]
    rng = random.Random(0)
    holders = []
    for k in range(kills):
        flag = tmp_path / f"started-{k}"
        proc = subprocess.Popen([sys.executable, "-c", BUSY_WRITER, sqlite_url, str(flag), *run_dirs],
                                env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))  # the writer registers and promotes in a loop meanwhile
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.communicate()
        result = check(sqlite_url, deep=True)
        assert result["ok"], (k, result["problems"])
        holder = _holder(sqlite_url)
        assert art.hash_folder(resolve_alias("production", sqlite_url))[0] is not None
        holders.append(holder)
    _cli_check(sqlite_url, capsys)
    runs = len(list_runs(sqlite_url, include_archived=True))
    moves = len(alias_history("production", sqlite_url))
    print(f"\nregistry random kills: {kills} SIGKILLs, {runs} runs and {moves} alias moves committed, "
          f"{len(set(holders))} distinct holders seen, runs check ok after every kill")
