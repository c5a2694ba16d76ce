"""The secrets/PII screen against two corpora (tests/data/fixtures/README.md says where they come from): tricky
negatives (URLs, paths, hashes, UUIDs, base64 images, numbers in math, dates, versions) must give zero findings;
one fake but well-formed value per detector must be found, and redaction must replace only its span."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.data import pii

FIXTURES = Path(__file__).parent / "fixtures"
NEGATIVES = [line for line in (FIXTURES / "secrets_negatives.txt").read_text().splitlines() if line.strip()]
POSITIVES = [json.loads(line) for line in (FIXTURES / "secrets_positives.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("text", NEGATIVES, ids=[t[:40] for t in NEGATIVES])
def test_tricky_negatives_give_zero_findings(text):
    assert [(kind, text[s:e]) for kind, s, e in pii.find_pii(text)] == []
    assert pii.redact(text) == text


@pytest.mark.parametrize("case", POSITIVES, ids=[f"{c['type']}-{c.get('detector', '')}" for c in POSITIVES])
def test_every_positive_is_found_and_only_its_span_redacted(case):
    text = case["text"]
    spans = pii.find_pii(text)
    assert [kind for kind, _, _ in spans] and {kind for kind, _, _ in spans} == {case["type"]}, spans
    assert [text[s:e] for _, s, e in spans] == case["values"]  # exactly the secret, not its key name or a neighbour
    redacted = pii.redact(text, spans)
    for _, start, end in spans:
        assert text[start:end] not in redacted  # the value is gone ...
    kept = [text[spans[i][2]: spans[i + 1][1]] for i in range(len(spans) - 1)]
    kept += [text[: spans[0][1]], text[spans[-1][2]:]]
    assert all(piece in redacted for piece in kept)  # ... and everything around it is untouched
    assert f"[{case['type']}]" in redacted


def test_every_type_has_a_positive():
    assert {c["type"] for c in POSITIVES} == set(pii.TYPES)


def test_urls_in_an_alpaca_file_survive_the_default_screen():
    """The field report: `https://www.bbc.[SECRET]` under the default --pii redact."""
    from tunesmith.data.readers import load_records

    loaded = load_records([FIXTURES / "alpaca_urls.jsonl"])
    for conversation in loaded.conversations:
        redacted, counts, findings = pii.scan_messages(conversation.messages, "redact")
        for before, after in zip(conversation.messages, redacted, strict=True):
            for url in (w for w in before["content"].split() if "://" in w):
                assert url in after["content"]
    contact = loaded.conversations[-1]
    _, counts, _ = pii.scan_messages(contact.messages, "redact")
    assert counts == {"EMAIL": 1, "PHONE": 1}  # the one record with real PII still has it found


def test_tool_call_arguments_are_screened_and_stay_valid_json():
    messages = [{"role": "user", "content": "mail Bob"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": "send", "arguments": json.dumps({"to": "bob@example.org", "body": "hi"})}}]}]
    redacted, counts, findings = pii.scan_messages(messages, "redact")
    arguments = json.loads(redacted[1]["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"to": "[EMAIL]", "body": "hi"} and counts == {"EMAIL": 1}
    assert findings == [{"field": "messages[1].tool_calls[0].function.arguments.to", "type": "EMAIL",
                         "placeholder": "[EMAIL]"}]
