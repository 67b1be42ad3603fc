"""Metric correctness on hand-made cases with known answers, malformed predictions included."""

from __future__ import annotations

import math

import pytest

from pipelines.contract import Checker
from pipelines.evaluate import metrics as M
from pipelines.evaluate.judge import parse_score
from pipelines.spec import Contract


def score(contract: dict, preds, refs):
    return M.score(Checker(Contract.model_validate(contract)), preds, refs)


def test_text_exact_normalized_and_token_f1():
    rows, m = score({"type": "text"}, ["The cat sat.", "a dog", "", "red fox jumps"],
                    ["the cat sat", "a dog", "anything", "red fox"])
    assert m["exact_match"] == 0.25  # only "a dog" matches verbatim
    assert m["normalized_match"] == 0.5  # case, punctuation and articles ignored
    assert M.token_f1("red fox jumps", "red fox") == pytest.approx(0.8)  # p=2/3, r=1
    assert m["token_f1"] == pytest.approx((1 + 1 + 0 + 0.8) / 4)
    assert rows[2]["reason"] == "empty" and m["valid_rate"] == 0.75


def test_label_accuracy_macro_f1_confusion():
    c = {"type": "label", "labels": ["pos", "neg", "neutral"]}
    rows, m = score(c, ["pos", "POS.", "neg", "banana", "neg"], ["pos", "pos", "pos", "neg", "neg"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    # pos: p=2/2 r=2/3 f=0.8; neg: p=1/2 r=1/2 f=0.5; neutral absent everywhere -> not in the mean
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5) / 2)
    rep = M.label_report(rows, c["labels"])
    assert rep["confusion"]["pos"] == {"pos": 2, "neg": 1}
    assert rep["confusion"]["neg"] == {M.INVALID: 1, "neg": 1}
    assert rep["per_label"]["neg"]["precision"] == 0.5


def test_json_parse_schema_fields_exact():
    schema = {"type": "object", "properties": {"intent": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["intent"]}
    c = {"type": "json", "schema": schema}
    refs = ['{"intent": "refund", "n": 2}'] * 4
    preds = ['{"intent": "refund", "n": 2}', '{"intent": "refund", "n": 3}', '{"intent": 5}', "not json {"]
    rows, m = score(c, preds, refs)
    assert m["parse_rate"] == 0.75
    assert m["schema_valid_rate"] == 0.5  # {"intent": 5} parses but breaks the schema
    assert m["exact_record_rate"] == 0.25
    # leaves: refs 8; preds 2+2+1+0 = 5; true positives 2+1+0+0 = 3
    assert m["field_precision"] == pytest.approx(3 / 5)
    assert m["field_recall"] == pytest.approx(3 / 8)
    assert m["field_f1"] == pytest.approx(2 * 0.6 * 0.375 / 0.975)
    assert rows[3]["reason"] == "json_parse"
    # per top-level field: intent right in rows 0 and 1, n right only in row 0
    assert m["intent_accuracy"] == 0.5 and m["n_accuracy"] == 0.25


def test_tool_calls_order_insensitive_args_and_no_call():
    tools = [{"name": "weather", "parameters": {"type": "object"}}, {"name": "time", "parameters": {"type": "object"}}]
    c = {"type": "tool_call", "tools": tools}
    refs = [
        [{"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "time", "arguments": {"tz": "CET"}}],
        {"name": "weather", "arguments": {"city": "Rome", "unit": "C"}},
        {"name": "weather", "arguments": {"city": "Rome"}},
        [],  # no call expected
        [],
    ]
    preds = [
        '[{"name": "time", "arguments": {"tz": "CET"}}, {"name": "weather", "arguments": {"city": "Oslo"}}]',
        '{"name": "weather", "arguments": {"city": "Rome", "unit": "F"}}',
        '{"tool_calls": [{"function": {"name": "time", "arguments": "{}"}}]}',
        "It is sunny, no tool needed.",
        '{"name": "time", "arguments": {}}',
    ]
    rows, m = score(c, preds, refs)
    assert [r["call_ok"] for r in rows] == [True, False, False, True, False]
    assert m["call_accuracy"] == pytest.approx(2 / 5)
    assert m["tool_name_accuracy"] == pytest.approx(3 / 5)  # parallel swap ok, Rome/F ok, "no call" ok
    assert m["parse_rate"] == 1.0  # every example expecting a call got something call-shaped
    assert m["argument_accuracy"] == pytest.approx((2 + 1 + 0) / (2 + 2 + 1))
    assert m["no_call_accuracy"] == 0.5


def test_bootstrap_ci_brackets_the_estimate_and_paired_delta():
    rows = [{"valid": True, "correct": i % 4 != 0, "pred_label": "a", "ref_label": "a" if i % 4 else "b",
             "reason": None} for i in range(40)]
    fn = lambda rs: {"accuracy": sum(r["correct"] for r in rs) / len(rs)}  # noqa: E731
    ci = M.bootstrap(rows, fn, n=300, seed=1)["accuracy"]
    assert ci[0] < 0.75 < ci[1] and ci[1] - ci[0] < 0.4
    worse = [dict(r, correct=False) if i < 10 else r for i, r in enumerate(rows)]
    d = M.paired_bootstrap(rows, worse, fn, n=300, seed=1)["accuracy"]
    assert d["delta"] == pytest.approx(sum(r["correct"] for r in rows[:10]) / 40)
    assert d["lo"] > 0, "a consistent improvement must have a CI above zero"
    assert M.bootstrap(rows, fn, n=0) == {}
    assert math.isnan(M.paired_bootstrap(rows, worse, fn, n=0)["accuracy"]["lo"])


@pytest.mark.parametrize("reply,score", [
    ("Score: 85", 85.0), ("score = 7/10", 70.0), ("**Score:** 100", 100.0), ("I'd give it 42/100.", 42.0),
    ("73", 73.0), ("Score: 150", None), ("The answer is fine.", None), ("", None),
    ("Between 3 and 4 points, maybe 60", None),
])
def test_judge_parsing(reply, score):
    assert parse_score(reply) == score


def test_judge_aggregate_ignores_unparsed():
    rows = [{"valid": True, "exact": True, "normalized": True, "f1": 1.0, "correct": True, "judge": s}
            for s in (80.0, None, 40.0)]
    m = M.aggregate("text", rows)
    assert m["judge_score"] == 60.0  # the unparsed reply is not a 0
    assert m["judge_parse_rate"] == pytest.approx(2 / 3)
