"""Every dashboard endpoint, on a registry of fake runs and on one real tiny training run."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.ui.conftest import HOSTILE_NAME, HOSTILE_VALUE, build_fake_registry
from tunesmith.ui.app import STATIC, create_app
from tunesmith.ui.server import UIConfigError, build_app
from tunesmith.ui.sources import Catalog

KEY = "correct-horse-battery"


@pytest.fixture(scope="module")
def client(fake_registry) -> TestClient:
    return TestClient(create_app(Catalog(fake_registry["url"], fake_registry["runs"])))


@pytest.fixture
def admin_setup(tmp_path):
    """A fresh registry (actions mutate it) and a client holding the admin key."""
    fake = build_fake_registry(tmp_path)
    app = create_app(Catalog(fake["url"], fake["runs"]), admin_key=KEY)
    return fake, TestClient(app)


def cli_json(capsys, *argv) -> object:
    from tunesmith.cli import main

    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------------- runs
def test_runs_table_lists_registered_and_live_runs(client, fake_registry):
    body = client.get("/api/runs").json()
    by_id = {r["id"]: r for r in body["runs"]}
    assert set(by_id) == {"alpha@1", "beta@1", f"{HOSTILE_NAME}@1", "dir:live"}
    alpha = by_id["alpha@1"]
    assert (alpha["name"], alpha["version"], alpha["method"], alpha["base_model"]) == ("alpha", 1, "lora", "fake/base-model")
    assert alpha["status"] == "finished" and alpha["data_hash"] == "sha256:" + "cd" * 32 and alpha["aliases"] == []
    assert alpha["headline"]["test.exact_match"] == 1.0 and alpha["headline"]["step"] == 12
    assert by_id["beta@1"]["headline"]["test.exact_match"] == pytest.approx(2 / 3)
    live = by_id["dir:live"]
    assert live["live"] and live["status"] == "running" and not live["registered"] and body["live"]
    assert live["headline"]["step"] == 4
    assert "test.exact_match" in body["metric_columns"]


def test_live_run_grows_and_a_half_written_line_waits(client, fake_registry):
    metrics = fake_registry["live"] / "metrics.jsonl"
    before = client.get("/api/curves", params={"id": "dir:live"}).json()
    with metrics.open("a") as handle:
        handle.write(json.dumps({"step": 5, "train_loss": 1.5, "lr": 1e-4, "epoch": 0.8, "tokens": 640}) + "\n")
        handle.write('{"step": 6, "train_lo')  # the trainer is mid-write
        handle.flush()
        os.utime(metrics, ns=(1, os.stat(metrics).st_mtime_ns + 1000))
    after = client.get("/api/curves", params={"id": "dir:live"}).json()
    assert after["records"] == before["records"] + 1
    assert after["series"]["train_loss"]["x"][-1] == 5.0 and after["series"]["train_loss"]["y"][-1] == 1.5
    row = next(r for r in client.get("/api/runs").json()["runs"] if r["id"] == "dir:live")
    assert row["headline"]["step"] == 5 and row["headline"]["train_loss"] == 1.5


def test_run_detail(client):
    body = client.get("/api/run", params={"id": "beta@1"}).json()
    assert body["config"]["train"]["learning_rate"] == 3e-4
    assert body["diagnosis"]["diagnosis"] == "healthy"
    assert "examples" not in body["eval"]["models"]["tuned"]["test"]  # compact: no per-example records
    live = client.get("/api/run", params={"id": "dir:live"}).json()
    assert live["diagnosis"]["computed_by"].startswith("ui")  # a live run is diagnosed from its metrics.jsonl


# ----------------------------------------------------------------------------------------------- curves
def test_curves_are_the_numbers_loss_curves_png_plots(real_run):
    """The chart's series are eval.plots.series over metrics.jsonl: the function that draws loss_curves.png."""
    from tunesmith.eval.plots import series
    from tunesmith.records.metrics import read_metrics

    client = TestClient(create_app(Catalog(real_run["url"], real_run["runs"])))
    body = client.get("/api/curves", params={"id": "real@1"}).json()
    records = read_metrics(real_run["run_dir"] / "metrics.jsonl")
    for key in ("train_loss", "eval_loss", "lr"):
        xs, ys = series(records, key)
        assert body["series"][key] == {"x": xs, "y": ys}
    assert len(body["series"]["eval_loss"]["x"]) == 3  # eval every 2 of 6 steps
    by_tokens = client.get("/api/curves", params={"id": "real@1", "x": "tokens"}).json()["series"]["train_loss"]
    assert by_tokens["x"] == [float(r["tokens"]) for r in records if "train_loss" in r]
    by_epoch = client.get("/api/curves", params={"id": "real@1", "x": "epoch"}).json()["series"]["train_loss"]
    assert by_epoch["x"] == [float(r["epoch"]) for r in records if "train_loss" in r]
    assert client.get("/api/curves", params={"id": "real@1", "x": "wallclock"}).status_code == 400


