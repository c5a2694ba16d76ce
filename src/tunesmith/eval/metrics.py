"""Task metrics: a registry of per-example scorers, aggregated by mean.

A metric is `fn(prediction, reference, source, **options) -> float | None`: one score in [0, 1] per example,
or None when the metric does not apply to that example (e.g. field F1 when the reference is not JSON;
hallucination rate when the prediction is not JSON). `score()` averages the non-None values and reports how
many examples were scored and skipped per metric, so every count adds up to n.

Options (passed by keyword to every metric; each takes what it needs):
- `schema`: a JSON schema (dict, or a path to a .json file) for `json_schema`.
- `closed_fields`: key names (or dotted paths) whose values come from a closed label set (e.g. clause_type);
  `hallucination_rate` ignores them, since a label is not expected to appear in the source text.
- `label_field`: for `accuracy`, compare this field of JSON outputs instead of the whole text.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tunesmith.errors import UsageError

MetricFn = Callable[..., float | None]
METRICS: dict[str, MetricFn] = {}


class MetricError(UsageError):
    """A metric was named that does not exist, or was called without an option it needs."""


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    def decorator(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return decorator


# ------------------------------------------------------------------------------------------ normalisers
_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")
# Unsigned: a hyphen in "2024-01-15" or "5-10" is not a minus sign; signs are compared away (abs) instead.
_NUMBER_IN_TEXT = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.?\d+")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def parse_json(text: str) -> Any | None:
    """The JSON object or array in `text` (bare, or alone in a ``` / ```json fence); None if there is none.

    Scalars ("42", "true") do not count: these metrics are for structured outputs.
    """
    match = _FENCE.match(text)
    candidate = match.group(1) if match else text
    try:
        value = json.loads(candidate)
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, (dict, list)) else None


def squad_tokens(text: str) -> list[str]:
    """SQuAD normalisation: lowercase, drop punctuation and articles, split on whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return _ARTICLES.sub(" ", text).split()


def normalize_value(value: Any) -> str:
    """Canonical text of a JSON leaf: numbers without trailing zeros, strings lowercased and whitespace-collapsed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return _number_text(float(value))
    number = parse_number(value)
    if number is not None:
        return _number_text(number)
    return normalize_whitespace(str(value).lower()).strip(" .,;:")


def _number_text(number: float) -> str:
    if math.isfinite(number) and number == int(number):
        return str(int(number))
    return repr(number)


def parse_number(text: Any) -> float | None:
    """'$1,250,000.00' -> 1250000.0; None for text that is not a single number (currency signs and % allowed)."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    cleaned = text.strip().strip("$€£%").replace(",", "").strip()
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", cleaned):
        return None
    return float(cleaned)


