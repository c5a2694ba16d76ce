"""A real `tunesmith serve` process under uvicorn on 127.0.0.1 (random free port, bounded waits):

- HTTP error statuses and SSE streaming;
- a load test: 500 requests from 16 concurrent clients over 8 adapters while an admin client loads, uses and
  unloads a 9th adapter and the cache (4 slots) evicts; every response and every admin status is checked in the
  main thread, and the p50/p99 latency and the error count are printed;
- client faults: a streaming client that stops reading, a streaming client that disconnects mid stream, and a
  non-streaming client that disconnects while its answer is generated all get their generation cancelled. The
  counters on /metrics prove their batch row and adapter pin are freed (tunesmith_running_requests,
  tunesmith_adapter_cache_pinned, tunesmith_cancelled_requests_total) long before the LONG tokens they asked
  for, and the server keeps answering other clients correctly meanwhile and afterwards.
"""

from __future__ import annotations

import json
import random
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from tunesmith.models.tiny import save_tiny_model
from tunesmith.serve.testing import expected_table, make_lora_adapter, start_server, stop_server

ADMIN = "admin-key-uvicorn-1"
PROMPTS = ["hello world", "the quick brown fox", "a", "lorem ipsum dolor"]
NEW_TOKENS = 4
N_ADAPTERS = 8
LONG = 6000  # tokens a faulty client asks for: minutes of decoding on CPU if nothing cut the request short
BACKLOG = 64  # max_stream_backlog: chunks a streaming client may leave unread once its socket is full
SEND_BUFFER = 32768  # send_buffer_bytes: the kernel buffers this much (doubled) before a socket counts as full


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-uvicorn")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    base = save_tiny_model(root / "base", "llama")
    config = json.loads((base / "config.json").read_text())
    config["max_position_embeddings"] = 8192  # room for LONG tokens (RoPE has no fixed length)
    (base / "config.json").write_text(json.dumps(config))
    weights = load_file(str(base / "model.safetensors"))
    weights["model.embed_tokens.weight"][config["eos_token_id"]] = 0.0  # (tied head) eos logit 0: never the argmax,
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})  # so LONG really runs long
    adapters = {f"ad{i}": make_lora_adapter(base, root / f"ad{i}", seed=40 + i, r=4, scale_b=3.0)
                for i in range(N_ADAPTERS)}
    extra = make_lora_adapter(base, root / "extra", seed=99, r=4, scale_b=3.0)
    tok = AutoTokenizer.from_pretrained(base)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    table = expected_table(base, {**adapters, "extra": extra}, prompts, NEW_TOKENS)
    expected = {k: tok.decode(v, skip_special_tokens=True) for k, v in table.items()}
    torch.set_num_threads(before)
    (root / "admin.key").write_text(ADMIN)
    # 4 adapters fit the budget (slot = 2 layers * 1024 * r4 * 4 bytes = 32 KiB): 8 adapters must take turns
    (root / "serve.yaml").write_text(yaml.safe_dump({
        "model": str(base), "adapters": {n: str(p) for n, p in adapters.items()}, "cache_budget": "128KB",
        "threads": 1, "max_batch_size": 16, "admin_key_file": str(root / "admin.key"),
        "max_stream_backlog": BACKLOG, "send_buffer_bytes": SEND_BUFFER}))
    proc, url = start_server(["--config", str(root / "serve.yaml")], root / "server.log")
    yield {"url": url, "port": int(url.rsplit(":", 1)[1]), "expected": expected, "extra": extra,
           "log": root / "server.log"}
    stop_server(proc)
    assert "Traceback" not in (root / "server.log").read_text()


