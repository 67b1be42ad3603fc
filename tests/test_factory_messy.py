"""Near-duplicates and leakage on realistic messy support data (bench.messy), and precision on the fixtures."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ROOT, shared

SCHEMA = ROOT / "examples" / "support-triage" / "schema.json"


def factory_on(tmp_path: Path, tokenizer: Path, train: list[str], eval_sets: dict[str, str], **data):
    """The factory on real local Ray with the support-triage contract: (summary, accepted, rejected)."""
    from infra.registry import Registry
    from pipelines.factory import build
    from pipelines.spec import spec_from_dict

    spec = spec_from_dict({"task": "messy", "contract": {"type": "json", "schema": str(SCHEMA)},
                           "model": {"base": str(tokenizer), "max_seq_len": 256},
                           "data": {"train": train, "eval": eval_sets, **data}})
    reg = Registry.open(f"file://{tmp_path / 'registry'}")
    manifest, summary = build(spec, reg, progress=False)
    read = lambda name: [json.loads(line) for line in reg.read_file(manifest.id, name).decode().splitlines()]
    accepted = sum((read(f"{s}.jsonl") for s in ("train", "dev", "test")), [])
    return summary, accepted, read("rejected.jsonl")


def test_realistic_near_duplicates_and_leaks_are_caught(ray_local, gpt2_tokenizer, tmp_path):
    from bench.messy import build_messy, score_messy

    csv_path = shared("datasets", "customer-support", "support.csv")
    truth = build_messy(csv_path, tmp_path / "messy", seed=0)
    summary, accepted, rejected = factory_on(tmp_path, gpt2_tokenizer, [str(tmp_path / "messy" / "train.jsonl")],
                                             {"held": str(tmp_path / "messy" / "eval.jsonl")})
    evals = [json.loads(line) for line in (tmp_path / "messy" / "eval.jsonl").read_text().splitlines()]
    s = score_messy(truth, accepted, rejected, evals)
    assert s["rows_in"] == summary["input_rows"] == s["rows_out"] == 690  # nothing lost
    assert s["near_caught"] >= 19, s["near_missed"]
    assert s["leaks_caught"] == s["leaks_planted"] == 15, s["leaks_missed"]
    assert s["eval_verbatim_in_accepted"] == 0
    assert s["bad_rejected"] == s["bad_planted"]
    # Distinct originals (templated variations of one intent) stay: at most the few real
    # near-duplicate pairs the CSV itself holds may go, each with its reason.
    assert s["originals_rejected"] <= 0.02 * s["originals"], s["originals_rejected_examples"]


def test_one_edit_is_still_a_duplicate_and_a_leak(ray_local, gpt2_tokenizer, tmp_path):
    """The misses of the old whole-record rule, row by row: each edit is caught, distinct rows stay."""
    def row(rid, text, intent="cancel_order"):
        answer = json.dumps({"intent": intent, "category": "ORDER", "entity": None})
        return json.dumps({"id": rid, "messages": [{"role": "user", "content": text},
                                                   {"role": "assistant", "content": answer}]})

    train = [row("a", "i want to cancel my order"), row("a1", "I want to cancel my order please"),
             row("a2", "I want to cancel my order!!"), row("a3", "i want to cancle my order"),
             # distinct: another verb, another number, another intent
             row("d1", "i want to change my order", "change_order"), row("d2", "i need to cancel order 1234"),
             row("d3", "i need to cancel order 5678"), row("d4", "how do I cancel my order"),
             # leaks of the eval message "where is my parcel from last week"
             row("l1", "Hi, where is my parcel from last week? It was a gift.", "track_order"),
             row("l2", "where is my parcell from last week thanks", "track_order")]
    (tmp_path / "train.jsonl").write_text("\n".join(train) + "\n")
    (tmp_path / "eval.jsonl").write_text(row("e1", "where is my parcel from last week", "track_order") + "\n")
    summary, accepted, rejected = factory_on(tmp_path, gpt2_tokenizer, [str(tmp_path / "train.jsonl")],
                                             {"held": str(tmp_path / "eval.jsonl")})
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert reasons == {"a1": "duplicate_of:a", "a2": "duplicate_of:a", "a3": "duplicate_of:a",
                       "l1": "leaked:held", "l2": "leaked:held"}
    assert {r["id"] for r in accepted} == {"a", "d1", "d2", "d3", "d4"}
    details = {r["id"]: r["detail"] for r in rejected}
    assert "contains" in details["l1"] and "typo" in details["a3"]


def test_support_triage_keeps_its_distinct_rows(ray_local, gpt2_tokenizer, tmp_path):
    """The demo's data (templated variations of each intent): every row rejected as a duplicate or
    a leak is one by the edit rules, checked pairwise here, and the rejections stay few."""
    import subprocess
    import sys

    from pipelines.factory.similar import contains, char_grams, norm_message, same_message

    csv_path = shared("datasets", "customer-support", "support.csv")
    subprocess.run([sys.executable, str(ROOT / "examples" / "support-triage" / "prepare.py"), str(csv_path),
                    str(tmp_path / "data")], check=True, capture_output=True)
    data = tmp_path / "data"
    summary, accepted, rejected = factory_on(tmp_path, gpt2_tokenizer, [str(data / "triage.jsonl")],
                                             {"golden": str(data / "golden.jsonl"),
                                              "adversarial": str(data / "adversarial.jsonl")})
    assert summary["input_rows"] == len(accepted) + len(rejected)
    prompt = lambda r: norm_message(r["messages"][0]["content"])
    by_id = {r["id"]: r for r in accepted + rejected}
    evals = {r["id"]: r for name in ("golden", "adversarial")
             for r in map(json.loads, (data / f"{name}.jsonl").read_text().splitlines())}
    dups = [r for r in rejected if r["reason"].startswith("duplicate_of:")]
    leaks = [r for r in rejected if r["reason"].startswith("leaked:")]
    for r in dups:
        rep = by_id[r["reason"].split(":", 1)[1]]
        ok = prompt(r) == prompt(rep) or same_message(prompt(r), prompt(rep)) or "in the cluster of" in r["detail"] \
            or "Jaccard" in r["detail"]
        assert ok, (r["messages"][0]["content"], rep["messages"][0]["content"], r["detail"])
    for r in leaks:
        e = evals[r["detail"].split("repeats eval row ")[1].split(" ")[0]]
        a, b = prompt(r), prompt(e)
        assert a == b or same_message(a, b) or contains(a, b, char_grams(a), char_grams(b)) or "near:" in r["detail"], \
            (r["messages"][0]["content"], e["messages"][0]["content"], r["detail"])
    # Measured here: ~108 duplicates (29 of them exact) and ~27 leaks of 2788 rows.
    assert len(dups) <= 0.05 * summary["input_rows"] and len(leaks) <= 0.02 * summary["input_rows"], \
        (len(dups), len(leaks))
