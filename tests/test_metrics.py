"""Metric correctness on hand-made cases with known answers, malformed predictions included."""

from __future__ import annotations

import json
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


def test_parallel_calls_subset_arguments_pair_optimally():
    """Two calls of one function where one's arguments are a subset of the other's, predicted in
    reverse order: a greedy pairing takes the superset call for the subset reference and scores
    neither exact; the optimal assignment scores both."""
    c = {"type": "tool_call", "tools": [{"name": "search", "parameters": {"type": "object"}}]}
    ref = [{"name": "search", "arguments": {"q": "hotels rome"}},
           {"name": "search", "arguments": {"q": "hotels rome", "max_price": 120}}]
    rows, m = score(c, [json.dumps(ref[::-1])], [ref])
    assert rows[0]["call_ok"] and rows[0]["args_right"] == 3 and m["argument_accuracy"] == 1.0
    # one argument wrong in the superset call: the subset call still pairs exactly
    bad = [dict(ref[1], arguments={"q": "hotels rome", "max_price": 90}), ref[0]]
    rows, m = score(c, [json.dumps(bad)], [ref])
    assert not rows[0]["call_ok"] and rows[0]["args_right"] == 2 and m["argument_accuracy"] == pytest.approx(2 / 3)
    assert M._match_calls(M.reference_calls(bad), M.reference_calls(ref)) == (1, 2, 2)
    # JSON has one number type: 120.0 is the reference's 120; true is not 1
    rows, _ = score(c, [json.dumps([ref[0], dict(ref[1], arguments={"q": "hotels rome", "max_price": 120.0})])],
                    [ref])
    assert rows[0]["call_ok"]
    rows, _ = score(c, [json.dumps({"name": "search", "arguments": {"q": True}})],
                    [{"name": "search", "arguments": {"q": 1}}])
    assert not rows[0]["call_ok"]


def _function_calling_cases(n: int):
    """Parallel/multiple calls like public function-calling sets: same function called several times
    with overlapping (subset) arguments, mixed with other functions."""
    cities, units, dates = ["Oslo", "Rome", "Lima", "Pune", "Cork"], ["C", "F"], ["2026-03-01", "2026-04-12"]
    cases = []
    for i in range(n):
        city, other = cities[i % 5], cities[(i + 2) % 5]
        calls = [{"name": "get_weather", "arguments": {"city": city}},
                 {"name": "get_weather", "arguments": {"city": city, "unit": units[i % 2]}}]
        if i % 3 == 0:
            calls.append({"name": "book_flight", "arguments": {"from": city, "to": other, "date": dates[i % 2]}})
        if i % 5 == 1:
            calls.append({"name": "get_weather", "arguments": {"city": other, "unit": units[i % 2],
                                                               "days": 3}})
        cases.append(calls)
    return cases


def test_tool_call_accuracy_exact_on_reversed_parallel_calls():
    """200 cases, predictions the reference calls reversed, every 4th with one wrong argument:
    call accuracy must be exactly 0.75 and argument accuracy count exactly one miss per 4th case."""
    tools = [{"name": n, "parameters": {"type": "object"}} for n in ("get_weather", "book_flight")]
    refs = _function_calling_cases(200)
    preds = []
    for i, calls in enumerate(refs):
        out = [json.loads(json.dumps(c)) for c in reversed(calls)]
        if i % 4 == 3:  # the weather call with the most arguments gets a wrong city
            victim = max((c for c in out if "city" in c["arguments"]), key=lambda c: len(c["arguments"]))
            victim["arguments"]["city"] = "Nowhere"
        preds.append(json.dumps(out))
    rows, m = score({"type": "tool_call", "tools": tools}, preds, refs)
    assert m["call_accuracy"] == 0.75 and m["tool_name_accuracy"] == 1.0
    n_args = sum(len(c["arguments"]) for calls in refs for c in calls)
    assert m["argument_accuracy"] == pytest.approx((n_args - 50) / n_args)


