"""Engine: mixed-adapter continuous batching equals each request run alone through peft, token for token."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.serve.adapters import AdapterError
from tunesmith.serve.engine import Engine, GenRequest
from tunesmith.serve.testing import expected_table, make_lora_adapter

PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "lorem ipsum dolor sit amet, consectetur"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve-engine")
    adapters = {
        "a0": make_lora_adapter(tiny_model_dir, root / "a0", seed=10, r=4, scale_b=3.0),
        "a1": make_lora_adapter(tiny_model_dir, root / "a1", seed=11, r=2, targets=["q_proj", "v_proj", "down_proj"], scale_b=3.0),
        "a2": make_lora_adapter(tiny_model_dir, root / "a2", seed=12, r=8, alpha=4, scale_b=3.0),
    }
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    table = expected_table(tiny_model_dir, adapters, prompts, NEW_TOKENS)
    return {"base": tiny_model_dir, "adapters": adapters, "tokenizer": tokenizer, "prompts": prompts,
            "expected": table, "root": root}


def make_engine(world, **kwargs) -> Engine:
    model = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
    engine = Engine(model, world["tokenizer"], base_names={str(world["base"])}, **kwargs)
    for name, path in world["adapters"].items():
        engine.add_adapter(name, path)
    return engine


def test_adapters_change_outputs(world):
    table = world["expected"]
    differing = sum(table[(a, i)] != table[("base", i)] for a in world["adapters"] for i in range(len(PROMPTS)))
    assert differing >= 10  # of 12: the oracle must tell adapters apart, or the equality tests prove nothing


def test_mixed_batch_equals_peft_alone_with_joins_and_leaves(world):
    batch_sizes: list[int] = []
    engine = make_engine(world, on_step=batch_sizes.append)
    try:
        names = ["base", "a0", "a1", "a2"]
        requests, keys = [], []
        for i in range(len(PROMPTS)):
            for j, name in enumerate(names):
                n = NEW_TOKENS - (i + j) % 4  # rows leave at different steps
                requests.append(GenRequest(prompt_ids=world["prompts"][i], adapter=name, max_tokens=n))
                keys.append((name, i, n))
        first = engine.generate(requests[:8])  # warm the adapters, then join mid-flight
        late_results: list = [None] * 8
        import threading

        def late():
            time.sleep(0.001)
            late_results[:] = engine.generate(requests[8:])

        thread = threading.Thread(target=late)
        thread.start()
        early = engine.generate([GenRequest(prompt_ids=world["prompts"][3], adapter="a2", max_tokens=NEW_TOKENS)])
        thread.join(60)
        results = first + late_results
        for (name, i, n), result in zip(keys, results, strict=True):
            assert result.token_ids == world["expected"][(name, i)][:n], (name, i, n)
        assert early[0].token_ids == world["expected"][("a2", 3)]
        assert max(batch_sizes) >= 8  # mixed adapters really shared forward passes
    finally:
        engine.close()


def test_base_rows_equal_base_model_and_counts(world):
    engine = make_engine(world)
    try:
        results = engine.generate([GenRequest(prompt_ids=p, max_tokens=NEW_TOKENS) for p in world["prompts"]])
        for i, result in enumerate(results):
            assert result.token_ids == world["expected"][("base", i)]
            assert result.prompt_tokens == len(world["prompts"][i])
            assert result.completion_tokens == len(result.token_ids)
        assert engine.cache.stats()["loads"] == 0  # base rows load nothing
    finally:
        engine.close()


def test_stop_sequences_seed_and_sampling(world):
    engine = make_engine(world)
    tok = world["tokenizer"]
    try:
        greedy = engine.generate([GenRequest(prompt_ids=world["prompts"][1], adapter="a0", max_tokens=NEW_TOKENS)])[0]
        text = greedy.text
        stop = text[3:5]
        cut = engine.generate([GenRequest(prompt_ids=world["prompts"][1], adapter="a0", max_tokens=NEW_TOKENS,
                                          stop=[stop])])[0]
        assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
        assert greedy.finish_reason in ("length", "stop")
        sampled = [GenRequest(prompt_ids=world["prompts"][0], adapter="a1", max_tokens=12, temperature=1.0,
                              top_p=0.9, seed=s) for s in (1, 1, 2, 3, 4)]
        outs = [r.token_ids for r in engine.generate(sampled)]
        assert outs[0] == outs[1]  # same seed, same tokens, even inside one batch
        assert len({tuple(o) for o in outs[1:]}) >= 2
        assert tok.decode(outs[0]) is not None
    finally:
        engine.close()


def test_cache_evicts_lru_and_reloads_correctly(world):
    # one slot at rank 8 over every linear layer of the tiny model: 2 layers * 1024 * 8 * 4 bytes
    engine = make_engine(world, cache_budget_bytes=65536)
    try:
        order = ["a2", "a0", "a1", "a1", "a2"]
        for name in order:
            result = engine.generate([GenRequest(prompt_ids=world["prompts"][0], adapter=name, max_tokens=NEW_TOKENS)])
            assert result[0].token_ids == world["expected"][(name, 0)]
        stats = engine.cache.stats()
        assert stats["hot"] == 1 and stats["loads"] == 4 and stats["evictions"] == 3
        assert stats["hits"] == 1 and stats["misses"] == 4
        # several adapters in one burst with one slot: they take turns, all correct
        burst = engine.generate([GenRequest(prompt_ids=world["prompts"][2], adapter=n, max_tokens=4)
                                 for n in ("a0", "a1", "a2", "a0")])
        for name, result in zip(("a0", "a1", "a2", "a0"), burst, strict=True):
            assert result.token_ids == world["expected"][(name, 2)][:4]
    finally:
        engine.close()


def test_refuses_pickles_other_bases_and_unsupported_configs(world, tiny_qwen_dir, tmp_path):
    engine = make_engine(world)
    try:
        pickled = tmp_path / "pickled"
        shutil.copytree(world["adapters"]["a0"], pickled)
        (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
        with pytest.raises(AdapterError, match="pickled adapter weights are refused"):
            engine.add_adapter("pickled", pickled)
        other = make_lora_adapter(tiny_qwen_dir, tmp_path / "qwen", seed=1)
        with pytest.raises(AdapterError, match="base_model_name_or_path"):
            engine.add_adapter("qwen", other)
        cfg = json.loads((other / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = None
        (other / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(AdapterError, match="made for another"):
            engine.add_adapter("qwen", other)
        dora = tmp_path / "dora"
        shutil.copytree(world["adapters"]["a1"], dora)
        cfg = json.loads((dora / "adapter_config.json").read_text())
        cfg["use_dora"] = True
        (dora / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(AdapterError, match="use_dora"):
            engine.add_adapter("dora", dora)
        assert engine.cache.names() == ["a0", "a1", "a2"]  # nothing half-registered
    finally:
        engine.close()


def test_cancel_frees_the_row_and_the_adapter_pin(world):
    import threading

    engine = make_engine(world)
    try:
        finished = threading.Event()
        results: list = []

        def on_event(kind, payload):
            if kind == "done":
                results.append(payload)
                finished.set()

        running = GenRequest(prompt_ids=world["prompts"][0], adapter="a0", max_tokens=500, ignore_eos=True,
                             on_event=on_event)
        engine.submit(running)
        deadline = time.monotonic() + 60
        while not (engine.stats()["running"] == 1 and engine.stats()["pinned"] == 1):
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
        running.cancel("the client went away")
        assert finished.wait(30)
        assert results[0].finish_reason == "cancelled" and results[0].completion_tokens < 500
        while engine.stats()["running"]:  # "done" is sent from inside the step; the row leaves at its end
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
        stats = engine.stats()
        assert (stats["running"], stats["pinned"], stats["cancelled"]) == (0, 0, 1)
        gone = GenRequest(prompt_ids=world["prompts"][1], adapter="a1", max_tokens=NEW_TOKENS)
        gone.cancel("disconnected while waiting")  # cancelled before it started: never prefilled
        assert engine.generate([gone])[0].completion_tokens == 0
        stats = engine.stats()
        assert (stats["running"], stats["pinned"], stats["cancelled"]) == (0, 0, 2)
        after = engine.generate([GenRequest(prompt_ids=world["prompts"][2], adapter="a0", max_tokens=NEW_TOKENS)])
        assert after[0].token_ids == world["expected"][("a0", 2)]
    finally:
        engine.close()
