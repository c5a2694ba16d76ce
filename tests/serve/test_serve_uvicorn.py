"""A real `tunesmith serve` process under uvicorn on 127.0.0.1 (random free port, bounded waits):
HTTP error statuses, SSE streaming, and a load test — 500 requests from 16 concurrent clients over 8 adapters while
adapters are loaded, unloaded and evicted — with zero server errors and every response correct for its adapter."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from tunesmith.serve.testing import expected_table, make_lora_adapter

ADMIN = "admin-key-uvicorn-1"
PROMPTS = ["hello world", "the quick brown fox", "a", "lorem ipsum dolor"]
NEW_TOKENS = 4
N_ADAPTERS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve-uvicorn")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    adapters = {f"ad{i}": make_lora_adapter(tiny_model_dir, root / f"ad{i}", seed=40 + i, r=4, scale_b=3.0)
                for i in range(N_ADAPTERS)}
    extra = make_lora_adapter(tiny_model_dir, root / "extra", seed=99, r=4, scale_b=3.0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    table = expected_table(tiny_model_dir, {**adapters, "extra": extra}, prompts, NEW_TOKENS)
    expected = {k: tok.decode(v, skip_special_tokens=True) for k, v in table.items()}
    torch.set_num_threads(before)
    (root / "admin.key").write_text(ADMIN)
    port = free_port()
    # 4 adapters fit the budget (slot = 2 layers * 1024 * r4 * 4 bytes = 32 KiB): 8 adapters must take turns
    cmd = [sys.executable, "-m", "tunesmith.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
           "--admin-key-file", str(root / "admin.key"), "--cache-budget", "128KB", "--threads", "1",
           "--max-batch-size", "16", *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]]
    log = open(root / "server.log", "w")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("server did not answer /health within 90 s")
    yield {"url": url, "expected": expected, "extra": extra, "log": root / "server.log"}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_startup_notice_and_http_errors(server):
    url = server["url"]
    assert "open to every local user, on loopback only" in server["log"].read_text()
    body = {"model": "ad0", "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0}
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == server["expected"][("ad0", 0)]
        assert client.post("/v1/completions", json={**body, "model": "zzz"}).status_code == 404
        assert client.post("/v1/completions", json={**body, "top_p": 0}).status_code == 422
        assert client.post("/v1/completions", json={**body, "max_tokens": 5000}).status_code == 400
        assert client.post("/v1/completions", json={**body, "prompt": "x" * (2 << 20)}).status_code == 413
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == server["expected"][("ad0", 0)]
        assert client.get("/health").json()["status"] == "ok"


def test_load_500_requests_16_clients_8_adapters_with_churn(server):
    url, expected = server["url"], server["expected"]
    rng = random.Random(0)
    jobs = [(f"ad{rng.randrange(N_ADAPTERS)}" if rng.random() > 0.1 else "base", rng.randrange(len(PROMPTS)))
            for _ in range(500)]
    failures: list[str] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    churn = {"loads": 0}

    def admin_churn():
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
            while not stop.is_set():
                r = client.post("/admin/adapters", json={"name": "extra", "path": str(server["extra"])})
                assert r.status_code == 200
                body = {"model": "extra", "prompt": PROMPTS[1], "max_tokens": NEW_TOKENS, "temperature": 0}
                text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
                if text != expected[("extra", 1)]:
                    with lock:
                        failures.append(f"extra: {text!r}")
                client.delete("/admin/adapters/extra")
                churn["loads"] += 1

    def worker(part: list[tuple[str, int]]):
        with httpx.Client(base_url=url, timeout=60) as client:
            for model, i in part:
                r = client.post("/v1/completions", json={"model": model, "prompt": PROMPTS[i],
                                                         "max_tokens": NEW_TOKENS, "temperature": 0})
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code != 200 or r.json()["choices"][0]["text"] != expected[(model, i)]:
                        failures.append(f"{model}/{i}: {r.status_code} {r.text[:200]}")

    churner = threading.Thread(target=admin_churn)
    churner.start()
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, [jobs[k::16] for k in range(16)]))
    elapsed = time.monotonic() - start
    stop.set()
    churner.join(30)
    assert statuses == {200: 500} and not failures, (statuses, failures[:5])
    assert churn["loads"] >= 1
    with httpx.Client(base_url=url, timeout=10) as client:
        metrics = client.get("/metrics").text
    evictions = float(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith("tunesmith_adapter_cache_evictions_total")))
    assert evictions > 0  # 8+ adapters through 4 slots: the cache really evicted and reloaded
    assert elapsed < 120
