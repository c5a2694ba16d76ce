"""PII and secrets: find, count by type, redact with typed placeholders. Values are never stored or reported.

Detectors (in priority order; a later detector ignores text an earlier one already claimed):
- API_KEY: known key prefixes (OpenAI `sk-`, Anthropic `sk-ant-`, GitHub `ghp_`/`gho_`/`ghs_`/`github_pat_`,
  AWS `AKIA`, Slack `xox?-`, Google `AIza`, Hugging Face `hf_`, GitLab `glpat-`, Stripe `sk_live_`, PEM keys).
- EMAIL: local@domain.tld.
- CREDIT_CARD: 13–19 digits (spaces/dashes allowed) passing the Luhn check.
- IBAN: country code, 2 check digits, 11–30 alphanumerics, passing ISO 13616 mod-97 (remainder 1).
- SSN: US NNN-NN-NNNN outside the never-issued ranges (area 000, 666, 900–999; group 00; serial 0000).
- IP_ADDRESS: IPv4 / IPv6 literals that `ipaddress` accepts.
- PHONE: 10–15 digits with optional +country code, brackets and separators.
- SECRET: other tokens of >= 20 characters mixing letters and digits with Shannon entropy > 4 bits/character
  (above what hex can reach, so hashes and UUIDs are not flagged).
Hand-written because the libraries that do this (presidio, scrubadub) pull spaCy models we cannot download here.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable

TYPES = ("API_KEY", "EMAIL", "CREDIT_CARD", "IBAN", "SSN", "IP_ADDRESS", "PHONE", "SECRET")

_API_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\b(?:sk-ant-[A-Za-z0-9_\-]{20,}|sk-(?:proj-)?[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}|A(?:KIA|SIA)[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9\-]{10,}"
    r"|AIza[0-9A-Za-z_\-]{35}|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_\-]{20}|[sr]k_live_[A-Za-z0-9]{16,})"
)
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+\-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)")
_TOKEN = re.compile(r"[A-Za-z0-9+/_\-]{20,}={0,2}")


def luhn_valid(number: str) -> bool:
    """Luhn mod-10: double every second digit from the right (minus 9 if > 9); the sum must end in 0."""
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 2:
        return False
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616: move the first 4 characters to the end, letters -> 10..35, the number mod 97 must be 1."""
    compact = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def shannon_entropy(token: str) -> float:
    """H = -Σ p(c) log2 p(c) over the token's characters, in bits per character."""
    counts = Counter(token)
    return -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())


def _card(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _ssn(match: re.Match) -> bool:
    area, group, serial = match.groups()
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _ip(match: re.Match) -> bool:
    text = match.group()
    if ":" in text and not re.search(r"[0-9A-Fa-f]", text):
        return False  # "::" or ":::" is punctuation, not an address worth flagging
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _phone(match: re.Match) -> bool:
    return 10 <= sum(c.isdigit() for c in match.group()) <= 15


def _secret(match: re.Match) -> bool:
    token = match.group()
    has_letter, has_digit = re.search(r"[A-Za-z]", token), re.search(r"\d", token)
    return bool(has_letter and has_digit) and shannon_entropy(token) > 4.0


_DETECTORS: list[tuple[str, re.Pattern, Callable[[re.Match], bool] | None]] = [
    ("API_KEY", _API_KEY, None),
    ("EMAIL", _EMAIL, None),
    ("CREDIT_CARD", _CARD, _card),
    ("IBAN", _IBAN, lambda m: iban_valid(m.group())),
    ("SSN", _SSN, _ssn),
    ("IP_ADDRESS", _IPV4, _ip),
    ("IP_ADDRESS", _IPV6, _ip),
    ("PHONE", _PHONE, _phone),
    ("SECRET", _TOKEN, _secret),
]


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """Non-overlapping (type, start, end) spans, sorted by start."""
    spans: list[tuple[str, int, int]] = []
    for kind, pattern, accept in _DETECTORS:
        for match in pattern.finditer(text):
            start, end = match.span()
            if any(start < e and s < end for _, s, e in spans):
                continue
            if accept is None or accept(match):
                spans.append((kind, start, end))
    return sorted(spans, key=lambda span: span[1])


def redact(text: str, spans: list[tuple[str, int, int]] | None = None) -> str:
    """Replace each span with its typed placeholder, e.g. "mail me at [EMAIL]"."""
    spans = find_pii(text) if spans is None else spans
    for kind, start, end in sorted(spans, key=lambda span: -span[1]):
        text = text[:start] + f"[{kind}]" + text[end:]
    return text


def scan_messages(messages: list[dict[str, str]], mode: str = "report") -> tuple[list[dict[str, str]], Counter]:
    """Count PII by type in every turn; with mode "redact" return the turns redacted (else unchanged)."""
    counts: Counter = Counter()
    out = []
    for message in messages:
        spans = find_pii(message["content"])
        counts.update(kind for kind, _, _ in spans)
        content = redact(message["content"], spans) if mode == "redact" and spans else message["content"]
        out.append({**message, "content": content})
    return out, counts
