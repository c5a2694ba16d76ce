"""The HTTP API through FastAPI's TestClient: tenants, A/B routing, streaming, admin, metrics, every error status."""

from __future__ import annotations

import json

import pytest
import yaml
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from tunesmith.serve.api import create_app
from tunesmith.serve.config import ServeConfig, load_serve_config
from tunesmith.serve.router import sticky_unit
from tunesmith.serve.server import build_state
from tunesmith.serve.testing import expected_table, make_lora_adapter

ACME, GLOBEX, ADMIN = "sk-acme-0001", "sk-globex-0001", "admin-key-0001"
PROMPT = "hello world"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve-api")
    adapters = {name: make_lora_adapter(tiny_model_dir, root / name, seed=20 + i, r=4, scale_b=3.0)
                for i, name in enumerate(["acme-v1", "acme-v2", "globex-a", "shared-a"])}
    tenants = root / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": {
        "acme": {"keys": [ACME], "adapters": ["acme-v1", "acme-v2", "contracts"]},
        "globex": {"keys": [GLOBEX], "adapters": ["globex-a"]},
    }}))
    (root / "admin.key").write_text(ADMIN + "\n")
    config = ServeConfig(model=str(tiny_model_dir), adapters={k: str(v) for k, v in adapters.items()},
                         tenants=str(tenants), admin_key_file=str(root / "admin.key"), max_model_len=64,
                         max_body_bytes=4096, aliases={"contracts": {"acme-v1": 0.7, "acme-v2": 0.3}})
    state = build_state(config, log_fn=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = expected_table(tiny_model_dir, adapters, [tok(PROMPT)["input_ids"]], 6)
    with TestClient(create_app(state)) as client:
        yield {"client": client, "state": state, "expected": expected, "tok": tok, "root": root,
               "adapters": adapters}
    state.engine.close()


def H(key):
    return {"Authorization": f"Bearer {key}"}


def complete(client, key, model, **extra):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body, headers=H(key))


def test_completion_matches_peft_and_models_are_per_tenant(served):
    client, tok, expected = served["client"], served["tok"], served["expected"]
    for key, model in [(ACME, "acme-v1"), (GLOBEX, "globex-a"), (ACME, "shared-a"), (GLOBEX, "base")]:
        r = complete(client, key, model)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == tok.decode(expected[(model, 0)], skip_special_tokens=True)
        assert body["usage"]["completion_tokens"] == len(expected[(model, 0)])
        assert body["object"] == "text_completion" and body["model"] == model
    ids = {m["id"] for m in client.get("/v1/models", headers=H(GLOBEX)).json()["data"]}
    assert ids == {"base", "globex-a", "shared-a"}
    ids = {m["id"] for m in client.get("/v1/models", headers=H(ACME)).json()["data"]}
    assert ids == {"base", "acme-v1", "acme-v2", "shared-a", "contracts"}


def _masked(response, name: str) -> tuple[int, dict, dict]:
    """(status, body with the requested name replaced, headers that could differ): what a client can compare."""
    body = json.loads(response.text.replace(name, "<name>"))
    headers = {k: v for k, v in response.headers.items() if k not in ("date", "content-length")}
    return response.status_code, body, headers


def test_another_tenants_adapter_answers_exactly_like_a_missing_one(served):
    client = served["client"]
    missing = _masked(complete(client, GLOBEX, "no-such-adapter"), "no-such-adapter")
    assert missing[0] == 404 and missing[1]["error"]["code"] == "model_not_found"
    for foreign in ("acme-v1", "contracts"):  # another tenant's adapter, and another tenant's A/B alias
        assert _masked(complete(client, GLOBEX, foreign), foreign) == missing
        with client.stream("POST", "/v1/completions", headers=H(GLOBEX),
                           json={"model": foreign, "prompt": PROMPT, "max_tokens": 6, "stream": True}) as r:
            r.read()
            assert _masked(r, foreign) == missing
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answers = [client.post("/v1/chat/completions", headers=H(GLOBEX), json={"model": m, **chat}) for m in
               ("acme-v2", "ghost-v2")]
    assert _masked(answers[0], "acme-v2") == _masked(answers[1], "ghost-v2")
    for secret in ("acme", str(served["root"]), "safetensors", "rank", ACME, "403", "permission"):
        assert secret not in complete(client, GLOBEX, "acme-v1").text.replace("acme-v1", "")
    assert complete(client, "sk-wrong-key-000", "base").status_code == 401
    assert client.post("/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 401
    assert client.get("/v1/models").status_code == 401


def test_chat_completion_and_streaming_equal_non_streaming(served):
    client = served["client"]
    messages = [{"role": "user", "content": "hi there"}]
    plain = client.post("/v1/chat/completions", headers=H(ACME),
                        json={"model": "acme-v2", "messages": messages, "max_tokens": 6, "temperature": 0})
    assert plain.status_code == 200
    content = plain.json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", headers=H(ACME),
                       json={"model": "acme-v2", "messages": messages, "max_tokens": 6, "temperature": 0,
                             "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == content and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    with client.stream("POST", "/v1/completions", headers=H(ACME),
                       json={"model": "acme-v1", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                             "stream": True}) as r:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                 if line.startswith("data: {")]
    assert "".join(texts) == complete(client, ACME, "acme-v1").json()["choices"][0]["text"]


