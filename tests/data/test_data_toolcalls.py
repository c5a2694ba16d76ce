"""Tool calls in both dialects, content parts and turn weights: parsing the documented formats of other toolkits
(tests/data/fixtures/README.md), lossless conversion both ways, rendering through a template with tool support and
through the fallback, and labels that cover exactly the assistant turns (tool calls included) and never tool
results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tunesmith.data.convert import convert_file, to_jsonl
from tunesmith.data.formats import FORMATS, parse_record, to_format
from tunesmith.data.prepare import PrepareOptions, check, prepare
from tunesmith.data.readers import iter_file_records, load_records
from tunesmith.data.render import IGNORE_INDEX, render_dataset, render_example, template_supports_tools
from tunesmith.data.toolcalls import template_messages
from tunesmith.models.tiny import build_tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
DATA_FILES = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".json", ".jsonl") and "secrets" not in p.name)
TOOLS = FIXTURES / "llamafactory_glaive_toolcall.json"
OPENAI = FIXTURES / "openai_toolcalls.jsonl"
FAST = dict(diversity=False, pii="report", dedup=())


@pytest.fixture
def tool_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (FIXTURES / "tool_template.jinja").read_text()
    return tokenizer


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------- parsing
def test_llamafactory_toolcall_demo_keeps_tools_and_calls():
    loaded = load_records([TOOLS])
    assert len(loaded.conversations) == 4 and loaded.input == 5  # the fifth has a non-JSON call: quarantined
    (bad,) = loaded.quarantine
    assert (bad["line"], bad["field"]) == (5, "conversations[1].value") and "not valid JSON" in bad["reason"]
    first = loaded.conversations[0]
    assert [m["role"] for m in first.messages] == ["user", "assistant", "tool", "assistant"]
    assert first.messages[1]["tool_calls"] == [{"type": "function", "function": {
        "name": "calculate_loan_payment", "arguments": {"principal": 50000, "interest_rate": 5, "loan_term": 60}}}]
    assert first.tools[0]["type"] == "function" and first.tools[0]["function"]["name"] == "calculate_loan_payment"
    parallel = loaded.conversations[2].messages[1]["tool_calls"]
    assert [c["function"]["arguments"]["location"] for c in parallel] == ["Boston, MA", "Paris, France"]
    assert all(c.tools for c in loaded.conversations)  # tools stay with every conversation, none lost


def test_openai_tool_calls_ids_and_weights():
    loaded = load_records([OPENAI])
    assert len(loaded.conversations) == 4
    (bad,) = loaded.quarantine
    assert (bad["line"], bad["field"]) == (5, "messages[2].tool_call_id") and "call_b" in bad["reason"]
    docs_example = loaded.conversations[0]  # ends with the tool call itself: a valid training target
    assert docs_example.messages[-1]["content"] == "" and docs_example.messages[-1]["tool_calls"][0]["id"] == "call_id"
    parallel = loaded.conversations[1].messages
    assert [m.get("tool_call_id") for m in parallel if m["role"] == "tool"] == ["call_1", "call_2"]
    assert [m.get("weight") for m in loaded.conversations[2].messages] == [None, None, 0, None, 1]


@pytest.mark.parametrize("record,field,words", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, "messages[1].role",
     "expected assistant, got tool"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"type": "function",
      "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages[1].tool_calls[0].function.arguments",
     "not valid JSON"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "messages[1].tool_calls[0].function.name", "missing"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": [{}]}, {"role": "assistant", "content": "b"}]},
     "messages[0].tool_calls", "only assistant turns"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "[{"},
     "tools", "not valid JSON"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": [{"x": 1}]},
     "tools[0]", "needs a 'name'"),
    ({"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]},
     "messages[0].weight", "only assistant turns"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b", "loss_weight": 0.3}]},
     "conversations[1].loss_weight", "fractional weights are not supported"),
])
def test_bad_tool_records_name_the_field(record, field, words):
    from tunesmith.data.errors import RecordError

    fmt = "messages" if "messages" in record else "sharegpt"
    with pytest.raises(RecordError) as caught:
        parse_record(record, fmt, "f.jsonl", 7)
    assert (caught.value.line, caught.value.field) == (7, field) and words in caught.value.reason


def test_empty_or_null_tool_calls_are_no_calls():
    record = {"messages": [{"role": "user", "content": "a", "tool_calls": None},
                           {"role": "assistant", "content": "b", "tool_calls": []}]}
    assert parse_record(record, "messages", "f", 1).messages == [{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]


def test_content_parts_are_joined_and_non_text_parts_quarantined():
    loaded = load_records([FIXTURES / "openai_content_parts.jsonl"])
    first, second = loaded.conversations
    assert first.messages[1]["content"] == "What is the boiling point of water\nat sea level, in celsius?"
    assert second.messages[0]["content"] == "Spell 'cat' backwards."  # the `value` variant
    reasons = {(q["line"], q["field"]): q["reason"] for q in loaded.quarantine}
    assert "'image_url'" in reasons[(3, "messages[0].content[1].type")]
    assert "'input_audio'" in reasons[(4, "messages[0].content[0].type")]


# ---------------------------------------------------------------------------------------- round trips
def _representable(conversation, fmt: str) -> bool:
    try:
        to_format(conversation, fmt)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.name)
def test_every_format_round_trips_every_fixture(path):
    columns = {"prompt": "question", "response": "answer"} if "columns" in path.name else None
    loaded = load_records([path], columns=columns)
    assert loaded.conversations
    for conversation in loaded.conversations:
        for fmt in FORMATS:
            if not _representable(conversation, fmt):
                assert fmt in ("alpaca", "chatml")  # the tool dialects hold everything
                continue
            back = parse_record(json.loads(json.dumps(to_format(conversation, fmt))), fmt, "x", 1)
            assert back.canonical() == conversation.canonical(), fmt


@pytest.mark.parametrize("path", [TOOLS, OPENAI, FIXTURES / "axolotl_sharegpt_weights.jsonl"], ids=lambda p: p.name)
def test_convert_between_dialects_is_lossless_both_ways(tmp_path, path):
    original = load_records([path]).conversations
    for first, second in (("messages", "sharegpt"), ("sharegpt", "messages")):
        records, problems = convert_file(path, first)
        assert len(records) == len(original) and len(problems) == load_records([path]).input - len(original)
        step = tmp_path / f"{path.stem}.{first}.jsonl"
        step.write_text(to_jsonl(records))
        again, problems = convert_file(step, second)
        assert problems == []
        final = tmp_path / f"{path.stem}.{first}.{second}.jsonl"
        final.write_text(to_jsonl(again))
        assert [c.canonical() for c in load_records([final]).conversations] == [c.canonical() for c in original]
    # writing is a fixed point: messages -> sharegpt -> messages gives the same records
    messages, _ = convert_file(path, "messages")
    (tmp_path / "m.jsonl").write_text(to_jsonl(messages))
    sharegpt, _ = convert_file(tmp_path / "m.jsonl", "sharegpt")
    (tmp_path / "s.jsonl").write_text(to_jsonl(sharegpt))
    assert convert_file(tmp_path / "s.jsonl", "messages")[0] == messages


def test_sharegpt_writes_the_llamafactory_conventions():
    conversation = load_records([OPENAI]).conversations[1]
    turns = to_format(conversation, "sharegpt")
    assert [t["from"] for t in turns["conversations"]] == ["system", "human", "gpt", "function_call", "observation",
                                                           "observation", "gpt"]
    assert isinstance(turns["tools"], str) and json.loads(turns["tools"])[0]["name"] == "get_current_weather"
    calls = json.loads(turns["conversations"][3]["value"])
    assert [c["id"] for c in calls] == ["call_1", "call_2"]  # ids ride along so the way back is lossless
    assert turns["conversations"][4]["tool_call_id"] == "call_1"
    with pytest.raises(ValueError, match="chatml holds no"):
        to_format(conversation, "chatml")


# ------------------------------------------------------------------------------------------ rendering
def test_template_support_is_detected(tool_tokenizer):
    assert template_supports_tools(tool_tokenizer)
    assert not template_supports_tools(build_tiny_tokenizer())  # the ChatML template reads no `tools`


def test_labels_in_a_tool_calling_conversation_with_tool_support(tool_tokenizer):
    conversation = load_records([OPENAI]).conversations[1]
    example = render_example(tool_tokenizer, conversation)
    expected_text = tool_tokenizer.apply_chat_template(template_messages(conversation.messages),
                                                       tools=conversation.tools, tokenize=False)
    assert tool_tokenizer.decode(example.input_ids) == expected_text
    assert "# Tools" in expected_text and '"get_current_weather"' in expected_text  # rendered by the template
    oslo = '{"name": "get_current_weather", "arguments": {"location": "Oslo, Norway"}}'
    helsinki = '{"name": "get_current_weather", "arguments": {"location": "Helsinki, Finland"}}'
    assert labelled_text(tool_tokenizer, example) == (  # written out by hand from the template's text form
        f"Let me check both cities.\n<tool_call>\n{oslo}\n</tool_call>\n<tool_call>\n{helsinki}\n</tool_call>"
        "<|im_end|>\nHelsinki is colder: -7 °C against -3 °C in Oslo.<|im_end|>\n")
    eot = tool_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == eot) == 2


def test_labels_with_llamafactory_parallel_calls_and_no_ids(tool_tokenizer):
    conversation = load_records([TOOLS]).conversations[2]
    text = labelled_text(tool_tokenizer, render_example(tool_tokenizer, conversation))
    assert text.count("<tool_call>") == 2 and "<tool_response>" not in text and "22" not in text.split("</tool_call>")[0]
    assert text.endswith("It is 22 °C in Boston and 18 °C in Paris.<|im_end|>\n")


def test_a_conversation_ending_in_a_tool_call_trains_the_call(tool_tokenizer):
    conversation = load_records([OPENAI]).conversations[0]
    text = labelled_text(tool_tokenizer, render_example(tool_tokenizer, conversation))
    assert text == ('<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "San Francisco, USA", '
                    '"format": "celsius"}}\n</tool_call><|im_end|>\n')


def test_template_without_tool_support_falls_back_with_one_notice(caplog):
    tokenizer = build_tiny_tokenizer()  # ChatML template: no `tools`
    conversations = load_records([OPENAI]).conversations
    with caplog.at_level(logging.WARNING, logger="tunesmith.data.render"):
        examples, stats = render_dataset(tokenizer, conversations, max_seq_len=4096)
    notices = [r.getMessage() for r in caplog.records if "no tool support" in r.getMessage()]
    assert len(notices) == 1 and notices[0].startswith("3 conversation(s)") and stats.tool_fallback == 3
    assert stats.notices == notices and stats.examples_out == 4
    full = tokenizer.decode(examples[1].input_ids)
    assert "<tools>" in full and "<|im_start|>user\n<tool_response>" in full and "<|im_start|>tool" not in full
    oslo = '{"name": "get_current_weather", "arguments": {"location": "Oslo, Norway"}}'
    helsinki = '{"name": "get_current_weather", "arguments": {"location": "Helsinki, Finland"}}'
    assert labelled_text(tokenizer, examples[1]) == (  # the same trained text as with template support
        f"Let me check both cities.\n<tool_call>\n{oslo}\n</tool_call>\n<tool_call>\n{helsinki}\n</tool_call>"
        "<|im_end|>\nHelsinki is colder: -7 °C against -3 °C in Oslo.<|im_end|>\n")


@pytest.mark.parametrize("path,index,expected", [
    (FIXTURES / "axolotl_sharegpt_weights.jsonl", 0, "Buongiorno.<|im_end|>\n"),
    (OPENAI, 2, "Paris, as if everyone doesn't know that already.<|im_end|>\n"),
])
def test_weight_zero_turns_carry_no_loss(path, index, expected):
    tokenizer = build_tiny_tokenizer()
    example = render_example(tokenizer, load_records([path]).conversations[index])
    assert labelled_text(tokenizer, example) == expected


# ------------------------------------------------------------------------------------ counts and prepare
@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.name)
def test_counts_identity_holds_for_every_fixture(path):
    columns = {"prompt": "question", "response": "answer"} if "columns" in path.name else {}
    manifest = check([str(path)], PrepareOptions(columns=columns, **FAST))
    records = sum(1 for _ in iter_file_records(path))
    assert manifest.input == records and manifest.identity["holds"], manifest.identity
    assert manifest.kept + manifest.quarantined == records  # no dedup here: every record kept or explained
    assert sum(manifest.quarantine_reasons.values()) == manifest.quarantined


def test_prepared_splits_keep_tools_and_calls(tmp_path):
    manifest = prepare([str(TOOLS), str(OPENAI)], tmp_path / "out", PrepareOptions(split="1.0", **FAST))
    rows = [json.loads(line) for line in Path(manifest.splits["train"].path).read_text().splitlines()]
    assert len(rows) == manifest.kept == 8 and manifest.tool_conversations == 7
    assert sum("tools" in r for r in rows) == 7
    assert sum(1 for r in rows for m in r["messages"] if m.get("tool_calls")) == 4 + 3  # calling turns in the files
    assert "Conversations with tools or tool calls: 7." in (tmp_path / "out" / "report.md").read_text()


def test_lengths_measure_tool_conversations_as_training_renders_them(tool_tokenizer):
    from tunesmith.data import lengths

    conversations = load_records([OPENAI]).conversations
    measured, unit = lengths.token_lengths(conversations, tool_tokenizer)
    assert measured == [len(render_example(tool_tokenizer, c).input_ids) for c in conversations]
    words, _ = lengths.token_lengths(conversations)
    assert words[0] > len(conversations[0].messages[0]["content"].split())  # the call's JSON counts too


def test_cli_convert_between_dialects(tmp_path, capsys):
    from tunesmith.cli import main

    out = tmp_path / "messages.jsonl"
    assert main(["data", "convert", str(TOOLS), "--to", "messages", "--out", str(out)]) == 1  # one record skipped
    err = capsys.readouterr().err
    assert f"skipped {TOOLS}:5 field 'conversations[1].value'" in err and "wrote 4 records" in err
    back = tmp_path / "sharegpt.jsonl"
    assert main(["data", "convert", str(out), "--to", "sharegpt", "--out", str(back)]) == 0
    assert [c.canonical() for c in load_records([back]).conversations] == \
        [c.canonical() for c in load_records([TOOLS]).conversations]
