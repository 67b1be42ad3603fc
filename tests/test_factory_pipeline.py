"""The factory end to end on real local Ray: nothing lost, every reason, leakage, reruns, CLI, teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import shared

FIX = Path(__file__).parent / "fixtures" / "factory"


def write_spec(tmp_path: Path, model: Path, **data) -> Path:
    spec = {"task": "triage", "description": "Triage a customer message into an intent.",
            "contract": {"type": "json", "schema": str(FIX / "schema.json")},
            "data": {"train": [str(FIX / "messy.jsonl")], "eval": {"golden": str(FIX / "golden.jsonl")}, **data},
            "model": {"base": str(model), "max_seq_len": 256},
            "registry": f"file://{tmp_path / 'registry'}"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(*args):
    from jobs.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_messy_file_every_row_accounted_for(ray_local, tiny_model, tmp_path):
    spec = write_spec(tmp_path, tiny_model)
    summary = json.loads(cli("factory", str(spec), "--json"))
    assert set(summary) >= {"dataset", "input_rows", "accepted", "rejected", "duplicate_clusters", "leaked"}
    assert summary["input_rows"] == 18  # 19 lines, one blank
    assert summary["input_rows"] == sum(summary["accepted"].values()) + sum(summary["rejected"].values())
    assert sum(summary["accepted"].values()) == 5
    assert summary["rejected"] == {
        "malformed:bad_json": 1, "malformed:bad_utf8": 1, "malformed:missing_role": 1, "malformed:bad_shape": 1,
        "contract:json_parse": 1, "contract:schema": 1, "empty": 1, "leaked_instruction": 1, "too_long": 1,
        "duplicate": 2, "leaked:golden": 2}
    assert summary["duplicate_clusters"] == 1 and summary["leaked"] == 2

    out = tmp_path / "export"
    cli("dataset", "export", summary["dataset"], str(out), "--registry", f"file://{tmp_path / 'registry'}")
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "rejected.jsonl", "report.md", "eval/golden.jsonl"):
        assert (out / name).exists(), name
    accepted = sum((read_jsonl(out / f"{s}.jsonl") for s in ("train", "dev", "test")), [])
    rejected = read_jsonl(out / "rejected.jsonl")
    assert len(accepted) + len(rejected) == 18
    assert all(r["source"].startswith("messy.jsonl:") for r in accepted + rejected)
    assert all(r["reason"] for r in rejected)
    dups = {r["source"]: r["reason"] for r in rejected if r["reason"].startswith("duplicate_of:")}
    assert dups == {"messy.jsonl:3": "duplicate_of:a", "messy.jsonl:4": "duplicate_of:a"}
    scrubbed = next(r for r in accepted if r["source"] == "messy.jsonl:13")
    assert "[EMAIL]" in scrubbed["messages"][0]["content"]
    assert {r["id"] for r in read_jsonl(out / "eval" / "golden.jsonl")} == {"g1", "g2"}
    report = (out / "report.md").read_text()
    assert "leaked:golden" in report and "## Duplicates" in report and "tokens" in report

    # Same input, same spec: the same dataset version, byte for byte.
    again = json.loads(cli("factory", str(spec), "--json"))
    assert again["dataset"] == summary["dataset"] and again["reused"] is True
    # Another split seed: a new version with the same accepted rows, split differently.
    reseeded = json.loads(cli("factory", str(spec), "--json", "--set", "data.split.seed=7",
                              "--set", "data.pii=reject"))
    assert reseeded["dataset"] != summary["dataset"]
    assert reseeded["rejected"]["pii:email"] == 1


def test_split_keeps_clusters_whole_and_is_stable(ray_local, tiny_model, tmp_path):
    from infra.registry import Registry
    from pipelines.factory import build
    from pipelines.spec import load_spec

    rows = tmp_path / "rows.jsonl"
    with open(rows, "w") as f:
        for i in range(60):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"customer {i} asks about order number {i * 7} "
                                              f"and wants to know when parcel {i} arrives at the door"},
                                             {"role": "assistant", "content": json.dumps({"intent": f"i{i % 3}"})}]}) + "\n")
    spec = load_spec(write_spec(tmp_path, tiny_model, train=[str(rows)], eval={}, balance_field="intent"))
    reg = Registry.open(spec.registry)
    m1, s1 = build(spec, reg, progress=False)
    assert sum(s1["accepted"].values()) == 60 and all(s1["accepted"].values())
    assert sum(s1["per_class"]["train"].values()) == s1["accepted"]["train"]
    spec.data.cap_per_class = 5
    _, capped = build(spec, reg, progress=False)
    assert sum(capped["accepted"].values()) == 15 and capped["rejected"] == {"cap:i0": 15, "cap:i1": 15, "cap:i2": 15}
    spec.data.cap_per_class = None
    m2, s2 = build(spec, reg, progress=False)
    assert m2.id == m1.id and s2["reused"]
    assert reg.read_file(m1.id, "train.jsonl") == reg.read_file(m2.id, "train.jsonl")


@pytest.mark.slow
def test_real_shared_data(ray_local, tmp_path, gpt2_tokenizer):
    from infra.registry import Registry
    from pipelines.factory import build
    from pipelines.spec import spec_from_dict

    csv_path = shared("datasets", "customer-support", "support.csv")
    alpaca = shared("datasets", "instructions", "instruction-data.json")
    spec = spec_from_dict({"task": "shared", "model": {"base": str(gpt2_tokenizer), "max_seq_len": 512},
                           "data": {"train": [str(csv_path)], "columns": {"instruction": "user", "response": "assistant"},
                                    "balance_field": "intent"}})
    reg = Registry.open(f"file://{tmp_path / 'reg'}")
    _, s = build(spec, reg, progress=False)
    assert s["input_rows"] == 3020 == sum(s["accepted"].values()) + sum(s["rejected"].values())
    assert len(s["per_class"]["train"]) == 27  # every intent reaches train
    spec = spec_from_dict({"task": "shared", "model": {"base": str(gpt2_tokenizer), "max_seq_len": 512},
                           "data": {"train": [str(alpaca)]}})
    m, s = build(spec, reg, progress=False)
    assert s["input_rows"] == 1100 == sum(s["accepted"].values()) + sum(s["rejected"].values())
    first = json.loads(reg.read_file(m.id, "train.jsonl").splitlines()[0])
    assert first["source"].startswith("instruction-data.json:")


class FakeTeacher:
    """A scripted stand-in for a teacher model hosted elsewhere, answering over real HTTP.

    Generation prompts get a JSON example (a non-JSON answer for the 'typos' edge case); judge
    prompts get rubric scores (low correctness for 'very short message' candidates)."""

    name = "fake-teacher"

    def generate(self, chats, params):
        from pipelines.engines import Completion

        outs = []
        for chat in chats:
            prompt = chat[-1]["content"]
            if prompt.startswith("You grade"):
                weak = "SHORT" in prompt
                scores = {"realism": 4, "correctness": 2 if weak else 5, "format": 5, "difficulty": 3,
                          "diversity": 4, "learnability": 4, "safety": 5}
                outs.append(Completion(text="Scores: " + json.dumps(scores)))
                continue
            edge = prompt.split("Edge case to include: ")[1].split(".")[0]
            seed_user = prompt.split("USER: ")[1].split("\n")[0]
            answer = "track it online" if edge == "typos" else {"intent": "track_order"}
            user = ("SHORT " if edge == "very short message" else "") + f"{seed_user} ({edge}, variant)"
            outs.append(Completion(text="```json\n" + json.dumps({"user": user, "assistant": answer}) + "\n```"))
        return outs


def test_teacher_generation_over_http_feeds_the_factory(ray_local, tiny_model, tmp_path):
    from tests.openai_server import serve

    seeds = tmp_path / "seeds.jsonl"
    with open(seeds, "w") as f:
        for i, text in enumerate(["where is my parcel", "my package has not arrived", "track order 5512"]):
            f.write(json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": text}, {
                "role": "assistant", "content": json.dumps({"intent": "track_order"})}]}) + "\n")
    with serve(FakeTeacher()) as (url, state):
        spec = write_spec(tmp_path, tiny_model, train=[str(seeds)], eval={},
                          teacher={"engine": "http", "url": url, "per_seed": 2})
        result = json.loads(cli("generate", str(spec), "--json", "--out", str(tmp_path / "gen.jsonl")))
    assert result["generated"] == 6 and state["requests"] == 6 + 4  # judge calls only for contract-valid answers
    assert result["accepted"] == 3 and result["rejected"] == {"contract": 2, "rubric:correctness": 1}
    rows = read_jsonl(tmp_path / "gen.jsonl")
    assert all(r["meta"]["teacher"]["scores"]["format"] == 5 for r in rows)
    f = result["factory"]
    assert f["input_rows"] == 3 + 3 and sum(f["accepted"].values()) == 6


def test_kept_duplicates_stay_in_their_clusters_split(ray_local, tiny_model, tmp_path):
    """With dedupe off the duplicates are kept, yet a cluster still never straddles splits."""
    from infra.registry import Registry
    from pipelines.factory import build
    from pipelines.spec import load_spec

    spec = load_spec(write_spec(tmp_path, tiny_model, eval={}, dedupe={"exact": False, "near": False}))
    reg = Registry.open(spec.registry)
    family = {"messy.jsonl:1", "messy.jsonl:3", "messy.jsonl:4"}  # a, its exact copy, its near copy
    seen_splits = set()
    for seed in range(6):
        spec.data.split.seed = seed
        m, s = build(spec, reg, progress=False)
        assert "duplicate" not in s["rejected"] and s["duplicate_clusters"] == 1
        where = {json.loads(line)["source"]: split for split in ("train", "dev", "test")
                 for line in reg.read_file(m.id, f"{split}.jsonl").decode().splitlines()}
        assert family <= set(where) and len({where[src] for src in family}) == 1
        seen_splits.add(where["messy.jsonl:1"])
    assert len(seen_splits) > 1  # the seed really moves the cluster; it moves as one


def test_leakage_is_judged_after_pii_scrubbing(ray_local, tiny_model, tmp_path):
    """A training copy of an eval row is a leak even when scrubbing changed the training copy."""
    from infra.registry import Registry
    from pipelines.factory import build
    from pipelines.spec import load_spec

    row = {"messages": [{"role": "user", "content": "reset the password for bob@example.org now"},
                        {"role": "assistant", "content": json.dumps({"intent": "reset_password"})}]}
    other = {"messages": [{"role": "user", "content": "where can I see my invoices for last year"},
                          {"role": "assistant", "content": json.dumps({"intent": "invoice"})}]}
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    ev.write_text(json.dumps({**row, "id": "e1"}) + "\n")
    for pii in ("scrub", "keep"):
        spec = load_spec(write_spec(tmp_path, tiny_model, train=[str(train)], eval={"held": str(ev)}, pii=pii))
        _, s = build(spec, Registry.open(spec.registry), progress=False)
        assert s["rejected"] == {"leaked:held": 1} and sum(s["accepted"].values()) == 1, pii