def test_real_run_everywhere(real_run, tmp_path):
    """The real run appears in the table with its eval metrics, its data report counts add up, and its examples
    compare against a sibling that answered one item differently."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(real_run["runs"], runs, ignore=shutil.ignore_patterns("registry*", "checkpoints"))
    sibling = runs / "sibling"
    shutil.copytree(runs / "real", sibling)
    evaluated = json.loads((sibling / "eval.json").read_text())
    examples = evaluated["models"]["tuned"]["test"]["examples"]
    examples[1]["prediction"] = "code-1 (sibling)"
    (sibling / "eval.json").write_text(json.dumps(evaluated))
    client = TestClient(create_app(Catalog(real_run["url"], runs)))
    rows = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert rows["real@1"]["status"] == "finished" and "test.exact_match" in rows["real@1"]["headline"]
    assert rows["dir:sibling"]["status"] == "finished"

    data = client.get("/api/data", params={"id": "real@1"}).json()
    counts = {c["count"]: c["records"] for c in data["counts"]}
    assert data["prepared"] and data["identity"]["holds"]
    assert counts["input"] == 31 == sum(v for k, v in counts.items() if k != "input")
    assert data["pii"] == {"EMAIL": 1}

    diff = client.get("/api/examples", params={"a": "real@1", "b": "dir:sibling"}).json()
    assert diff["common"] == 4 and diff["differing_count"] == 1
    assert diff["differing"][0]["b"]["prediction"] == "code-1 (sibling)"
    assert diff["differing"][0]["reference"] == "code-1"


# ---------------------------------------------------------------------------------------------- compare
def test_compare(client):
    body = client.get("/api/compare", params=[("id", "alpha@1"), ("id", "beta@1"), ("id", "dir:live")]).json()
    assert [r["id"] for r in body["runs"]] == ["alpha@1", "beta@1", "dir:live"]
    assert all(len(r["series"]["train_loss"]["x"]) >= 4 for r in body["runs"])
    differences = {d["key"]: d["values"] for d in body["config"]["differences"]}
    assert differences["train.learning_rate"] == [1e-4, 3e-4, 5e-4]
    assert "output.name" not in differences and "method.lora.r" not in differences
    rows = {r["model"]: r for r in body["metrics"]["rows"]}
    assert rows["base (fake/base-model)"]["metrics"]["test.exact_match"] == pytest.approx(1 / 3)
    assert rows["alpha@1"]["metrics"]["test.exact_match"] == 1.0
    forgetting = {r["model"]: r["measures"] for r in body["forgetting"]}
    assert forgetting["alpha@1"]["probe_retention"] == 0.9375 and forgetting["beta@1"]["kl_drift"] == 0.0123
    assert [d["diagnosis"] for d in body["diagnoses"]][:2] == ["healthy", "healthy"]
    by_epoch = client.get("/api/compare", params=[("id", "alpha@1"), ("id", "beta@1"), ("x", "epoch")]).json()
    assert by_epoch["runs"][0]["series"]["train_loss"]["x"][:2] == [round(1 / 6, 4), round(2 / 6, 4)]
    assert client.get("/api/compare", params=[("id", "alpha@1")]).status_code == 400
    assert client.get("/api/compare", params=[("id", "alpha@1"), ("id", "alpha@1")]).status_code == 400


# --------------------------------------------------------------------------------------------- examples
def test_examples_where_two_runs_differ(client):
    body = client.get("/api/examples", params={"a": "alpha@1", "b": "beta@1"}).json()
    assert (body["split"], body["common"], body["differing_count"]) == ("test", 3, 1)
    item = body["differing"][0]
    assert item["prompt"] == [{"role": "user", "content": "Parse 7."}] and item["reference"] == "7"
    assert (item["a"]["prediction"], item["b"]["prediction"]) == ("7", "8")
    assert (item["a"]["scores"]["exact_match"], item["b"]["scores"]["exact_match"]) == (1.0, 0.0)
    missing = client.get("/api/examples", params={"a": "alpha@1", "b": f"{HOSTILE_NAME}@1"})
    assert missing.status_code == 404 and "per-example" in missing.json()["error"]


def test_examples_refuse_different_test_sets(tmp_path):
    from tests.ui.conftest import write_run

    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs, "one", 1e-4, ["12", "7", "30"])
    other = write_run(runs, "two", 1e-4, ["12", "7", "30"])
    evaluated = json.loads((other / "eval.json").read_text())
    for example in evaluated["models"]["tuned"]["test"]["examples"]:
        example["reference"] += "!"
    (other / "eval.json").write_text(json.dumps(evaluated))
    client = TestClient(create_app(Catalog(str(tmp_path / "registry.db"), runs)))
    response = client.get("/api/examples", params={"a": "dir:one", "b": "dir:two"})
    assert response.status_code == 409 and "not the same test set" in response.json()["error"]


# ------------------------------------------------------------------------------------------------- data
def test_data_report(client):
    body = client.get("/api/data", params={"id": "alpha@1"}).json()
    assert body["prepared"] and body["identity"]["holds"]
    assert {c["count"]: c["records"] for c in body["counts"]}["quarantined"] == 2
    assert body["quarantine_reasons"] == {"empty_field": 2} and body["pii"] == {"EMAIL": 3}
    assert body["clusters"]["sizes"] == [30, 10] and body["lengths"]["before_trim"]["p90"] == 7
    tasks = {t["task"]: t for t in body["mixture"]["tasks"]}
    assert tasks["general"]["realised_share"] == 0.25 and tasks["contracts"]["drawn"] == 30
    assert sum(t["drawn"] for t in tasks.values()) == body["mixture"]["total"]
    plain = client.get("/api/data", params={"id": "beta@1"}).json()
    assert not plain["prepared"] and plain["records"] == {"train_records": 40}


# ----------------------------------------------------------------------------------------------- admin
def test_registry_actions_land_in_the_alias_history_like_the_cli(admin_setup, capsys):
    fake, client = admin_setup
    url = fake["url"]
    assert client.post("/api/admin/promote", json={"ref": "alpha@1", "alias": "production"}).status_code == 401
    bad = client.post("/api/admin/promote", json={"ref": "alpha@1", "alias": "production"},
                      headers={"Authorization": "Bearer wrong-key-123"})
    assert bad.status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    table = lambda: {r["id"]: r for r in client.get("/api/runs").json()["runs"]}  # noqa: E731
    assert table()["alpha@1"]["aliases"] == []  # read (and cached) before the promote
    assert client.post("/api/admin/promote", json={"ref": "alpha@1", "alias": "production"}, headers=auth).json()["ref"] == "alpha@1"
    assert (table()["alpha@1"]["aliases"], table()["alpha@1"]["status"]) == (["production"], "promoted")
    assert client.post("/api/admin/promote", json={"ref": "beta@1", "alias": "production"}, headers=auth).status_code == 200
    # the same step through the CLI, then a UI rollback: one history, in order
    cli_json(capsys, "runs", "promote", "alpha@1", "--alias", "staging", "--registry", url, "--json")
    assert client.post("/api/admin/rollback", json={"alias": "production"}, headers=auth).json()["ref"] == "alpha@1"
    history = cli_json(capsys, "runs", "aliases", "production", "--registry", url, "--json")
    assert [(e["action"], e["ref"], e["previous"]) for e in history] == [
        ("promote", "alpha@1", None), ("promote", "beta@1", "alpha@1"), ("rollback", "alpha@1", "beta@1")]
    assert client.get("/api/aliases").json()["aliases"][0]["history"] == history
    refused = client.post("/api/admin/archive", json={"ref": "alpha@1"}, headers=auth)
    assert refused.status_code == 409 and "serves alias" in refused.json()["error"]
    assert client.post("/api/admin/archive", json={"ref": "beta@1"}, headers=auth).json()["status"] == "archived"
    assert table()["beta@1"]["status"] == "archived"
    listed = cli_json(capsys, "runs", "list", "--registry", url, "--json")
    assert "beta@1" not in [r["ref"] for r in listed]


def test_registry_actions_are_off_without_a_key(client, fake_registry, capsys):
    response = client.post("/api/admin/promote", json={"ref": "alpha@1", "alias": "production"},
                           headers={"Authorization": "Bearer anything-at-all"})
    assert response.status_code == 403 and "--admin-key-file" in response.json()["error"]
    assert cli_json(capsys, "runs", "aliases", "--registry", fake_registry["url"], "--json") == []


# --------------------------------------------------------------------------------------------- hostile
def test_markup_in_names_and_values_stays_data(client):
    response = client.get("/api/runs")
    assert response.headers["content-type"].startswith("application/json")
    row = next(r for r in response.json()["runs"] if r["name"] == HOSTILE_NAME)
    assert row["headline"]["test.exact_match"] == HOSTILE_VALUE
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and page.headers["x-content-type-options"] == "nosniff"
    script = (STATIC / "app.js").read_text()
    # the page inserts server data only as text: no HTML-parsing sink anywhere in the script
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", script)
    assert "http://" not in (STATIC / "index.html").read_text() and "https://" not in (STATIC / "index.html").read_text()


@pytest.mark.parametrize("path", [
    "/static/../app.py", "/static/..%2Fapp.py", "/static/%2e%2e%2fapp.py", "/static/%2E%2E/sources.py",
    "/static/..%5capp.py", "/static/....//app.py", "/static/%252e%252e%252fapp.py",
    "/api/run?id=dir:..", "/api/run?id=dir:../alpha", "/api/run?id=dir:..%2F..%2Fetc", "/api/run?id=dir:%2e%2e",
    "/api/run?id=dir:/etc", "/api/run?id=dir:alpha/../../x", "/api/run?id=dir:.", "/api/run?id=dir:escape",
    "/api/data?id=dir:..%2Fui-fake0", "/api/curves?id=dir:%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/api/run?id=../../etc/passwd@1", "/api/examples?a=dir:..&b=dir:../..",
])
def test_requests_cannot_leave_the_runs_folder(client, fake_registry, path):
    outside = fake_registry["root"] / "escape-target"
    if not outside.exists():
        (outside).mkdir()
        (outside / "config.yaml").write_text("secret: outside-the-runs-folder\n")
        (fake_registry["runs"] / "escape").symlink_to(outside)  # a link inside runs/ pointing out of it
    response = client.get(path)
    assert response.status_code in (404, 400, 422), (path, response.status_code)
    assert "outside-the-runs-folder" not in response.text and "def create_app" not in response.text


def test_static_assets_are_served_and_shipped(client):
    assert "uPlot" in client.get("/static/uPlot.iife.min.js").text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert "MIT" in (STATIC / "LICENSE.uPlot.txt").read_text()


# ------------------------------------------------------------------------------------------------- bind
def test_binds_loopback_and_requires_the_key_elsewhere(fake_registry, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with pytest.raises(UIConfigError, match="not loopback"):
        build_app(fake_registry["url"], fake_registry["runs"], host="0.0.0.0")
    (tmp_path / "short").write_text("abc")
    with pytest.raises(UIConfigError, match="8\\+ characters"):
        build_app(fake_registry["url"], fake_registry["runs"], admin_key_file=tmp_path / "short")
    exposed = TestClient(build_app(fake_registry["url"], fake_registry["runs"], host="0.0.0.0", admin_key_file=key_file))
    assert exposed.get("/api/runs").status_code == 401
    assert exposed.get("/api/runs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert exposed.get("/api/info").json()["key_required_for_reads"]
    local = build_app(fake_registry["url"], fake_registry["runs"])
    assert TestClient(local, base_url="http://127.0.0.1:8765").get("/api/runs").status_code == 200
    assert TestClient(local, base_url="http://evil.example:8765").get("/api/runs").status_code == 400  # DNS rebinding
    from tunesmith.cli import build_parser

    args = build_parser().parse_args(["ui", "--runs", "r"])
    assert (args.host, args.port, args.admin_key_file, args.registry) == ("127.0.0.1", 8765, None, None)


def test_ui_package_reads_only_records():
    """ui/ never imports the trainer or the recipes (DESIGN: it reads records)."""
    source = "\n".join(p.read_text() for p in (Path(STATIC).parent).glob("*.py"))
    assert not re.search(r"tunesmith\.(train|recipes|methods)\b", source)


def test_tunesmith_ui_starts_and_prints_its_address(fake_registry, tmp_path, capsys):
    """The real command: a uvicorn process on loopback that prints where it listens and answers there."""
    import socket
    import subprocess
    import sys

    import httpx

    import tunesmith
    from tunesmith.cli import main

    assert main(["ui", "--host", "0.0.0.0", "--registry", fake_registry["url"]]) == 2
    assert "not loopback" in capsys.readouterr().err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(tunesmith.__file__).parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "ui", "--registry", fake_registry["url"], "--runs",
         str(fake_registry["runs"]), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, cwd=tmp_path)
    try:
        line = process.stdout.readline()
        for _ in range(20):  # libraries may log a line first (e.g. bitsandbytes on some CPUs)
            if "http://" in line or not line:
                break
            line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line and "registry actions off" in line
        for _ in range(100):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=5)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert {r["id"] for r in response.json()["runs"]} >= {"alpha@1", "beta@1", "dir:live"}
    finally:
        process.terminate()
        process.wait(10)


def test_a_diverged_run_with_nan_and_inf_still_renders(tmp_path):
    from tests.ui.conftest import write_run

    runs = tmp_path / "runs"
    runs.mkdir()
    run = write_run(runs, "diverged", 1.0, None, extra_summary={"best_eval_loss": float("nan"),
                                                                  "final_train_loss": float("inf")})
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 13, "train_loss": NaN, "lr": 1.0}\n{"step": 14, "train_loss": Infinity, "lr": 1.0}\n')
    client = TestClient(create_app(Catalog(str(tmp_path / "registry.db"), runs)))
    row = client.get("/api/runs").json()["runs"][0]
    assert row["headline"]["best_eval_loss"] == "NaN" and row["headline"]["train_loss"] == _last_finite(run)
    curves = client.get("/api/curves", params={"id": "dir:diverged"}).json()["series"]["train_loss"]
    assert curves["x"][-1] == 12.0 and len(curves["x"]) == 12  # the two non-finite points are not drawn
    assert client.get("/api/run", params={"id": "dir:diverged"}).json()["diagnosis"]["diagnosis"] == "healthy"


def _last_finite(run) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if isinstance(r["train_loss"], float) and abs(r["train_loss"]) < 1e9][-1]


def test_examples_with_equal_outputs_but_different_scores_count_as_differing(tmp_path):
    """Same prediction, different score (e.g. a metric option changed between evaluations): shown too."""
    from tests.ui.conftest import write_run

    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs, "one", 1e-4, ["12", "7", "30"])
    other = write_run(runs, "two", 1e-4, ["12", "7", "30"])
    evaluated = json.loads((other / "eval.json").read_text())
    evaluated["models"]["tuned"]["test"]["examples"][2]["scores"]["exact_match"] = 0.5
    (other / "eval.json").write_text(json.dumps(evaluated))
    client = TestClient(create_app(Catalog(str(tmp_path / "registry.db"), runs)))
    body = client.get("/api/examples", params={"a": "dir:one", "b": "dir:two", "split": "test"}).json()
    assert body["differing_count"] == 1 and body["differing"][0]["reference"] == "30"
    assert body["differing"][0]["a"]["prediction"] == body["differing"][0]["b"]["prediction"] == "30"
    assert client.get("/api/examples", params={"a": "dir:one", "b": "dir:two", "split": "dev"}).status_code == 404
