"""Quality gates, PII, dedupe, leakage and split, on plain Python data (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.factory import gate_config
from pipelines.factory.dedupe import EvalIndex, find_duplicates
from pipelines.factory.gates import find_pii, gate_batch, minhashes, scrub, signatures as sign, text_hash
from pipelines.factory.split import assign, cap_per_class
from pipelines.spec import spec_from_dict

SCHEMA = {"type": "object", "properties": {"intent": {"type": "string"}}, "required": ["intent"]}


def make_cfg(tok_json=None, **data):
    spec = spec_from_dict({"task": "t", "model": {"base": "x", "max_seq_len": 64},
                           "contract": {"type": "json", "schema": SCHEMA}, "data": data})
    return gate_config(spec, tok_json)


def run_gates(chats, cfg):
    recs = [json.dumps({"id": str(i), "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]})
            for i, (u, a) in enumerate(chats)]
    n = len(recs)
    batch = {"order": np.arange(n), "source": np.array([f"f:{i}" for i in range(n)], dtype=object),
             "record": np.array(recs, dtype=object), "reason": np.array([""] * n, dtype=object),
             "detail": np.array([""] * n, dtype=object), "raw": np.array([""] * n, dtype=object)}
    return gate_batch(batch, cfg)


OK = json.dumps({"intent": "refund"})


def test_each_gate_names_itself():
    out = run_gates([
        ("please refund my order", OK),
        ("please refund my order", "refund please"),
        ("please refund my order", json.dumps({"intent": 3})),
        ("hi", ""),
        ("x", OK),
        ("please refund", json.dumps({"intent": "As an AI language model, refund"})),
        ("please refund", json.dumps({"intent": "refund", "note": "scored with the rubric"})),
        (" ".join(["word"] * 200), OK),
    ], make_cfg(min_chars=2))
    assert out["reason"] == ["", "contract:json_parse", "contract:schema", "empty", "too_short",
                             "leaked_instruction", "leaked_instruction", "too_long"]
    assert out["tokens"][0] > 0 and out["tokens"][-1] > 64
    assert out["exact"][0] and out["minhash"][0] and not out["minhash"][1]


def test_custom_leak_phrases_from_the_spec():
    out = run_gates([("please refund", json.dumps({"intent": "Sure thing, boss!"}))],
                    make_cfg(leak_phrases=["sure thing, boss"]))
    assert out["reason"] == ["leaked_instruction"]


def test_pii_is_scrubbed_or_rejected_per_spec():
    text = ("mail jane.doe@example.com or call +1 (555) 123-4567, card 4111 1111 1111 1111, "
            "key sk-abcdefghijklmnopqrstuv, order 2023-08-15 #12345")
    clean, kinds = scrub(text)
    assert kinds == ["email", "phone", "card", "secret"]
    assert clean == "mail [EMAIL] or call [PHONE], card [CARD], key [SECRET], order 2023-08-15 #12345"
    assert find_pii("card 4111 1111 1111 1112") == []  # fails the Luhn check: not a card
    # An order number from support.csv: passes Luhn, but no card network issues numbers starting with 1.
    assert find_pii("I want help to cancel purchase 113542617735902") == []
    assert [k for k, *_ in find_pii("mc 2221 0000 0000 0009, amex 378282246310005")] == ["card", "card"]
    row = [("reach me at jane.doe@example.com please", OK)]
    scrubbed = run_gates(row, make_cfg(pii="scrub"))
    assert scrubbed["reason"] == [""]
    rec = json.loads(scrubbed["record"][0])
    assert "[EMAIL]" in rec["messages"][0]["content"] and rec["meta"]["pii_scrubbed"] == ["email"]
    assert run_gates(row, make_cfg(pii="reject"))["reason"] == ["pii:email"]
    kept = run_gates(row, make_cfg(pii="keep"))
    assert "jane.doe@example.com" in json.loads(kept["record"][0])["messages"][0]["content"]


def test_length_uses_the_base_models_tokenizer(tiny_model):
    from pipelines.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    cfg = make_cfg(tok.backend_tokenizer.to_str())
    text = "refund " * 30
    out = run_gates([(text, OK)], cfg)
    expected = len(tok(text, add_special_tokens=False)["input_ids"]) + len(tok(OK, add_special_tokens=False)["input_ids"])
    assert abs(out["tokens"][0] - (expected + 8)) <= 2  # + 4 per turn for role markers


def signatures(texts, num_perm=128):
    sigs = minhashes(texts, num_perm, 3)
    return [{"exact": text_hash(t), "prompt": text_hash(t), "minhash": s} for t, s in zip(texts, sigs)]


BASE = ("the quick brown fox jumps over the lazy dog while the farmer watches from the porch and drinks "
        "his morning coffee before heading out to the fields to check on the wheat")


def test_exact_and_near_duplicates_join_the_first_rows_cluster():
    texts = [BASE, "  " + BASE.upper(), BASE.rsplit(" ", 1)[0] + " barley", "an entirely different sentence about "
             "database indexes and query planners", BASE.replace("fox", "cat").replace("dog", "cow").replace("farmer", "vet")]
    dups = find_duplicates(signatures(texts), exact=True, near=True, threshold=0.8, num_perm=128)
    assert dups[1].of == 0 and dups[1].kind == "exact"
    assert dups[2].of == 0 and dups[2].kind == "near" and dups[2].similarity >= 0.8
    assert 3 not in dups and 4 not in dups  # three words changed: well under 0.8 Jaccard on 3-word shingles
    assert find_duplicates(signatures(texts), exact=True, near=False, threshold=0.8, num_perm=128).keys() == {1}


def test_near_duplicates_are_confirmed_by_exact_jaccard_on_either_side_of_the_threshold():
    """With shingle sets, the threshold is a hard line on the true Jaccard, not a MinHash estimate."""
    words = [f"w{i}" for i in range(60)]  # 58 distinct 3-word shingles
    def variant(k):  # the last k words replaced: 58 - k shared shingles... measured below, not assumed
        return " ".join(words[:60 - k] + [f"x{i}" for i in range(k)])
    def exact_j(a, b):
        from pipelines.factory.dedupe import jaccard, shingle_set
        sa, sb = sign([a, b], 128, 3)[1]
        return jaccard(shingle_set(sa), shingle_set(sb))
    base = " ".join(words)
    above = next(variant(k) for k in range(12, 0, -1) if exact_j(base, variant(k)) >= 0.8)
    below = next(variant(k) for k in range(1, 13) if exact_j(base, variant(k)) < 0.8)
    assert 0.8 <= exact_j(base, above) < 0.85 and 0.75 < exact_j(base, below) < 0.8
    for other, caught in ((above, True), (below, False)):
        sigs, sets = sign([base, other], 128, 3)
        rows = [{"exact": text_hash(t), "minhash": m, "shingles": s} for t, m, s in zip((base, other), sigs, sets)]
        dups = find_duplicates(rows, exact=True, near=True, threshold=0.8, num_perm=128)
        assert (1 in dups) is caught
        if caught:
            assert dups[1].similarity == exact_j(base, above)


def test_clusters_chain_through_rejected_rows_and_name_the_row_matched():
    words = [f"w{i}" for i in range(60)]
    base = " ".join(words)
    head = " ".join(["a", "b", "c"] + words[3:])  # close to base, not to tail
    tail = " ".join(words[:57] + ["x", "y", "z"])
    sigs, sets = sign([head, base, tail], 128, 3)
    rows = [{"exact": text_hash(t), "minhash": m, "shingles": s} for t, m, s in zip((head, base, tail), sigs, sets)]
    dups = find_duplicates(rows, exact=True, near=True, threshold=0.8, num_perm=128)
    assert (dups[1].of, dups[1].via) == (0, 0)
    assert (dups[2].of, dups[2].via) == (0, 1)  # tail matched base, which is in head's cluster


def test_lsh_bands_make_a_pair_at_the_threshold_a_candidate_almost_surely():
    from pipelines.factory.dedupe import lsh_params

    for t in (0.5, 0.7, 0.8, 0.9, 0.95):
        bands, rows = lsh_params(t, 128)
        assert bands * rows <= 128 and 1 - (1 - t ** rows) ** bands >= 0.99


def test_eval_index_finds_exact_same_prompt_and_near_leaks():
    idx = EvalIndex(0.8, 128)
    ev = signatures([BASE])[0]
    idx.add("golden", "g1", **ev)
    near = signatures([BASE.rsplit(" ", 1)[0] + " oats"])[0]
    assert idx.match(signatures([BASE])[0])[:2] == ("golden", "g1")
    assert idx.match(near)[2].startswith("near:")
    same_prompt = {"exact": "other", "prompt": ev["prompt"], "minhash": signatures(["zzz"])[0]["minhash"]}
    assert idx.match(same_prompt)[2] == "same_prompt"
    assert idx.match(signatures(["nothing like it at all, a new row"])[0]) is None


def test_split_is_seeded_stable_and_close_to_the_ratios():
    ratios = {"train": 0.8, "dev": 0.1, "test": 0.1}
    keys = [f"k{i}" for i in range(5000)]
    first = [assign(k, ratios, 0) for k in keys]
    assert first == [assign(k, ratios, 0) for k in keys]  # stable
    assert first != [assign(k, ratios, 1) for k in keys]  # seeded
    share = first.count("train") / len(keys)
    assert 0.77 < share < 0.83 and first.count("dev") > 400
    assert set(assign(k, {"train": 1.0, "dev": 0.0, "test": 0.0}, 0) for k in keys) == {"train"}


def test_cap_per_class_drops_only_the_excess():
    items = [(i, "a" if i < 10 else "b", f"k{i}") for i in range(13)]
    over = cap_per_class(items, 4, seed=0)
    assert len([i for i in over if i < 10]) == 6 and not [i for i in over if i >= 10]
    assert over == cap_per_class(items, 4, seed=0)


def spec_cfg(contract: dict, **data):
    spec = spec_from_dict({"task": "t", "model": {"base": "x", "max_seq_len": 256}, "contract": contract, "data": data})
    return gate_config(spec, None)


def test_tool_call_contract_rejects_unknown_tools_and_bad_arguments():
    from tests.test_factory_read import FIX, read_file

    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                    "required": ["city"]}}]
    cfg = spec_cfg({"type": "tool_call", "tools": tools})
    rows = read_file(FIX / "tools.jsonl")  # an OpenAI tool_calls turn and a name/arguments object
    rows.append({**rows[0], "order": 99, "record": json.dumps({"id": "z", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": json.dumps({"name": "get_weather", "arguments": {"town": "Oslo"}})}]})})
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("order", "source", "record", "reason", "detail", "raw")}
    out = gate_batch(batch, cfg)
    assert out["reason"] == ["", "contract:unknown_tool", "contract:tool_arguments"]
    assert "book_flight" in out["detail"][1] and "city" in out["detail"][2]


def test_label_contract_gives_the_per_class_label():
    cfg = spec_cfg({"type": "label", "labels": ["refund", "track_order"]})
    out = run_gates([("refund my order please", "Refund."), ("where is it now", "track_order"),
                     ("hello there", "weather")], cfg)
    assert out["reason"] == ["", "", "contract:label"]
    assert out["label"] == ["refund", "track_order", ""]
    # A spec field wins over the contract's label when named and present in the row's meta.
    cfg = spec_cfg({"type": "json", "schema": SCHEMA}, balance_field="intent")
    assert run_gates([("please refund my order", OK)], cfg)["label"] == ["refund"]


def test_a_hub_base_that_cannot_load_offline_falls_back_to_an_estimate_with_a_note():
    from pipelines.factory import tokenizer_json

    spec = spec_from_dict({"task": "t", "model": {"base": "no-such-org/no-such-model-xyz", "max_seq_len": 64}})
    tok, note = tokenizer_json(spec, None)
    assert tok is None and note.startswith("estimated at 3 characters per token (")
    cfg = gate_config(spec, tok)
    out = run_gates([("please refund my order", OK), ("word " * 100, OK)], cfg)
    assert out["reason"] == ["", "too_long"]