def flatten_json(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Key path → normalised leaf value pairs. Lists are flattened to their items under the same path (order
    ignored); nested objects join keys with '.'. Empty strings and empty containers carry no field.

    {"parties": ["Acme", "Bob"], "term": {"months": 12}} -> [("parties","acme"), ("parties","bob"), ("term.months","12")]
    """
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, child in value.items():
            pairs.extend(flatten_json(child, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        for child in value:
            pairs.extend(flatten_json(child, prefix))
    elif not (isinstance(value, str) and not value.strip()):
        pairs.append((prefix, normalize_value(value)))
    return pairs


def leaf_values(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(key path, raw leaf) for every string and number leaf (booleans and nulls are not claims about the source)."""
    leaves: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, child in value.items():
            leaves.extend(leaf_values(child, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        for child in value:
            leaves.extend(leaf_values(child, prefix))
    elif isinstance(value, str) and value.strip() or isinstance(value, (int, float)) and not isinstance(value, bool):
        leaves.append((prefix, value))
    return leaves


# ------------------------------------------------------------------------------------------- metrics
@register_metric("exact_match")
def exact_match(prediction: str, reference: str, source: str = "", **_: Any) -> float:
    """1 if equal after whitespace normalisation; when the reference is JSON, 1 if both parse to equal JSON."""
    expected = parse_json(reference)
    if expected is not None:
        return float(parse_json(prediction) == expected)
    return float(normalize_whitespace(prediction) == normalize_whitespace(reference))


@register_metric("token_f1")
def token_f1(prediction: str, reference: str, source: str = "", **_: Any) -> float:
    """SQuAD token F1: overlap = |pred ∩ ref| (multiset); P = overlap/|pred|, R = overlap/|ref|, F1 = 2PR/(P+R)."""
    predicted, expected = squad_tokens(prediction), squad_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def _label(text: str, label_field: str | None) -> str | None:
    if label_field:
        value = parse_json(text)
        if not isinstance(value, dict) or label_field not in value:
            return None
        text = str(value[label_field])
    return normalize_whitespace(text).strip().rstrip(".").lower()


@register_metric("accuracy")
def accuracy(prediction: str, reference: str, source: str = "", label_field: str | None = None, **_: Any) -> float | None:
    """Classification: 1 if the labels match case-insensitively (a trailing period ignored). With `label_field`,
    the label is that field of the JSON output; None if the reference lacks it, 0 if the prediction does."""
    expected = _label(reference, label_field)
    if expected is None:
        return None
    return float(_label(prediction, label_field) == expected)


@register_metric("json_valid")
def json_valid(prediction: str, reference: str = "", source: str = "", **_: Any) -> float:
    """1 if the prediction is a JSON object or array (bare or in a ```json fence)."""
    return float(parse_json(prediction) is not None)


def _load_schema(schema: Any) -> dict[str, Any]:
    if schema is None:
        raise MetricError("metric 'json_schema' needs a schema: pass schema=<dict or path to a .json file>")
    if isinstance(schema, (str, Path)):
        path = Path(schema)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise MetricError(f"json_schema: schema file {path} not found") from exc
        except json.JSONDecodeError as exc:
            raise MetricError(f"json_schema: {path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    return schema


_VALIDATORS: dict[str, Any] = {}


def _validator(schema: dict[str, Any]):
    import jsonschema

    key = json.dumps(schema, sort_keys=True)
    if key not in _VALIDATORS:
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise MetricError(f"json_schema: the schema itself is invalid: {exc.message}") from exc
        _VALIDATORS[key] = cls(schema)
    return _VALIDATORS[key]


@register_metric("json_schema")
def json_schema(prediction: str, reference: str = "", source: str = "", schema: Any = None, **_: Any) -> float:
    """1 if the prediction parses as JSON and validates against `schema` (any draft jsonschema knows)."""
    validator = _validator(_load_schema(schema))
    value = parse_json(prediction)
    return float(value is not None and validator.is_valid(value))


def field_scores(prediction: str, reference: str) -> tuple[float, float, float] | None:
    """(precision, recall, F1) over flattened (path, value) pairs as multisets; None if the reference is not JSON.

    An unparseable prediction has no fields. With no predicted fields precision is 1 if the reference has none
    either, else 0 (nothing claimed, nothing found); same rule for recall with no reference fields.
    """
    expected_json = parse_json(reference)
    if expected_json is None:
        return None
    predicted_json = parse_json(prediction)
    predicted = Counter(flatten_json(predicted_json) if predicted_json is not None else [])
    expected = Counter(flatten_json(expected_json))
    overlap = sum((predicted & expected).values())
    n_pred, n_ref = sum(predicted.values()), sum(expected.values())
    if n_pred == 0 and n_ref == 0:
        return 1.0, 1.0, 1.0
    precision = overlap / n_pred if n_pred else 0.0
    recall = overlap / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


@register_metric("field_precision")
def field_precision(prediction: str, reference: str, source: str = "", **_: Any) -> float | None:
    scores = field_scores(prediction, reference)
    return None if scores is None else scores[0]


@register_metric("field_recall")
def field_recall(prediction: str, reference: str, source: str = "", **_: Any) -> float | None:
    scores = field_scores(prediction, reference)
    return None if scores is None else scores[1]


@register_metric("field_f1")
def field_f1(prediction: str, reference: str, source: str = "", **_: Any) -> float | None:
    scores = field_scores(prediction, reference)
    return None if scores is None else scores[2]


def _is_closed(path: str, closed_fields: Iterable[str]) -> bool:
    last = path.rsplit(".", 1)[-1]
    return any(path == name or last == name for name in closed_fields)


def value_in_source(value: Any, source: str) -> bool:
    """Is this leaf grounded in the source? Numbers match any number in the source numerically ('$1,000' vs
    '1000.00'); text matches as a whole-word phrase after lowercasing and turning punctuation into spaces."""
    number = parse_number(value)
    if number is not None:
        found = {float(m.replace(",", "")) for m in _NUMBER_IN_TEXT.findall(source)}
        if abs(number) in found:
            return True
    words = _NON_ALNUM.sub(" ", str(value).lower()).strip()
    if not words:
        return True  # pure punctuation claims nothing
    return f" {words} " in f" {_NON_ALNUM.sub(' ', source.lower()).strip()} "


def hallucinated_values(prediction: str, source: str, closed_fields: Iterable[str] = ()) -> list[tuple[str, Any]] | None:
    """The prediction's string/number leaves (outside closed fields) not found in the source; None if not JSON."""
    value = parse_json(prediction)
    if value is None:
        return None
    closed = list(closed_fields)
    return [(path, leaf) for path, leaf in leaf_values(value) if not _is_closed(path, closed)
            and not value_in_source(leaf, source)]


@register_metric("hallucination_rate")
def hallucination_rate(prediction: str, reference: str = "", source: str = "",
                       closed_fields: Iterable[str] = (), **_: Any) -> float | None:
    """Share of the prediction's open leaf values absent from the source: |not found| / |leaves|; 0 with no leaves.

    A prediction that is not JSON returns None: it is counted under `skipped` rather than as 0 (which would
    reward broken output) or 1 (which would mix formatting failures, already measured by json_valid, into
    grounding).
    """
    value = parse_json(prediction)
    if value is None:
        return None
    closed = list(closed_fields)
    leaves = [leaf for path, leaf in leaf_values(value) if not _is_closed(path, closed)]
    if not leaves:
        return 0.0
    return sum(not value_in_source(leaf, source) for leaf in leaves) / len(leaves)


# ------------------------------------------------------------------------------------------- scoring
def check_metric_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(sorted(METRICS))}")
    return names


def score(predictions: list[str], references: list[str], sources: list[str], names: Iterable[str],
          **options: Any) -> dict[str, Any]:
    """Score every example with every named metric; aggregate each metric by the mean over examples it applies to.

    Returns {"metrics": {name: mean or None}, "per_example": [{name: value}], "scored": {name: n},
    "skipped": {name: n}} with scored + skipped = len(predictions) for every metric.
    """
    names = check_metric_names(names)
    if not len(predictions) == len(references) == len(sources):
        raise ValueError(
            f"score: {len(predictions)} predictions, {len(references)} references, {len(sources)} sources differ"
        )
    per_example = [
        {name: METRICS[name](p, r, s, **options) for name in names}
        for p, r, s in zip(predictions, references, sources, strict=True)
    ]
    metrics, scored, skipped = {}, {}, {}
    for name in names:
        values = [row[name] for row in per_example if row[name] is not None]
        metrics[name] = sum(values) / len(values) if values else None
        scored[name], skipped[name] = len(values), len(per_example) - len(values)
    return {"metrics": metrics, "per_example": per_example, "scored": scored, "skipped": skipped}