def test_startup_notice_and_http_errors(server):
    url = server["url"]
    assert "open to every local user, on loopback only" in server["log"].read_text()
    body = {"model": "ad0", "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0}
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == server["expected"][("ad0", 0)]
        assert client.post("/v1/completions", json={**body, "model": "zzz"}).status_code == 404
        assert client.post("/v1/completions", json={**body, "top_p": 0}).status_code == 422
        assert client.post("/v1/completions", json={**body, "max_tokens": 9000}).status_code == 400
        assert client.post("/v1/completions", json={**body, "prompt": "x" * (2 << 20)}).status_code == 413
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == server["expected"][("ad0", 0)]
        assert client.get("/health").json()["status"] == "ok"


def _outcome(response: httpx.Response) -> tuple[int, str]:
    """(status, completion text or the error body): what the main thread checks."""
    if response.status_code != 200:
        return response.status_code, response.text[:300]
    return 200, response.json()["choices"][0]["text"]


def test_load_500_requests_16_clients_8_adapters_with_churn(server):
    url, expected = server["url"], server["expected"]
    rng = random.Random(0)
    jobs = [(f"ad{rng.randrange(N_ADAPTERS)}" if rng.random() > 0.1 else "base", rng.randrange(len(PROMPTS)))
            for _ in range(500)]
    results: list[tuple[str, int, int, str, float]] = []  # (model, prompt, status, text, seconds); list.append is atomic
    churn: list[tuple[str, int, str]] = []  # (operation, status, text)
    stop = threading.Event()

    def admin_churn():  # records only: every check happens in the main thread below
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
            while not stop.is_set():
                r = client.post("/admin/adapters", json={"name": "extra", "path": str(server["extra"])})
                churn.append(("load", r.status_code, r.text[:300]))
                body = {"model": "extra", "prompt": PROMPTS[1], "max_tokens": NEW_TOKENS, "temperature": 0}
                churn.append(("complete", *_outcome(client.post("/v1/completions", json=body))))
                r = client.delete("/admin/adapters/extra")
                churn.append(("unload", r.status_code, r.text[:300]))

    def worker(part: list[tuple[str, int]]):
        with httpx.Client(base_url=url, timeout=60) as client:
            for model, i in part:
                start = time.perf_counter()
                try:
                    status, text = _outcome(client.post("/v1/completions", json={
                        "model": model, "prompt": PROMPTS[i], "max_tokens": NEW_TOKENS, "temperature": 0}))
                except httpx.HTTPError as exc:  # a transport failure is an error like any other, counted below
                    status, text = -1, repr(exc)
                results.append((model, i, status, text, time.perf_counter() - start))

    churner = threading.Thread(target=admin_churn)
    churner.start()
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(worker, [jobs[k::16] for k in range(16)]))
    finally:
        stop.set()
        churner.join(60)
    elapsed = time.monotonic() - start
    errors = [r for r in results if r[2] != 200 or r[3] != expected[(r[0], r[1])]]
    latencies = sorted(r[4] for r in results)
    p50, p99 = statistics.median(latencies), latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    with httpx.Client(base_url=url, timeout=10) as client:
        metrics = client.get("/metrics").text
    evictions = float(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith("tunesmith_adapter_cache_evictions_total")))
    cycles = sum(op == "unload" for op, _, _ in churn)
    print(f"\nload test: {len(results)} requests, 16 clients, {N_ADAPTERS} adapters + churn; errors={len(errors)} "
          f"p50={p50 * 1000:.0f}ms p99={p99 * 1000:.0f}ms wall={elapsed:.1f}s churn_cycles={cycles} "
          f"evictions={evictions:.0f}")
    assert len(results) == 500 and not errors, errors[:5]
    assert not churner.is_alive() and cycles >= 1
    bad_churn = [c for c in churn if c[1] != 200 or (c[0] == "complete" and c[2] != expected[("extra", 1)])]
    assert not bad_churn, bad_churn[:5]
    assert evictions > 0  # 8+ adapters through 4 slots: the cache really evicted and reloaded
    assert elapsed < 180


# ------------------------------------------------------------------------------------------------ faults
def counters(url: str) -> dict[str, float]:
    names = {"tunesmith_running_requests": "running", "tunesmith_pending_requests": "pending",
             "tunesmith_adapter_cache_pinned": "pinned", "tunesmith_cancelled_requests_total": "cancelled"}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {names[line.split()[0]]: float(line.split()[1]) for line in text.splitlines()
            if line.split(" ")[0] in names}


def wait_for(url: str, condition, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        seen = counters(url)
        if condition(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"counters never reached the expected state within {timeout} s: {seen}")
        time.sleep(0.1)


def freed(before: dict[str, float]):
    """One more cancelled request, and no row or adapter pin held."""
    return lambda c: c["cancelled"] == before["cancelled"] + 1 and c["running"] == 0 and c["pinned"] == 0


def post_raw(port: int, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """Send POST /v1/completions on a raw socket and return it unread (a client we fully control)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small receive window
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def read_all(sock: socket.socket, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"0\r\n\r\n"):  # the end of a chunked response
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return data


def serves_others(server) -> None:
    body = {"model": "ad1", "prompt": PROMPTS[1], "max_tokens": NEW_TOKENS, "temperature": 0}
    with httpx.Client(base_url=server["url"], timeout=60) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == server["expected"][("ad1", 1)]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                           if line.startswith("data: {"))
        assert text == server["expected"][("ad1", 1)]


LONG_BODY = {"model": "ad0", "prompt": PROMPTS[0], "max_tokens": LONG, "temperature": 0}


def test_a_streaming_client_that_stops_reading_is_cut_off(server):
    url = server["url"]
    before = counters(url)
    stalled = post_raw(server["port"], {**LONG_BODY, "stream": True}, rcvbuf=4096)
    try:
        wait_for(url, lambda c: c["running"] >= 1)
        serves_others(server)  # the stalled client holds a row, not the engine
        after = wait_for(url, freed(before))
        assert after["pending"] == 0
        serves_others(server)
        # reading again, it gets what was queued, then an error event that says why, then [DONE]
        data = read_all(stalled).decode()
        tokens = data.count('"finish_reason": null')
        print(f"\nslow client: cut off after {tokens} of {LONG} chunks (send buffer {SEND_BUFFER} B, backlog {BACKLOG})")
        assert 0 < tokens < LONG / 2, tokens
        assert f"stream cancelled: the client left {BACKLOG} chunks unread" in data and "data: [DONE]" in data
    finally:
        stalled.close()


def test_a_streaming_client_that_disconnects_mid_stream_frees_its_row(server):
    url = server["url"]
    before = counters(url)
    sock = post_raw(server["port"], {**LONG_BODY, "stream": True})
    sock.settimeout(30)
    seen = b""
    while seen.count(b"data: {") < 5:  # a few chunks really arrived: the row is decoding
        seen += sock.recv(4096)
    sock.close()
    assert wait_for(url, freed(before), timeout=30)["pending"] == 0
    serves_others(server)


def test_a_non_streaming_client_that_disconnects_frees_its_row(server):
    url = server["url"]
    before = counters(url)
    sock = post_raw(server["port"], LONG_BODY)
    wait_for(url, lambda c: c["running"] == 1 and c["pinned"] == 1)
    sock.close()
    wait_for(url, freed(before), timeout=30)
    serves_others(server)
