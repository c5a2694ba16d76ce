"""Metric functions against values computed by hand (the arithmetic is in each test's comments)."""

from __future__ import annotations

import json

import pytest

from tunesmith.eval import metrics as m

SOURCE = "This Agreement between Acme Corp. and Bob Smith LLC is for $1,250,000.00 over twelve (12) months from 2024-01-15."


def test_exact_match_whitespace_and_json():
    assert m.exact_match("  Paris\n is  big ", "Paris is big") == 1.0
    assert m.exact_match("paris is big", "Paris is big") == 0.0  # case matters; only whitespace is normalised
    # JSON references compare parsed values: key order and spacing do not matter, a fence is allowed
    assert m.exact_match('```json\n{"b": 2, "a": [1, "x"]}\n```', '{"a":[1,"x"],"b":2}') == 1.0
    assert m.exact_match('{"a": [1, "x"], "b": 3}', '{"a":[1,"x"],"b":2}') == 0.0
    assert m.exact_match("not json", '{"a": 1}') == 0.0


def test_token_f1_squad_style():
    # pred tokens [cat, sat, on, mat] (article dropped), ref [cat, sat] -> overlap 2, P=2/4, R=2/2, F1=2/3
    assert m.token_f1("The cat sat on the mat.", "a cat sat") == pytest.approx(2 / 3)
    assert m.token_f1("", "") == 1.0
    assert m.token_f1("", "cat") == 0.0
    assert m.token_f1("dog", "cat") == 0.0
    # multiset overlap: pred [a?] -> [x, x, y], ref [x, y, y]: overlap x1 + y1 = 2, P=R=2/3, F1=2/3
    assert m.token_f1("x x y", "x y y") == pytest.approx(2 / 3)


def test_accuracy_labels():
    assert m.accuracy("Positive.", "positive") == 1.0
    assert m.accuracy(" NEGATIVE ", "positive") == 0.0
    ref = json.dumps({"clause_type": "Termination", "party": "Acme"})
    assert m.accuracy('{"clause_type": "termination"}', ref, label_field="clause_type") == 1.0
    assert m.accuracy('{"other": 1}', ref, label_field="clause_type") == 0.0
    assert m.accuracy("x", "plain text reference", label_field="clause_type") is None  # not applicable


def test_json_valid():
    assert m.json_valid('{"a": 1}') == 1.0
    assert m.json_valid('```json\n[1, 2]\n```') == 1.0
    assert m.json_valid('```\n{"a": 1}\n```') == 1.0
    assert m.json_valid('{"a": 1') == 0.0
    assert m.json_valid("42") == 0.0  # a scalar is not a structured output
    assert m.json_valid('Sure! {"a": 1}') == 0.0  # text around the JSON is not allowed (only a fence)


def test_json_schema(tmp_path):
    schema = {"type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}
    assert m.json_schema('{"amount": 5}', schema=schema) == 1.0
    assert m.json_schema('{"amount": "5"}', schema=schema) == 0.0
    assert m.json_schema('{"other": 5}', schema=schema) == 0.0
    assert m.json_schema("nope", schema=schema) == 0.0
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    assert m.json_schema('{"amount": 5}', schema=str(path)) == 1.0
    with pytest.raises(m.MetricError, match="needs a schema"):
        m.json_schema('{"amount": 5}')
    with pytest.raises(m.MetricError, match="schema itself is invalid"):
        m.json_schema("{}", schema={"type": "no-such-type"})


def test_flatten_and_field_scores():
    value = {"parties": ["Acme Corp.", "Bob"], "term": {"months": 12.0}, "note": ""}
    assert sorted(m.flatten_json(value)) == [("parties", "acme corp"), ("parties", "bob"), ("term.months", "12")]
    ref = '{"parties": ["acme corp", "Bob Smith"], "amount": "$1,250,000", "type": "payment"}'
    pred = '{"parties": ["Acme Corp", "Zed"], "amount": 1250000, "type": "payment", "extra": "x"}'
    # ref pairs: parties/acme corp, parties/bob smith, amount/1250000, type/payment  -> 4
    # pred pairs: parties/acme corp, parties/zed, amount/1250000, type/payment, extra/x -> 5; overlap 3
    p, r, f = m.field_scores(pred, ref)
    assert (p, r) == (pytest.approx(3 / 5), pytest.approx(3 / 4))
    assert f == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m.field_precision(pred, ref) == pytest.approx(0.6)
    assert m.field_recall(pred, ref) == pytest.approx(0.75)
    assert m.field_f1("not json", ref) == 0.0
    assert m.field_f1(pred, "plain text") is None
    assert m.field_scores("{}", "{}") == (1.0, 1.0, 1.0)


def test_hallucination_rate():
    pred = json.dumps({
        "parties": ["Acme Corp", "Bob Smith LLC", "Zeta Inc"],  # Zeta Inc is not in the source
        "amount": 1250000,  # matches $1,250,000.00 numerically
        "months": "12",
        "start": "2024-01-15",
        "clause_type": "payment",  # closed label: excluded
        "fee": "$500",  # not in the source
        "signed": True,  # booleans are not counted
    })
    # open leaves: 3 parties + amount + months + start + fee = 7; not found: Zeta Inc, $500 -> 2/7
    assert m.hallucination_rate(pred, source=SOURCE, closed_fields=["clause_type"]) == pytest.approx(2 / 7)
    # without the closed field, "payment" is an 8th leaf, also absent -> 3/8
    assert m.hallucination_rate(pred, source=SOURCE) == pytest.approx(3 / 8)
    assert [v for _, v in m.hallucinated_values(pred, SOURCE, ["clause_type"])] == ["Zeta Inc", "$500"]
    assert m.hallucination_rate("{}", source=SOURCE) == 0.0
    assert m.hallucination_rate("not json", source=SOURCE) is None
    # whole-word matching: "Acme Co" is not grounded by "Acme Corp."
    assert m.hallucination_rate('{"p": "Acme Co"}', source=SOURCE) == 1.0


def test_score_aggregates_and_counts():
    preds = ['{"a": "x"}', "oops", '{"a": "y"}']
    refs = ['{"a": "x"}', '{"a": "x"}', "free text"]
    sources = ["x", "x", "z"]
    result = m.score(preds, refs, sources, ["exact_match", "json_valid", "field_f1", "hallucination_rate"])
    assert result["metrics"]["exact_match"] == pytest.approx(1 / 3)
    assert result["metrics"]["json_valid"] == pytest.approx(2 / 3)
    # field_f1: example 1 -> 1, example 2 -> 0 (no fields), example 3 -> not applicable
    assert result["metrics"]["field_f1"] == pytest.approx(0.5)
    # hallucination: example 1 -> 0 ("x" in source), example 2 skipped (not JSON), example 3 -> 1 ("y" not in "z")
    assert result["metrics"]["hallucination_rate"] == pytest.approx(0.5)
    for name in result["scored"]:
        assert result["scored"][name] + result["skipped"][name] == 3
    assert result["skipped"]["hallucination_rate"] == 1
    assert result["per_example"][1]["hallucination_rate"] is None
    with pytest.raises(m.MetricError, match="available"):
        m.score(preds, refs, sources, ["exact_mtch"])
