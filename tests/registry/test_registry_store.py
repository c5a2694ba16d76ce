"""Registry core: versions, content addressing, lineage, aliases (promote/rollback/history), gc, migrations."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from tunesmith.registry import artifacts as art
from tunesmith.registry.aliases import (
    alias_etag,
    alias_history,
    list_aliases,
    promote,
    resolve_alias,
    resolve_ref,
    rollback,
)
from tunesmith.registry.errors import RegistryError
from tunesmith.registry.maintenance import check, gc
from tunesmith.registry.runs import lineage, list_runs, register_run, set_archived, show_run
from tunesmith.registry.store import open_registry, read


def _object_count(url) -> int:
    return len(art.stored_objects(open_registry(url).store))


def test_versions_increment_per_name_and_record_everything(make_run, sqlite_url, base_model_dir):
    alpha = make_run("alpha", seed=1)
    first = register_run(alpha, url=sqlite_url)
    second = register_run(make_run("alpha-2", seed=2), url=sqlite_url, name="alpha")
    other = register_run(make_run("beta", seed=3), url=sqlite_url)
    assert (first["ref"], second["ref"], other["ref"]) == ("alpha@1", "alpha@2", "beta@1")
    shown = show_run("alpha@1", sqlite_url)
    assert shown["status"] == "finished" and shown["method"] == "lora"
    assert shown["data_hash"] == "sha256:" + "d" * 64 and shown["data_location"] == ["train.jsonl"]
    assert shown["config"]["train"]["learning_rate"] == 2e-4 and shown["summary"]["best_eval_loss"] == 1.5
    assert shown["base_model_path"] == str(base_model_dir.resolve())
    # the weights hash is the tree digest over the base folder's safetensors files only
    expected = art.tree_digest([("model.safetensors", art.file_sha256(base_model_dir / "model.safetensors"))])
    assert shown["base_model_hash"] == expected
    assert shown["code_version"].startswith("tunesmith ")
    assert shown["adapter_digest"] == art.hash_folder(alpha / "adapter")[0]
    assert [r["ref"] for r in list_runs(sqlite_url)] == ["alpha@1", "alpha@2", "beta@1"]
    assert show_run("alpha", sqlite_url)["ref"] == "alpha@2" and show_run("alpha@latest", sqlite_url)["version"] == 2


def test_same_adapter_is_stored_once(make_run, sqlite_url):
    a = register_run(make_run("a", seed=7, lr=1e-4), url=sqlite_url)
    objects_after_first = _object_count(sqlite_url)  # adapter + logs
    b = register_run(make_run("b", seed=7, lr=3e-4), url=sqlite_url)  # same adapter bytes, other config
    assert a["adapter_digest"] == b["adapter_digest"]
    assert a["logs_digest"] == b["logs_digest"]  # identical metrics.jsonl too
    assert _object_count(sqlite_url) == objects_after_first == 2
    c = register_run(make_run("c", seed=8), url=sqlite_url)
    assert c["adapter_digest"] != a["adapter_digest"] and _object_count(sqlite_url) == 4  # + adapter + logs
    stored = art.materialize(open_registry(sqlite_url).store, a["adapter_digest"])
    assert sorted(p.name for p in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_reregistering_a_run_updates_it_in_place(make_run, sqlite_url):
    run = make_run("a", seed=1)
    first = register_run(run, url=sqlite_url)
    (run / "eval.json").write_text(json.dumps({"test": {"exact_match": 0.75}}))
    again = register_run(run, url=sqlite_url)
    assert (again["created"], again["version"], again["id"]) == (False, 1, first["id"])
    assert show_run("a@1", sqlite_url)["eval"] == {"test": {"exact_match": 0.75}}
    assert len(list_runs(sqlite_url)) == 1


def test_base_model_hash_is_cached_by_path_size_mtime(make_run, sqlite_url, monkeypatch, base_model_dir):
    calls = []
    real = art.file_sha256
    monkeypatch.setattr(art, "file_sha256", lambda p: calls.append(str(p)) or real(p))
    register_run(make_run("a", seed=1), url=sqlite_url)
    register_run(make_run("b", seed=2), url=sqlite_url)
    weights = str((base_model_dir / "model.safetensors").resolve())
    assert calls.count(weights) == 1  # the second registration reused the cached hash
    import os

    os.utime(base_model_dir / "model.safetensors", ns=(1, 1))  # touched: the key changes, the hash is recomputed
    register_run(make_run("c", seed=3), url=sqlite_url)
    assert calls.count(weights) == 2


def test_lineage_queries(make_run, sqlite_url):
    register_run(make_run("base-task", seed=1), url=sqlite_url)
    register_run(make_run("cont", seed=2), url=sqlite_url, continued_from="base-task@1")
    register_run(make_run("other", seed=3), url=sqlite_url)
    register_run(make_run("merged", seed=4), url=sqlite_url, merged_from=["cont@1", "other@1"])
    tree = lineage("merged@1", sqlite_url)
    assert [(a["ref"], a["relation"], a["depth"]) for a in tree["ancestors"]] == [
        ("cont@1", "merged_from", 1), ("other@1", "merged_from", 1), ("base-task@1", "continued_from", 2)]
    down = lineage("base-task@1", sqlite_url)["descendants"]
    assert [(d["ref"], d["depth"]) for d in down] == [("cont@1", 1), ("merged@1", 2)]
    assert show_run("cont@1", sqlite_url)["parents"] == [{"ref": "base-task@1", "relation": "continued_from"}]
    with pytest.raises(RegistryError, match="no run 'missing@1'"):
        register_run(make_run("orphan", seed=5), url=sqlite_url, continued_from="missing@1")
    assert "orphan" not in {r["name"] for r in list_runs(sqlite_url)}  # the failed write left nothing


def test_promote_then_rollback_restores_the_exact_previous_adapter(make_run, sqlite_url):
    v1 = register_run(make_run("m1", seed=1), url=sqlite_url, name="m")
    v2 = register_run(make_run("m2", seed=2), url=sqlite_url, name="m")
    promote("m@1", "production", sqlite_url)
    path_v1 = resolve_alias("production", sqlite_url)
    tag_v1 = alias_etag("production", sqlite_url)
    promote("m@2", "production", sqlite_url)
    assert art.hash_folder(resolve_alias("production", sqlite_url))[0] == v2["adapter_digest"]
    assert alias_etag("production", sqlite_url) != tag_v1
    assert show_run("m@1", sqlite_url)["status"] == "finished" and show_run("m@2", sqlite_url)["status"] == "promoted"
    back = rollback("production", sqlite_url)
    assert (back["ref"], back["previous"]) == ("m@1", "m@2")
    restored = resolve_alias("production", sqlite_url)
    assert restored == path_v1 and art.hash_folder(restored)[0] == v1["adapter_digest"]
    assert alias_etag("production", sqlite_url) not in (tag_v1, None)  # a new revision, even for an old holder
    history = alias_history("production", sqlite_url)
    assert [(e["revision"], e["action"], e["ref"], e["previous"]) for e in history] == [
        (1, "promote", "m@1", None), (2, "promote", "m@2", "m@1"), (3, "rollback", "m@1", "m@2")]
    with pytest.raises(RegistryError, match="no previous holder"):
        rollback("production", sqlite_url)
    assert alias_etag("nope", sqlite_url) is None
    assert resolve_ref("m@2", sqlite_url).is_dir()


def test_rollback_is_a_stack_and_aliases_are_independent(make_run, sqlite_url):
    for i in (1, 2, 3):
        register_run(make_run(f"r{i}", seed=i), url=sqlite_url, name="r")
    for v in (1, 2, 3):
        promote(f"r@{v}", "production", sqlite_url)
    promote("r@3", "staging", sqlite_url)
    assert promote("r@3", "production", sqlite_url)["changed"] is False
    assert rollback("production", sqlite_url)["ref"] == "r@2"
    assert rollback("production", sqlite_url)["ref"] == "r@1"
    assert {a["alias"]: a["ref"] for a in list_aliases(sqlite_url)} == {"production": "r@1", "staging": "r@3"}
    assert show_run("r@3", sqlite_url)["status"] == "promoted"  # still holds staging


def test_archive_rules(make_run, sqlite_url):
    register_run(make_run("x1", seed=1), url=sqlite_url, name="x")
    register_run(make_run("x2", seed=2), url=sqlite_url, name="x")
    promote("x@1", "production", sqlite_url)
    with pytest.raises(RegistryError, match="serves alias production"):
        set_archived("x@1", sqlite_url)
    assert set_archived("x@2", sqlite_url)["status"] == "archived"
    assert [r["ref"] for r in list_runs(sqlite_url)] == ["x@1"]
    assert len(list_runs(sqlite_url, include_archived=True)) == 2
    with pytest.raises(RegistryError, match="archived"):
        promote("x@2", "production", sqlite_url)
    assert set_archived("x@2", sqlite_url, restore=True)["status"] == "finished"


def test_failed_run_without_adapter_is_recorded_but_cannot_serve(make_run, sqlite_url):
    run = make_run("broken", with_adapter=False)
    (run / "summary.json").unlink()
    r = register_run(run, url=sqlite_url)
    assert (r["status"], r["adapter_digest"]) == ("failed", None)
    with pytest.raises(RegistryError, match="no adapter"):
        promote("broken@1", "production", sqlite_url)


def test_gc_removes_only_unreferenced_artifacts(make_run, sqlite_url):
    run = make_run("a", seed=1)
    first = register_run(run, url=sqlite_url)
    with open(run / "metrics.jsonl", "a") as handle:  # more steps logged: the logs artifact changes
        handle.write(json.dumps({"step": 4, "train_loss": 1.5}) + "\n")
    second = register_run(run, url=sqlite_url)
    assert second["logs_digest"] != first["logs_digest"] and not second["created"]
    assert gc(sqlite_url)["deleted"] == []  # within the grace period nothing goes
    dry = gc(sqlite_url, grace_seconds=0, dry_run=True)
    assert dry["deleted"] == [first["logs_digest"]] and _object_count(sqlite_url) == 3
    result = gc(sqlite_url, grace_seconds=0)
    assert result["deleted"] == [first["logs_digest"]] and result["kept"] == 2 and result["freed_bytes"] > 0
    assert _object_count(sqlite_url) == 2
    assert check(sqlite_url, deep=True) == {"runs": 1, "artifacts": 2, "problems": [], "stray_objects": [], "ok": True}


def test_check_reports_a_missing_artifact(make_run, sqlite_url):
    r = register_run(make_run("a", seed=1), url=sqlite_url)
    art.delete(open_registry(sqlite_url).store, r["adapter_digest"])  # damage the store behind the registry's back
    result = check(sqlite_url)
    assert not result["ok"] and len(result["problems"]) == 1 and r["adapter_digest"] in result["problems"][0]


def test_fsspec_memory_store(make_run, sqlite_url, tmp_path):
    url = str(tmp_path / "mem-reg")
    r = register_run(make_run("a", seed=1), url=url, artifacts="memory://registry-test-store")
    registry = open_registry(url)
    assert registry.store.url == "memory://registry-test-store" and not registry.store.local
    assert art.has(registry.store, r["adapter_digest"])
    promote("a@1", "production", url)
    local = resolve_alias("production", url)
    assert str(local).startswith(str(tmp_path / "cache")) and art.hash_folder(local)[0] == r["adapter_digest"]
    with pytest.raises(RegistryError, match="keeps its artifacts at memory://registry-test-store"):
        open_registry(url, artifacts=str(tmp_path / "elsewhere"))


def test_migrations_create_exactly_the_orm_schema(sqlite_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tunesmith.registry.schema import Base

    registry = open_registry(sqlite_url)
    with registry.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() == "0001"
        assert compare_metadata(context, Base.metadata) == []
    assert read(registry, lambda s: s.scalar(select(1))) == 1


def test_a_file_changing_mid_copy_is_never_stored_under_the_wrong_digest(make_run, sqlite_url, monkeypatch):
    import shutil

    from tunesmith.registry.errors import ArtifactError

    real_copy = shutil.copyfile

    def copy_then_change(src, dst, *args, **kwargs):
        real_copy(src, dst)
        with open(dst, "ab") as handle:
            handle.write(b"x")  # the copy differs from what was hashed

    monkeypatch.setattr(art.shutil, "copyfile", copy_then_change)
    with pytest.raises(ArtifactError, match="changed while being stored"):
        register_run(make_run("a", seed=1), url=sqlite_url)
    monkeypatch.undo()
    assert _object_count(sqlite_url) == 0 and list_runs(sqlite_url) == []


def test_registry_location_resolution(tmp_path, monkeypatch):
    from tunesmith.registry.store import resolve_url

    folder = tmp_path / "team"
    folder.mkdir()
    assert resolve_url(folder) == f"sqlite:///{folder / 'registry.db'}"
    assert resolve_url(tmp_path / "x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    assert resolve_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "env.db"))
    assert resolve_url(None) == f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.delenv("TUNESMITH_REGISTRY")
    monkeypatch.chdir(tmp_path)
    assert resolve_url(None) == f"sqlite:///{tmp_path / 'runs' / 'registry.db'}"
    registry = open_registry(None)
    assert registry.store.root == str(tmp_path / "runs" / "registry-artifacts")
