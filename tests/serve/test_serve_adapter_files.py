"""Adapters are checked at load time: malformed files are refused with an error naming the file (and the server keeps
serving), and the base model is recognised by what it is (local copy of a hub id, config + weights fingerprint),
not by the string the adapter recorded."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from tunesmith.models import reference
from tunesmith.models.tiny import save_tiny_model
from tunesmith.serve.adapters import AdapterError, inspect_adapter
from tunesmith.serve.api import create_app
from tunesmith.serve.config import ServeConfig
from tunesmith.serve.identity import BaseIdentity
from tunesmith.serve.server import build_state
from tunesmith.serve.testing import make_lora_adapter

ADMIN = "admin-key-files-01"
HUB_ID = "tunesmith-test/tiny-llama"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, tiny_model_dir):
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("good") / "a", seed=5, r=4, scale_b=3.0)


def _copy(adapter, dest):
    shutil.copytree(adapter, dest)
    return dest


def malformed_adapters(good, root) -> dict[str, tuple[object, str]]:
    """name -> (folder, words the refusal must contain)."""
    cases = {}
    data = (good / WEIGHTS).read_bytes()
    for label, cut in (("truncated-data", len(data) - 16), ("truncated-header", 6)):
        folder = _copy(good, root / label)
        (folder / WEIGHTS).write_bytes(data[:cut])
        cases[label] = (folder, "not a readable safetensors file")
    folder = _copy(good, root / "wrong-shapes")
    tensors = load_file(str(folder / WEIGHTS))
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(4, 32)  # the base's q_proj takes 64 inputs
    save_file(tensors, str(folder / WEIGHTS))
    cases["wrong-shapes"] = (folder, "the base layer is 64->64")
    folder = _copy(good, root / "pickle")
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    cases["pickle"] = (folder, "pickled adapter weights are refused")
    for label, name in (("symlink-weights", WEIGHTS), ("symlink-config", "adapter_config.json")):
        folder = _copy(good, root / label)
        outside = root / f"outside-{label}"
        (folder / name).rename(outside)
        (folder / name).symlink_to(outside)
        cases[label] = (folder, "outside the adapter folder")
    return cases


def test_malformed_adapter_files_are_refused_at_load_and_the_server_keeps_serving(tiny_model_dir, good_adapter,
                                                                                    tmp_path):
    (tmp_path / "admin.key").write_text(ADMIN)
    state = build_state(ServeConfig(model=str(tiny_model_dir), adapters={"good": str(good_adapter)},
                                    admin_key_file=str(tmp_path / "admin.key"), max_model_len=64),
                        log_fn=lambda *_: None)
    cases = malformed_adapters(good_adapter, tmp_path)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    body = {"model": "good", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    try:
        with TestClient(create_app(state)) as client:
            expected = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            for label, (folder, words) in cases.items():
                r = client.post("/admin/adapters", headers=auth, json={"name": label, "path": str(folder)})
                assert r.status_code == 400, (label, r.text)
                message = r.json()["error"]["message"]
                assert words in message and str(folder) in message, (label, message)
                assert r.json()["error"]["code"] == "adapter_refused"
                # nothing half-registered, and the next request is served as before
                assert client.post("/v1/completions", json={**body, "model": label}).status_code == 404
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
            listed = [a["name"] for a in client.get("/admin/adapters", headers=auth).json()["adapters"]]
            assert listed == ["good"]
            assert client.get("/health").json()["status"] == "ok"
    finally:
        state.engine.close()


def test_symlink_inside_the_folder_and_hf_cache_layout_are_allowed(good_adapter, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.serve.batched_lora import linear_shapes

    shapes = linear_shapes(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    base = BaseIdentity.of(str(tiny_model_dir))
    snapshot = tmp_path / "models--org--adapter" / "snapshots" / "0123abc"  # how the Hugging Face cache stores files
    blobs = tmp_path / "models--org--adapter" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in (WEIGHTS, "adapter_config.json"):
        shutil.copy(good_adapter / name, blobs / f"sha-{name}")
        (snapshot / name).symlink_to(f"../../blobs/sha-{name}")
    assert inspect_adapter("hf", snapshot, shapes, base).rank == 4
    inner = _copy(good_adapter, tmp_path / "inner")
    (inner / WEIGHTS).rename(inner / "real.safetensors")
    (inner / WEIGHTS).symlink_to("real.safetensors")
    assert inspect_adapter("inner", inner, shapes, base).rank == 4


# ------------------------------------------------------------------------------------------ base identity
@pytest.fixture
def hub_copy(tiny_model_dir, tmp_path, monkeypatch):
    """HUB_ID's local copy (tunesmith's model cache, where `tunesmith models` puts converted hub models): the same
    files as tiny_model_dir, in another folder."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    copy = reference.cached_path(HUB_ID)
    shutil.copytree(tiny_model_dir, copy)
    return copy


