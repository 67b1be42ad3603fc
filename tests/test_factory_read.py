"""Reading every input format into canonical records; malformed rows become rejected rows (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.factory.read import expand_sources, kind_of, plan_shards, read_shard, short_names, to_canonical

FIX = Path(__file__).parent / "fixtures" / "factory"


def read_file(path: Path, **kw) -> list[dict]:
    path = str(path)
    shards = plan_shards([path], {path: Path(path).name}, **({"shard_bytes": kw.pop("shard_bytes")} if "shard_bytes" in kw else {}))
    rows = []
    for s in shards:
        rows += read_shard(s, **kw)
    return rows


def records(rows):
    return [json.loads(r["record"]) for r in rows if r["record"]]


def test_messy_jsonl_every_line_is_one_row_with_a_reason_when_bad():
    rows = read_file(FIX / "messy.jsonl")
    assert len(rows) == 18  # 19 lines, one blank
    bad = {r["source"]: r["reason"] for r in rows if r["reason"]}
    assert bad == {"messy.jsonl:5": "malformed:bad_json", "messy.jsonl:6": "malformed:bad_utf8",
                   "messy.jsonl:7": "malformed:missing_role", "messy.jsonl:8": "malformed:bad_shape"}
    bad_utf8 = next(r for r in rows if r["reason"] == "malformed:bad_utf8")
    assert "\\xff" in bad_utf8["raw"]  # the raw row is kept, escaped, for the person reading rejected.jsonl
    good = records(rows)
    assert good[0]["id"] == "a" and good[0]["source"] == "messy.jsonl:1"
    flat = next(r for r in good if r["source"] == "messy.jsonl:16")
    assert [m["role"] for m in flat["messages"]] == ["user", "assistant"]
    alpaca = next(r for r in good if r["source"] == "messy.jsonl:17")
    assert alpaca["messages"][0]["content"] == "Classify the message.\n\nI forgot my password again"


def test_byte_range_shards_keep_line_numbers():
    whole = read_file(FIX / "messy.jsonl")
    sharded = read_file(FIX / "messy.jsonl", shard_bytes=700)
    assert len(plan_shards([str(FIX / "messy.jsonl")], {str(FIX / "messy.jsonl"): "m"}, shard_bytes=700)) > 3
    assert [(r["source"], r["reason"]) for r in sharded] == [(r["source"], r["reason"]) for r in whole]


def test_csv_with_columns_numbers_rows_by_start_line_and_rejects_bad_rows():
    rows = read_file(FIX / "support_small.csv", columns={"instruction": "user", "response": "assistant"})
    assert [r["source"] for r in rows] == [f"support_small.csv:{n}" for n in (2, 3, 5, 6, 7)]
    assert rows[3]["reason"] == "malformed:bad_shape" and "5 fields" in rows[3]["detail"]
    rec = records(rows)[1]
    assert rec["messages"][0]["content"] == "I want a refund\nfor my last order"
    assert rec["meta"] == {"intent": "get_refund", "category": "REFUND"}  # unmapped columns kept as metadata


def test_json_array_alpaca_and_gzip_and_preference():
    rows = read_file(FIX / "alpaca.json")
    assert [r["source"] for r in rows] == ["alpaca.json:1", "alpaca.json:2", "alpaca.json:3"]
    assert rows[2]["reason"] == "malformed:missing_role"
    assert records(rows)[0]["messages"][0]["content"] == "Convert 45 kilometers to meters."
    gz = read_file(FIX / "chat.jsonl.gz")
    assert [r["reason"] for r in gz] == ["", "malformed:bad_json"]
    assert [m["role"] for m in records(gz)[0]["messages"]] == ["system", "user", "assistant"]
    pref = records(read_file(FIX / "preference.jsonl"))
    assert pref[0]["messages"][-1]["content"] == "Hello, nice to meet you."
    assert pref[0]["meta"]["rejected_response"] == "what."
    assert [m["role"] for m in pref[1]["messages"]] == ["system", "user", "assistant"]


def test_tool_calls_become_the_assistants_json_content():
    recs = records(read_file(FIX / "tools.jsonl"))
    assert json.loads(recs[0]["messages"][-1]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert json.loads(recs[1]["messages"][-1]["content"]) == {"name": "book_flight", "arguments": {"to": "Rome"}}


@pytest.mark.parametrize("row,reason", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "missing_role"),
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "bad_role"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "bad_shape"),
    ({"text": "no known shape"}, "bad_shape"),
])
def test_wrong_shapes_are_named(row, reason):
    from pipelines.factory.read import Malformed

    with pytest.raises(Malformed) as e:
        to_canonical(row)
    assert e.value.reason == reason


def test_sources_expand_globs_and_missing_files_are_errors(tmp_path):
    assert [Path(p).name for p in expand_sources([str(FIX / "*.jsonl")])] == \
        ["golden.jsonl", "messy.jsonl", "preference.jsonl", "tools.jsonl"]
    with pytest.raises(FileNotFoundError, match=r"data.train\[0\]"):
        expand_sources([str(tmp_path / "nope.jsonl")])
    assert kind_of("x.csv.gz") == "csv" and kind_of("x.json") == "json" and kind_of("x.jsonl.gz") == "jsonl"
    assert short_names(["/a/b/x.jsonl", "/a/c/y.jsonl"]) == {"/a/b/x.jsonl": "b/x.jsonl", "/a/c/y.jsonl": "c/y.jsonl"}
