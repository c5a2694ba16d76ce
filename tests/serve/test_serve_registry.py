"""`--adapter NAME=registry:ALIAS`: resolved through tunesmith.registry, re-resolved so a promotion needs no restart."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from tunesmith.serve.config import ServeConfig
from tunesmith.serve.engine import GenRequest
from tunesmith.serve.server import build_state, refresh_registry_adapters
from tunesmith.serve.testing import expected_table, make_lora_adapter

registry = pytest.importorskip("tunesmith.registry")


def make_run(root, name, base_dir, seed):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base_dir)},
                                                    "output": {"name": "contracts"}}))
    (run / "summary.json").write_text(json.dumps({"name": "contracts", "method": "lora", "status": "finished",
                                                  "base_model": str(base_dir)}))
    make_lora_adapter(base_dir, run / "adapter", seed=seed, r=4, scale_b=3.0)
    return run


def test_registry_alias_is_resolved_and_a_promotion_is_picked_up(tmp_path, tiny_model_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    url = str(tmp_path / "registry")
    v1 = registry.register_run(make_run(tmp_path, "run1", tiny_model_dir, 1), url=url, name="contracts")
    v2 = registry.register_run(make_run(tmp_path, "run2", tiny_model_dir, 2), url=url, name="contracts")
    registry.promote(f"contracts@{v1['version']}", "production", url=url)
    config = ServeConfig(model=str(tiny_model_dir), adapters={"contracts": "registry:production"}, registry_url=url)
    state = build_state(config, log_fn=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok("hello world")["input_ids"]
    try:
        expected = expected_table(tiny_model_dir, {"v1": tmp_path / "run1" / "adapter",
                                                    "v2": tmp_path / "run2" / "adapter"}, [prompt], 6)
        assert expected[("v1", 0)] != expected[("v2", 0)]
        engine = state.engine
        out = engine.generate([GenRequest(prompt_ids=prompt, adapter="contracts", max_tokens=6)])[0]
        assert out.token_ids == expected[("v1", 0)]
        watched = {"contracts": "registry:production"}
        assert refresh_registry_adapters(state, watched, url) == []  # nothing moved
        registry.promote(f"contracts@{v2['version']}", "production", url=url)
        assert refresh_registry_adapters(state, watched, url) == ["contracts"]
        out = engine.generate([GenRequest(prompt_ids=prompt, adapter="contracts", max_tokens=6)])[0]
        assert out.token_ids == expected[("v2", 0)]  # the hot v1 copy was dropped, v2 loaded without restart
    finally:
        state.engine.close()
        torch.set_num_threads(before)
