"""On the reference model (SmolLM2-135M-Instruct), when installed: its real chat template and a short LoRA run."""

import json

import pytest

from tests.conftest import requires_reference
from tunesmith.config import ModelConfig, load_config
from tunesmith.data.formats import Conversation
from tunesmith.data.render import IGNORE_INDEX, render_example

pytestmark = [pytest.mark.reference, requires_reference]


def test_reference_template_labels_include_end_of_turn():
    from tunesmith.models.load import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(), log=lambda *a: None)
    conversation = Conversation([{"role": "user", "content": "Capital of France?"},
                                 {"role": "assistant", "content": "Paris."}])
    example = render_example(tokenizer, conversation)
    labelled = [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Paris.<|im_end|>\n"
    # SmolLM2's template adds its default system prompt; it is rendered but carries no loss
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(example.input_ids)
    full = tokenizer.apply_chat_template(conversation.messages, tokenize=False)
    assert example.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_short_lora_run_on_the_reference_model(tmp_path):
    rows = [{"instruction": f"Repeat the word {w}.", "output": w} for w in ["apple", "river", "stone", "cloud"] * 4]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, [f"data.train=[{data}]", "data.validation_fraction=0.25", "data.max_seq_len=128",
                                "train.max_steps=3", "train.batch_size=2", "train.show_progress=false",
                                f"output.dir={tmp_path}", "output.name=ref", "output.register_run=false"])
    from tunesmith.recipes.finetune import run_finetune

    summary = run_finetune(config, log=lambda *a: None)
    assert summary.steps == 3 and summary.best_eval_loss is not None
    assert summary.precision in ("fp32", "bf16")
    assert (tmp_path / "ref/adapter/adapter_model.safetensors").exists()
