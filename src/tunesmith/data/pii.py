"""PII and secrets: find, count by type, redact only the detected span with a typed placeholder. Values are never
stored or reported.

Secrets are detected by **known formats**, through the maintained detectors of Yelp's `detect-secrets` (its
regex plugins for AWS, GitHub, GitLab, Slack, Stripe, OpenAI (legacy), SendGrid, Twilio, npm, PyPI, Discord,
Telegram, Azure, Mailchimp, JWT, basic-auth URLs, and its keyword patterns for `password = ...`-style
assignments), plus the formats it lacks (below, marked). Entropy is never a detector on its own — it produced the
old false positives on URLs (`https://www.bbc.[SECRET]`) — only a second signal for a value assigned to a
secret-sounding key, next to detect-secrets' own heuristic filters (templates, `$VARS`, indirect references like
`os.environ[...]`, UUIDs, sequences).

Types, in priority order (a later detector ignores text an earlier one already claimed):
- PRIVATE_KEY: a whole PEM/OpenSSH private-key block (detect-secrets matches only the header line).
- JWT: three base64url parts whose first two decode to JSON (detect-secrets' validity check).
- API_KEY: vendor token formats.
- SECRET: the password of a `scheme://user:password@host` URL; a value assigned to a secret-sounding key
  (`password`, `secret`, `api_key`, `access_token`, ...) that passes the filters and has >= 8 characters, two
  character classes and Shannon entropy >= 3 bits/character.
- EMAIL, CREDIT_CARD (Luhn), IBAN (mod-97), SSN (issued ranges), IP_ADDRESS (`ipaddress`; not after a version cue
  like `v`, `version`, `==`), PHONE (a `+` country code, brackets, or >= 2 separators between 10-15 digits; a bare
  run of digits is a number, not a phone; not inside arithmetic).
PII detectors skip URL paths/queries, data URLs and file paths (where digit runs are ids, not phone numbers); the
secret detectors scan them (a token in a query string is still a token).
PII detection is hand-written because the libraries that do it (presidio, scrubadub) need spaCy models that cannot
be downloaded here.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from typing import Any

TYPES = ("PRIVATE_KEY", "JWT", "API_KEY", "SECRET", "EMAIL", "CREDIT_CARD", "IBAN", "SSN", "IP_ADDRESS", "PHONE")
Span = tuple[str, int, int]

# ------------------------------------------------------------------------------------------- secrets
_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
                          r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_JWT = re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_\-]+\.eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
# Formats detect-secrets 1.5 lacks: current OpenAI (`sk-proj-`, `sk-svcacct-`; its plugin knows only legacy keys),
# Anthropic, Hugging Face, Google API keys, GitHub fine-grained tokens.
_EXTRA_KEYS = re.compile(r"(?<![\w-])(?:sk-ant-[A-Za-z0-9_\-]{32,}|sk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{32,}"
                         r"|hf_[A-Za-z0-9]{30,}|AIza[0-9A-Za-z_\-]{35}|github_pat_[A-Za-z0-9_]{60,})(?![\w-])")
_DS_PLUGINS = {"aws": "AWSKeyDetector", "github_token": "GitHubTokenDetector", "gitlab_token": "GitLabTokenDetector",
               "openai": "OpenAIDetector", "slack": "SlackDetector", "stripe": "StripeDetector",
               "sendgrid": "SendGridDetector", "twilio": "TwilioKeyDetector", "npm": "NpmDetector",
               "pypi_token": "PypiTokenDetector", "discord": "DiscordBotTokenDetector",
               "telegram_token": "TelegramBotTokenDetector", "azure_storage_key": "AzureStorageKeyDetector",
               "mailchimp": "MailchimpDetector"}  # module of detect_secrets.plugins -> plugin class
# Left out: ArtifactoryDetector (`AP[0-9A-F]` + 8 letters matches ordinary capitalised words), IPPublicDetector
# (IP_ADDRESS below), HighEntropyString plugins (entropy alone: the URL false positives this module used to make),
# PrivateKeyDetector and JwtTokenDetector (their spans are partial; their logic is reused above/below).


@lru_cache(maxsize=1)
def _vendor_patterns() -> list[tuple[re.Pattern, int]]:
    """(compiled pattern, group holding the secret) of every detect-secrets regex plugin used."""
    import importlib

    out = []
    for module, name in _DS_PLUGINS.items():
        plugin = getattr(importlib.import_module(f"detect_secrets.plugins.{module}"), name)
        for pattern in plugin.denylist:
            # npm's pattern captures the token in group 1, AWS's assignment pattern its 40-character secret key;
            # elsewhere a group is part of the format (GitLab's optional prefix), so the whole match is the secret.
            group = 1 if name == "NpmDetector" or (name == "AWSKeyDetector" and pattern.groups) else 0
            out.append((pattern, group))
    return out


@lru_cache(maxsize=1)
def _basic_auth() -> re.Pattern:
    from detect_secrets.plugins.basic_auth import BasicAuthDetector

    return BasicAuthDetector.denylist[0]


@lru_cache(maxsize=1)
def _assignment_patterns() -> list[tuple[re.Pattern, int]]:
    """detect-secrets' keyword-assignment patterns (config style, unquoted allowed; and code style, quoted), plus
    token keys, which its keyword list lacks."""
    from detect_secrets.plugins import keyword

    patterns = list(keyword.CONFIG_DENYLIST_REGEX_TO_GROUP.items())
    patterns += list(keyword.QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP.items())
    token = re.compile(r"(?<![\w-])[\"']?(?:(?:access|auth|api|bearer|refresh|session|secret|private|client)[_-]?)?"
                       r"token[\"']?\s*(?::|=|:=|=>)\s*[\"']?([A-Za-z0-9_\-+/=.~]{8,})", re.IGNORECASE)
    return [*patterns, (token, 1)]


@lru_cache(maxsize=1)
def _keyword_hint() -> re.Pattern:
    """Any secret-sounding key: the assignment patterns (slow: one per assignment style) run only on lines with one."""
    from detect_secrets.plugins import keyword

    keys = "|".join([*keyword.DENYLIST, "token"])
    return re.compile(rf"(?:{keys})[\w'\"\]\s]{{0,8}}(?:[:=]|=>)|[=!]=\s*['\"]", re.IGNORECASE)


# Substrings every key of detect-secrets' keyword list (and "token") contains: a cheap test before the hint regex.
_KEY_WORDS = ("key", "pass", "pwd", "secret", "token", "contrase")
_PLACEHOLDER_WORDS = ("example", "your", "here", "xxxx", "changeme", "placeholder", "redacted", "dummy", "fake",
                      "sample", "****", "<", ">", "{", "}", "[", "]")


def _clean(value: str) -> str:
    """An assigned value without surrounding whitespace, quotes and separators."""
    return value.strip().strip("\"'`;,")


def _credential_value(value: str, line: str) -> bool:
    """Second signal for a value assigned to a secret-sounding key: not a template, reference or placeholder, and
    random-looking (>= 8 characters, >= 2 character classes, Shannon entropy >= 3 bits/character)."""
    from detect_secrets.filters import heuristic

    value = _clean(value)
    if len(value) < 8 or any(word in value.lower() for word in _PLACEHOLDER_WORDS) or "://" in value:
        return False
    if heuristic.is_templated_secret(value) or heuristic.is_prefixed_with_dollar_sign(value) \
            or heuristic.is_sequential_string(value) or heuristic.is_potential_uuid(value) \
            or heuristic.is_not_alphanumeric_string(value) or heuristic.is_indirect_reference(line):
        return False
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    return classes >= 2 and shannon_entropy(value) >= 3.0


def _secret_spans(text: str) -> list[Span]:
    found: list[Span] = [("PRIVATE_KEY", *m.span()) for m in _PRIVATE_KEY.finditer(text)]
    found += [("JWT", *m.span()) for m in _JWT.finditer(text) if _jwt_valid(m.group())]
    found += [("API_KEY", *m.span()) for m in _EXTRA_KEYS.finditer(text)]
    for pattern, group in _vendor_patterns():
        for m in pattern.finditer(text):
            if m.group(group):
                start, end = m.span(group)
                key_name = re.match(r"[A-Za-z_]+=", m.group(group))  # Azure's `AccountKey=`: keep the name
                found.append(("API_KEY", start + (key_name.end() if key_name else 0), end))
    found += [("SECRET", *m.span(1)) for m in _basic_auth().finditer(text)]
    if not any(word in text.lower() for word in _KEY_WORDS):
        return found
    for line_match in re.finditer(r"[^\n]+", text):
        line, offset = line_match.group(), line_match.start()
        if not any(word in line.lower() for word in _KEY_WORDS) or not _keyword_hint().search(line):
            continue
        for pattern, group in _assignment_patterns():
            for m in pattern.finditer(line):
                value = m.group(group)
                if value and _credential_value(value, line):
                    clean = _clean(value)
                    start = offset + m.start(group) + value.index(clean)
                    found.append(("SECRET", start, start + len(clean)))
    return found


def _jwt_valid(token: str) -> bool:
    from detect_secrets.plugins.jwt import JwtTokenDetector

    return JwtTokenDetector.is_formally_valid(token)


# ----------------------------------------------------------------------------------------------- PII
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d-]|[.,]\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+\-.,/])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}"
                    r"(?!\w|[.,:]\d)")
_DATE = re.compile(r"\b(?:19|20)\d\d[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])\b")
_VERSION_CUE = re.compile(r"(?:\b(?:v|ver|version|release|build|chrome|firefox|python|node)\.?\s*|[=~<>!]=\s*|@)$",
                          re.IGNORECASE)
_MATH_BEFORE = re.compile(r"(?:[+\-*/×÷^]|[\d)]\s*=)\s*$")
_MATH_AFTER = re.compile(r"^\s*[+\-*/×÷^=]\s*[\d(]")
# Where PII detectors do not look: URL paths and queries (the host stays visible), data URLs, file paths.
_PROTECTED = re.compile(r"(?:https?|ftp)://[^\s/?#<>\"')\]]+([^\s<>\"')\]]*)|data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+"
                        r"|(?<![\w/])(?:[A-Za-z]:\\|~?/|\.{1,2}/)?(?:[\w.@-]+[/\\]){2,}[\w.@-]*")


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


def _in_math(match: re.Match) -> bool:
    text = match.string
    return bool(_MATH_BEFORE.search(text[max(0, match.start() - 12): match.start()])
                or _MATH_AFTER.search(text[match.end(): match.end() + 12]))


def _card(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 13 <= len(digits) <= 19 and luhn_valid(digits) and not _in_math(match)


def _ssn(match: re.Match) -> bool:
    area, group, serial = match.groups()
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _ip(match: re.Match) -> bool:
    text = match.group()
    if ":" in text and not re.search(r"[0-9A-Fa-f]", text):
        return False  # "::" or ":::" is punctuation, not an address worth flagging
    if ":" not in text and _VERSION_CUE.search(match.string[max(0, match.start() - 12): match.start()]):
        return False  # v1.2.3.4, version 10.0.0.1, pkg==1.2.3.4: a version, not an address
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _phone(match: re.Match) -> bool:
    text = match.group()
    structured = text.startswith("+") or "(" in text or len(re.findall(r"\d[ .-]\d", text)) >= 2
    return structured and not _DATE.search(text) and 10 <= sum(c.isdigit() for c in text) <= 15 and not _in_math(match)


_PII: list[tuple[str, re.Pattern, Callable[[re.Match], bool] | None]] = [
    ("EMAIL", _EMAIL, None),
    ("CREDIT_CARD", _CARD, _card),
    ("IBAN", _IBAN, lambda m: iban_valid(m.group())),
    ("SSN", _SSN, _ssn),
    ("IP_ADDRESS", _IPV4, _ip),
    ("IP_ADDRESS", _IPV6, _ip),
    ("PHONE", _PHONE, _phone),
]


def _protected(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _PROTECTED.finditer(text):
        spans.append(m.span(1) if m.group(1) is not None else m.span())
    return spans


def _overlaps(start: int, end: int, spans) -> bool:
    return any(start < e and s < end for s, e in spans)


def find_pii(text: str) -> list[Span]:
    """Non-overlapping (type, start, end) spans, sorted by start: secrets first (by priority), then PII."""
    spans: list[Span] = []
    for kind, start, end in sorted(_secret_spans(text), key=lambda s: (TYPES.index(s[0]), s[1], -s[2])):
        if end > start and not _overlaps(start, end, [(s, e) for _, s, e in spans]):
            spans.append((kind, start, end))
    protected = _protected(text)
    for kind, pattern, accept in _PII:
        for match in pattern.finditer(text):
            start, end = match.span()
            if _overlaps(start, end, [(s, e) for _, s, e in spans]) or _overlaps(start, end, protected):
                continue
            if accept is None or accept(match):
                spans.append((kind, start, end))
    return sorted(spans, key=lambda span: span[1])


def placeholder(kind: str) -> str:
    return f"[{kind}]"


def redact(text: str, spans: list[Span] | None = None) -> str:
    """Replace each span (only the span) with its typed placeholder, e.g. "mail me at [EMAIL]"."""
    spans = find_pii(text) if spans is None else spans
    for kind, start, end in sorted(spans, key=lambda span: -span[1]):
        text = text[:start] + placeholder(kind) + text[end:]
    return text


# ----------------------------------------------------------------------------------------- records
def _scan_value(value: Any, path: str, mode: str, findings: list[dict[str, str]]) -> Any:
    """Scan a string, or every string inside a JSON object/list (tool-call arguments); redact in mode "redact"."""
    if isinstance(value, str):
        spans = find_pii(value)
        findings += [{"field": path, "type": kind, "placeholder": placeholder(kind)} for kind, _, _ in spans]
        return redact(value, spans) if mode == "redact" and spans else value
    if isinstance(value, dict):
        return {k: _scan_value(v, f"{path}.{k}", mode, findings) for k, v in value.items()}
    if isinstance(value, list):
        return [_scan_value(v, f"{path}[{i}]", mode, findings) for i, v in enumerate(value)]
    return value


def _scan_arguments(arguments: Any, path: str, mode: str, findings: list[dict[str, str]]) -> Any:
    """Arguments given as a JSON string are scanned as data (so the JSON stays valid) and written back compactly
    only when something was redacted."""
    if not isinstance(arguments, str):
        return _scan_value(arguments, path, mode, findings)
    before = len(findings)
    scanned = _scan_value(json.loads(arguments), path, mode, findings)
    return json.dumps(scanned, ensure_ascii=False) if mode == "redact" and len(findings) > before else arguments


def scan_messages(messages: list[dict[str, Any]], mode: str = "report", field_name: str = "messages",
                  ) -> tuple[list[dict[str, Any]], Counter, list[dict[str, str]]]:
    """(turns, counts by type, findings) over every turn's content and tool-call arguments. Each finding names the
    field and the placeholder, never the value; with mode "redact" the turns come back redacted (else unchanged)."""
    findings: list[dict[str, str]] = []
    out = []
    for i, message in enumerate(messages):
        turn = {**message, "content": _scan_value(message["content"], f"{field_name}[{i}].content", mode, findings)}
        if message.get("tool_calls"):
            turn["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": _scan_arguments(
                    call["function"]["arguments"], f"{field_name}[{i}].tool_calls[{k}].function.arguments", mode,
                    findings)}}
                for k, call in enumerate(message["tool_calls"])]
        out.append(turn)
    return out, Counter(f["type"] for f in findings), findings