def _recorded(adapter, dest, base_name) -> str:
    folder = _copy(adapter, dest)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return str(folder)


def _state(model_name: str, tiny_model_dir, **config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config._name_or_path = model_name  # as if loaded under that name
    return build_state(ServeConfig(model=model_name, **config), log_fn=lambda *_: None, model=model,
                       tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))


def test_hub_id_adapter_on_a_local_base_and_local_path_adapter_on_a_hub_id_base(tiny_model_dir, good_adapter,
                                                                                  hub_copy, tmp_path):
    # server started with the local folder; the adapter recorded the hub id (its local copy holds the same model)
    local = _state(str(tiny_model_dir), tiny_model_dir)
    try:
        spec = local.engine.add_adapter("hub", _recorded(good_adapter, tmp_path / "hub", HUB_ID))
        assert spec.extra["base_check"].startswith("same config and weights")
    finally:
        local.engine.close()
    # server started with the hub id; adapters recorded the local copy's path, or another folder with the same model
    hub = _state(HUB_ID, tiny_model_dir)
    try:
        assert hub.engine.base.folder == hub_copy.resolve()
        spec = hub.engine.add_adapter("copy", _recorded(good_adapter, tmp_path / "copy", str(hub_copy)))
        assert spec.extra["base_check"] == "same name"
        spec = hub.engine.add_adapter("peft-local", good_adapter)  # peft wrote tiny_model_dir's path
        assert json.loads((good_adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
            tiny_model_dir)
        assert spec.extra["base_check"].startswith("same config and weights")
        out = hub.engine.generate([_request("peft-local")])[0]
        assert out.finish_reason in ("length", "stop") and out.completion_tokens > 0
    finally:
        hub.engine.close()


def _request(adapter):
    from tunesmith.serve.engine import GenRequest

    return GenRequest(prompt_ids=[5, 6, 7], adapter=adapter, max_tokens=3)


def test_a_different_base_is_refused_naming_both_unless_allowed(tiny_model_dir, good_adapter, hub_copy, tmp_path,
                                                                caplog):
    other = save_tiny_model(tmp_path / "other-base", "llama", seed=1)  # same shapes, other weights
    refused = _recorded(good_adapter, tmp_path / "other", str(other))
    unknown = _recorded(good_adapter, tmp_path / "unknown", "someone/not-downloaded")
    state = _state(HUB_ID, tiny_model_dir)
    try:
        with pytest.raises(AdapterError) as err:
            state.engine.add_adapter("other", refused)
        message = str(err.value)
        assert str(other) in message and HUB_ID in message and "--allow-base-mismatch" in message
        with pytest.raises(AdapterError, match="no local copy of it was found"):
            state.engine.add_adapter("unknown", unknown)
        assert state.engine.adapter_names() == []
    finally:
        state.engine.close()
    state = _state(HUB_ID, tiny_model_dir, allow_base_mismatch=True)
    try:
        with caplog.at_level(logging.WARNING, logger="tunesmith.serve"):
            spec = state.engine.add_adapter("other", refused)
        assert spec.extra["base_check"].startswith("MISMATCH allowed by --allow-base-mismatch")
        assert any("other" in r.getMessage() and str(other) in r.getMessage() for r in caplog.records)
    finally:
        state.engine.close()


def test_cli_flag_allow_base_mismatch_reaches_the_config(tiny_model_dir, tmp_path):
    from tunesmith.serve.config import load_serve_config

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "allow_base_mismatch": True}))
    assert load_serve_config(str(path), {}).allow_base_mismatch is True
    assert load_serve_config(None, {"model": str(tiny_model_dir)}).allow_base_mismatch is False


def test_cli_has_the_allow_base_mismatch_flag(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main

    other = save_tiny_model(tmp_path / "other-base", "llama", seed=1)
    adapter = make_lora_adapter(other, tmp_path / "for-other", seed=2, r=2)
    args = ["serve", "--model", str(tiny_model_dir), "--adapter", f"x={adapter}", "--port", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--adapter x=" in err and str(other) in err and "--allow-base-mismatch" in err
