"""Registry test fixtures: fake run directories (plain safetensors adapters, no torch), an isolated hash cache,
and registry URLs for SQLite and, where a server can be started, PostgreSQL."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads or writes ~/.cache or a real runs/registry.db."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TUNESMITH_REGISTRY", raising=False)
    monkeypatch.delenv("TUNESMITH_ARTIFACTS", raising=False)


@pytest.fixture
def base_model_dir(tmp_path) -> Path:
    """A stand-in base model folder: config.json plus one safetensors shard (what the weights hash covers)."""
    folder = tmp_path / "base-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(folder / "model.safetensors"))
    return folder


def write_run_dir(root: Path, name: str, seed: int = 0, base: str | Path = "tiny-base", lr: float = 2e-4,
                  eval_loss: float = 1.5, data_hash: str = "sha256:" + "d" * 64, with_adapter: bool = True) -> Path:
    """A run directory as `tunesmith train` writes it; adapter and metrics bytes depend only on `seed`."""
    run = root / name
    run.mkdir(parents=True)
    config = {"model": {"name_or_path": str(base)}, "data": {"train": ["train.jsonl"]},
              "method": {"name": "lora", "lora": {"r": 4}}, "train": {"learning_rate": lr, "seed": seed},
              "output": {"name": name}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = {"hash": data_hash, "files": [{"path": "train.jsonl", "sha256": "0" * 64, "records": 10}]}
    (run / "data_manifest.json").write_text(json.dumps(manifest))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train_loss": round(2.0 - 0.1 * s - 0.01 * seed, 4)}) + "\n" for s in range(1, 4))
    )
    (run / "summary.json").write_text(json.dumps({
        "name": name, "method": "lora", "base_model": str(base), "steps": 3, "best_step": 3,
        "best_eval_loss": eval_loss, "final_train_loss": 1.7, "tokens_seen": 300,
    }))
    if with_adapter:
        adapter = run / "adapter"
        adapter.mkdir()
        rng = np.random.default_rng(seed)
        tensors = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 8), dtype=np.float32),
                   "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((8, 4), dtype=np.float32)}
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                  "target_modules": ["q_proj"]}))
    return run


@pytest.fixture
def make_run(tmp_path, base_model_dir):
    def make(name: str, **kwargs) -> Path:
        kwargs.setdefault("base", base_model_dir)
        return write_run_dir(tmp_path / "runs", name, **kwargs)

    return make


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return str(tmp_path / "reg" / "registry.db")


# ------------------------------------------------------------------------------------------ PostgreSQL
def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A SQLAlchemy URL prefix for a PostgreSQL server: $TUNESMITH_TEST_POSTGRES_URL (a server you run), else a
    throwaway cluster started here with initdb + pg_ctl (needs the PostgreSQL server binaries and psycopg).
    Skips, saying why, when neither is possible."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg not installed (pip install 'psycopg[binary]')")
    if os.environ.get("TUNESMITH_TEST_POSTGRES_URL"):
        yield os.environ["TUNESMITH_TEST_POSTGRES_URL"]
        return
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) and no $TUNESMITH_TEST_POSTGRES_URL")
    root = Path(tempfile.mkdtemp(prefix="tunesmith-pg-", dir="/tmp"))
    os.chmod(root, 0o777)  # the server may run as the postgres user, which must reach this folder
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    os.chmod(sock, 0o777)
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        prefix = [runuser, "-u", "postgres", "--"]
    port = _free_port()
    try:
        subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "tunesmith", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        options = f"-k {sock} -p {port} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = log.read_text()[-500:] if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a throwaway PostgreSQL server: {exc} {detail}")
    try:
        yield f"postgresql+psycopg://tunesmith@/{{db}}?host={sock}&port={port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def fresh_postgres_database(server_url: str) -> str:
    """Create an empty database on the server; return its SQLAlchemy URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = server_url.replace("postgresql+psycopg://", "postgresql://").replace("{db}", "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.replace("{db}", name)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return fresh_postgres_database(postgres_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request, tmp_path):
    """(registry URL, artifacts URL) for each backend; PostgreSQL stores artifacts through fsspec's memory://."""
    if request.param == "sqlite":
        return str(tmp_path / "reg" / "registry.db"), None
    server = request.getfixturevalue("postgres_server")
    return fresh_postgres_database(server), f"memory://tunesmith-{uuid.uuid4().hex[:8]}"