def test_wilson_for_rates_bca_for_the_rest_and_paired_delta():
    rows = [{"valid": True, "exact": i % 4 != 0, "normalized": i % 4 != 0, "f1": 1.0 if i % 4 else i / 80,
             "correct": i % 4 != 0, "reason": None} for i in range(40)]
    ci, method = M.intervals("text", rows, n=400, seed=1)
    # 40/40 valid: a bootstrap would say [1, 1]; Wilson says the rate could be 0.912
    assert method["valid_rate"] == "Wilson" and ci["valid_rate"][0] == pytest.approx(0.9124, abs=1e-4)
    assert ci["valid_rate"][1] == 1.0
    assert ci["exact_match"] == pytest.approx(M.wilson(30, 40))
    assert method["token_f1"] == "BCa bootstrap"
    f1 = sum(r["f1"] for r in rows) / 40
    assert ci["token_f1"][0] < f1 < ci["token_f1"][1] and ci["token_f1"][1] - ci["token_f1"][0] < 0.4
    fn = lambda rs: {"accuracy": sum(r["correct"] for r in rs) / len(rs)}  # noqa: E731
    worse = [dict(r, correct=False) if i < 10 else r for i, r in enumerate(rows)]
    d = M.paired_bootstrap(rows, worse, fn, n=300, seed=1)["accuracy"]
    assert d["delta"] == pytest.approx(sum(r["correct"] for r in rows[:10]) / 40)
    assert d["lo"] > 0, "a consistent improvement must have a CI above zero"
    assert d["method"] == "paired BCa bootstrap"
    # n=0: no bootstrap, but rates keep their (free) binomial interval
    ci0, method0 = M.intervals("text", rows, n=0)
    assert "token_f1" not in ci0 and method0["valid_rate"] == "Wilson"
    assert math.isnan(M.paired_bootstrap(rows, worse, fn, n=0)["accuracy"]["lo"])
    # every resample equal: a zero-width interval, and it says why
    same = [dict(r, f1=0.5) for r in rows]
    ci1, method1 = M.intervals("text", same, n=100)
    assert ci1["token_f1"] == [0.5, 0.5] and "degenerate" in method1["token_f1"]


def test_lower_bound_gate_fails_where_point_gate_passes():
    from pipelines.evaluate.gates import check

    rows = [{"valid": True, "parsed": True, "exact_record": True, "tp": 1, "n_pred": 1, "n_ref": 1,
             "correct": True, "reason": None} for _ in range(40)]
    ci, method = M.intervals("json", rows, n=0)
    results = {"sets": {"test": {"metrics": M.aggregate("json", rows), "ci": ci, "ci_method": method,
                                 "perf": {"latency_p95_s": 0.1}}}}
    point = check(results, [{"metric": "schema_valid_rate", "min": 0.99}])
    bound = check(results, [{"metric": "schema_valid_rate", "min": 0.99, "on": "lower_bound"}])
    assert point["passed"] and not bound["passed"]
    assert "schema_valid_rate lower bound 0.9124 < min 0.99" in bound["failed"][0]["reasons"][0]
    assert bound["checks"][0]["ci_method"] == "Wilson" and bound["checks"][0]["point"] == 1.0
    # a metric without an interval cannot pass a bound gate
    lat = check(results, [{"metric": "latency_p95_s", "max": 1.0, "on": "upper_bound"}])
    assert not lat["passed"] and "no interval" in lat["failed"][0]["reasons"][0]


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


def test_schema_formats_are_enforced():
    """`format` in the contract's schema is checked (date, date-time, email, uuid, uri, hostname);
    a format the checker cannot check is named, not silently passed off as checked."""
    schema = {"type": "object", "required": ["when", "email", "order"],
              "properties": {"when": {"type": "string", "format": "date"},
                             "at": {"type": "string", "format": "date-time"},
                             "email": {"type": "string", "format": "email"},
                             "order": {"type": "string", "format": "uuid"},
                             "link": {"type": "string", "format": "uri"},
                             "host": {"type": "string", "format": "hostname"},
                             "shade": {"type": "string", "format": "color"}}}
    checker = Checker(Contract.model_validate({"type": "json", "schema": schema}))
    good = {"when": "2026-12-01", "at": "2026-12-01T09:30:00Z", "email": "ana@example.org",
            "order": "0f8fad5b-d9cb-469f-a165-70867728950e", "link": "https://example.org/o/1",
            "host": "api.example.org"}
    assert checker.check(json.dumps(good)).valid
    for field, bad in [("when", "2026-13-01"), ("at", "yesterday 9am"), ("email", "ana at example"),
                       ("order", "order-17"), ("link", "not a uri"), ("host", "-bad-.host_")]:
        v = checker.check(json.dumps({**good, field: bad}))
        assert not v.valid and v.reason == "format" and v.detail.startswith(f"{field}:"), (field, v)
    assert checker.unchecked_formats == ["color"]
    tools = Checker(Contract.model_validate({"type": "tool_call", "tools": [
        {"name": "book", "parameters": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}}}]}))
    assert tools.check('{"name": "book", "arguments": {"day": "2026-12-01"}}').valid
    assert tools.check('{"name": "book", "arguments": {"day": "1/12/2026"}}').reason == "tool_arguments"
