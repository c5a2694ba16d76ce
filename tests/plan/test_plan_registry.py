"""A method owns all of itself: registering one makes it appear in the config schema, the planner and the CLI's
choices, with no change to plan/ (issue 12, item 2)."""

from __future__ import annotations

import json

import pytest

from tunesmith.config import MethodConfig, load_config
from tunesmith.methods.base import Method, TrainableCount, frozen_core_elements
from tunesmith.methods.registry import get_method, method_names, register_method, unregister_method
from tunesmith.models.facts import model_facts
from tunesmith.plan.memory import TrainSetup, estimate_memory


class BiasOnly(Method):
    """A toy method (BitFit-like): trains one vector of width hidden per decoder layer."""

    name = "dummy-bias"
    description = "one trained bias vector per layer (test only)"
    plan_preference = 50

    def trainable_count(self, facts, config):
        return TrainableCount(self.name, facts.num_layers * facts.hidden_size,
                              f"{facts.num_layers} layers x hidden {facts.hidden_size}")

    def layer_activation_elements(self, facts, config):
        return frozen_core_elements(facts) + facts.hidden_size


@pytest.fixture
def dummy():
    method = register_method(BiasOnly())
    yield method
    unregister_method(method.name)


def test_registered_method_is_planned_without_touching_plan(dummy, capsys):
    from tunesmith.cli import main

    assert "dummy-bias" in method_names() and get_method("dummy-bias") is dummy
    assert main(["plan", "--model", "meta-llama/Llama-3.1-8B", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    entry = plan["methods"]["dummy-bias"]
    assert entry["trainable_params"] == 32 * 4096
    assert entry["description"] == dummy.description
    # The estimate is the registry's terms summed: bf16 base (2 bytes/param), fp32 trainable, grads and AdamW.
    facts = model_facts("meta-llama/Llama-3.1-8B")
    est = estimate_memory(facts, MethodConfig(name="dummy-bias"), TrainSetup(batch_size=1, seq_len=64))
    assert est.weights == facts.params_total * 2 and est.trainable == est.gradients == 32 * 4096 * 4
    # ... and the CLI accepts it as a forced method (its choices come from the registry at parser build time).
    assert main(["plan", "--model", "meta-llama/Llama-3.1-8B", "--method", "dummy-bias", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommendation"]["method"] == "dummy-bias"


def test_config_accepts_registered_names_only(dummy, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  name: dummy-bias\n")
    assert load_config(path).method.name == "dummy-bias"
    path.write_text("method:\n  name: lorra\n")
    with pytest.raises(ValueError, match="method.name.*unknown method 'lorra'"):
        load_config(path)


def test_registering_twice_is_refused(dummy):
    with pytest.raises(ValueError, match="already registered"):
        register_method(BiasOnly())


def test_options_live_beside_their_methods():
    from tunesmith.methods.lora import LoraOptions
    from tunesmith.methods.qlora import QuantOptions

    fields = MethodConfig.model_fields
    assert list(fields) == ["name", "lora", "quant", "full", "prefix", "prompt", "adapters"]
    assert fields["lora"].annotation is LoraOptions and fields["quant"].annotation is QuantOptions


def test_config_import_stays_light():
    """config.py builds its schema from the registry without importing torch or peft (the CLI stays fast)."""
    import subprocess
    import sys

    code = "import sys, tunesmith.config, tunesmith.methods.registry as r; r.method_names(); " \
           "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
