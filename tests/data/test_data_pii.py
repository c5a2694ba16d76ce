"""PII and secret detectors, the checksums behind them, and redaction with typed placeholders."""

from __future__ import annotations

import pytest

from tunesmith.data import pii


@pytest.mark.parametrize("number,valid", [("4111 1111 1111 1111", True), ("4111 1111 1111 1112", False),
                                          ("79927398713", True), ("79927398710", False),
                                          ("5500-0000-0000-0004", True), ("378282246310005", True)])
def test_luhn(number, valid):
    assert pii.luhn_valid(number) is valid


@pytest.mark.parametrize("iban,valid", [("GB82 WEST 1234 5698 7654 32", True), ("DE89370400440532013000", True),
                                        ("DE89370400440532013001", False), ("FR1420041010050500013M02606", True),
                                        ("XX00", False)])
def test_iban_mod97(iban, valid):
    assert pii.iban_valid(iban) is valid


@pytest.mark.parametrize("text,kind", [
    ("write to jane.doe+x@mail.example.org today", "EMAIL"),
    ("call +1 (555) 123-4567 now", "PHONE"),
    ("call 020 7946 0958 now", "PHONE"),
    ("card 4111-1111-1111-1111 ok", "CREDIT_CARD"),
    ("ssn 123-45-6789 ok", "SSN"),
    ("iban DE89 3704 0044 0532 0130 00 ok", "IBAN"),
    ("host 192.168.10.254 up", "IP_ADDRESS"),
    ("host 2001:db8::8a2e:370:7334 up", "IP_ADDRESS"),
    ("key sk-proj-abcdefghijklmnopqrstuvwxyz123456 ok", "API_KEY"),
    ("aws AKIAIOSFODNN7EXAMPLE ok", "API_KEY"),
    ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789 ok", "API_KEY"),
    ("token: Zx9Qw2Er7Ty4Ui1Op8As5Df3Gh6Jk0Lm ok", "SECRET"),
])
def test_detectors(text, kind):
    spans = pii.find_pii(text)
    assert [s[0] for s in spans] == [kind]
    assert f"[{kind}]" in pii.redact(text)


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 fails Luhn", "ssn 000-12-3456 is never issued", "time 12:30:45 and 1.2.3",
    "version 10.0.0.300 is no address", "git 3f786850e387550fdab836ed7e6dc881de23001b is hex", "year 2024, 12345",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "token Zx9Qw2Er7Ty4Ui1Op8As5Df3Gh6Jk0Lm: a random-looking word alone is not a secret (entropy is only a second "
    "signal, in an assignment)",
])
def test_no_false_positives_on_lookalikes(text):
    assert pii.find_pii(text) == []


def test_scan_messages_counts_and_redacts():
    messages = [{"role": "user", "content": "me: a@b.co, you: c@d.io"},
                {"role": "assistant", "content": "Call 555-123-4567."}]
    redacted, counts, findings = pii.scan_messages(messages, "redact")
    assert counts == {"EMAIL": 2, "PHONE": 1}
    assert findings == [{"field": "messages[0].content", "type": "EMAIL", "placeholder": "[EMAIL]"}] * 2 + [
        {"field": "messages[1].content", "type": "PHONE", "placeholder": "[PHONE]"}]
    assert redacted[0]["content"] == "me: [EMAIL], you: [EMAIL]"
    assert redacted[1]["content"] == "Call [PHONE]."
    unchanged, _, _ = pii.scan_messages(messages, "report")
    assert unchanged == messages
    assert pii.find_pii(redacted[0]["content"]) == []  # placeholders are not re-detected