def test_every_error_status_is_openai_json_and_server_stays_up(served):
    client = served["client"]
    cases = [
        (complete(client, ACME, "nope"), 404, "model_not_found"),
        (complete(client, ACME, "base", temperature=5), 422, "invalid_value"),
        (complete(client, ACME, "base", n=2), 422, "invalid_value"),
        (complete(client, ACME, "base", bogus=1), 422, "invalid_value"),
        (complete(client, ACME, "base", max_tokens=60), 400, "context_length_exceeded"),
        (client.post("/v1/completions", headers=H(ACME), json={"model": "base", "prompt": "x" * 5000}), 413,
         "body_too_large"),
        (complete(client, ACME, "base", prompt=[1, 10**9]), 422, "invalid_value"),
        (client.post("/v1/completions", headers={**H(ACME), "content-type": "application/json"},
                     content=b"{not json"), 422, "invalid_value"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
        assert isinstance(response.json()["error"]["message"], str)
    assert client.get("/health").json()["status"] == "ok"
    assert complete(client, ACME, "base").status_code == 200


def test_ab_split_sticky_promote_rollback_and_feedback(served):
    client = served["client"]
    users = [f"user-{i}" for i in range(300)]
    expected_v2 = sum(sticky_unit("contracts", u) >= 0.7 for u in users)
    state = served["state"]
    chosen = {u: state.ab.choose("contracts", u) for u in users}
    share = sum(v == "acme-v2" for v in chosen.values()) / len(users)
    assert abs(share - 0.3) < 0.08 and sum(v == "acme-v2" for v in chosen.values()) == expected_v2
    for user in users[:3]:
        variants = {complete(client, ACME, "contracts", user=user).headers["x-tunesmith-variant"] for _ in range(3)}
        assert variants == {chosen[user]}
    r = complete(client, ACME, "contracts", user=users[0])
    body = r.json()
    assert body["tunesmith_variant"] == chosen[users[0]]
    text = client.get("/v1/models", headers=H(ACME))  # noqa: F841 - aliases stay listed
    f = client.post("/v1/feedback", headers=H(ACME), json={"id": body["id"], "score": 1})
    assert f.status_code == 200 and f.json()["variant"] == chosen[users[0]]
    assert client.post("/v1/feedback", headers=H(GLOBEX), json={"id": body["id"], "score": 1}).status_code == 404
    assert client.post("/admin/aliases/contracts/promote", headers=H(ADMIN), json={"variant": "acme-v2"}).status_code == 200
    assert {complete(client, ACME, "contracts", user=u).json()["tunesmith_variant"] for u in users[:6]} == {"acme-v2"}
    assert client.post("/admin/aliases/contracts/rollback", headers=H(ADMIN)).json()["weights"] == {
        "acme-v1": 0.7, "acme-v2": 0.3}
    r = client.put("/admin/aliases/contracts", headers=H(ADMIN), json={"weights": {"acme-v1": 0.0, "acme-v2": 1.0}})
    assert r.status_code == 200 and state.ab.choose("contracts", users[0]) == "acme-v2"
    state.ab.set_weights("contracts", {"acme-v1": 0.7, "acme-v2": 0.3})
    metrics = client.get("/metrics", headers=H(ADMIN)).text
    assert 'tunesmith_feedback_total{alias="contracts",kind="positive"' in metrics
    assert 'tunesmith_request_latency_seconds_count{adapter="acme-v2",variant="acme-v2"}' in metrics
    assert client.get("/metrics", headers=H(ACME)).status_code == 401  # labels name every tenant's adapters


def test_admin_load_unload_and_metrics(served, tiny_model_dir):
    client, root = served["client"], served["root"]
    assert client.get("/admin/adapters", headers=H(ACME)).status_code == 401
    extra = make_lora_adapter(tiny_model_dir, root / "extra", seed=99, r=2)
    r = client.post("/admin/adapters", headers=H(ADMIN), json={"name": "extra", "path": str(extra), "tenant": "globex"})
    assert r.status_code == 200 and r.json()["rank"] == 2
    assert complete(client, GLOBEX, "extra").status_code == 200
    assert complete(client, ACME, "extra").status_code == 404  # another tenant's: answered as if missing
    bad = client.post("/admin/adapters", headers=H(ADMIN), json={"name": "bad", "path": str(root / "missing")})
    assert bad.status_code == 400 and "not found" in bad.json()["error"]["message"]
    listed = {a["name"]: a for a in client.get("/admin/adapters", headers=H(ADMIN)).json()["adapters"]}
    assert listed["extra"]["tenant"] == "globex" and listed["extra"]["hot"] is True
    assert client.delete("/admin/adapters/extra", headers=H(ADMIN)).status_code == 200
    assert complete(client, GLOBEX, "extra").status_code == 404
    assert client.delete("/admin/adapters/extra", headers=H(ADMIN)).status_code == 404
    metrics = client.get("/metrics", headers=H(ADMIN)).text
    for name in ("tunesmith_adapter_cache_hits_total", "tunesmith_adapter_cache_loads_total",
                 "tunesmith_batch_size_bucket", 'tunesmith_requests_total{adapter="acme-v1"'):
        assert name in metrics


def test_serve_config_refuses_open_non_loopback(tiny_model_dir, tmp_path):
    from tunesmith.config import ConfigError

    with pytest.raises(ConfigError, match="without --tenants"):
        load_serve_config(None, {"model": str(tiny_model_dir), "host": "0.0.0.0"})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "port": 9, "cache_budget": "1MB"}))
    config = load_serve_config(str(path), {"port": 1234, "adapters": {}})
    assert config.port == 1234 and config.cache_budget == "1MB"
    path.write_text(yaml.safe_dump({"model": "m", "prot": 1}))
    with pytest.raises(ConfigError, match="prot"):
        load_serve_config(str(path), {})


def test_cli_refuses_bad_flags_with_error_lines(tiny_model_dir, capsys):
    from tunesmith.cli import main

    assert main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 2
    assert "without --tenants" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--adapter", "noequals"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--adapter", "x=/does/not/exist", "--port", "0"]) == 2
    assert "adapter folder not found" in capsys.readouterr().err
