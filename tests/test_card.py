"""`crucible card` on a registry built by the real loop (factory → LoRA → eval → gate) on a tiny model,
and `crucible export` putting the card beside the weights."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from infra.registry import Registry
from jobs.cli import app

LABELS = ["even", "odd"]
SECTIONS = ("## Intended use", "## Base model and licence", "## Data", "## Training recipe and cost",
            "## Evaluation", "## Gate verdicts", "## Known failure clusters", "## Serving cost",
            "## Export formats", "## Lineage")


def last_json(output: str, key: str) -> dict:
    at = output.rfind("{" + f'"{key}"')  # Ray may forward worker logs to stdout before our object
    assert at >= 0, output[-3000:]
    return json.loads(output[at:].splitlines()[0])


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_model, ray_local):
    tmp = tmp_path_factory.mktemp("card")
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"is {i} even or odd?"},
                                         {"role": "assistant", "content": LABELS[i % 2]}]} for i in range(60)]
    rows.append(dict(rows[5], id="copy-of-r5"))  # an exact duplicate the factory rejects
    golden = [{"id": f"g{i}", "messages": [{"role": "user", "content": f"{i}: even or odd?"},
                                           {"role": "assistant", "content": LABELS[i % 2]}]} for i in range(100, 108)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "golden.jsonl").write_text("".join(json.dumps(r) + "\n" for r in golden))
    spec = {"task": "parity", "description": "Answer whether a number is even or odd.",
            "contract": {"type": "label", "labels": LABELS}, "registry": f"file://{tmp / 'registry'}",
            "data": {"train": ["train.jsonl"], "eval": {"golden": "golden.jsonl"}},
            "model": {"base": str(tiny_model), "max_seq_len": 64, "license": "MIT",
                      "system_prompt": "Say even or odd."},
            "train": {"workers": 1, "max_steps": 2, "micro_batch_size": 4},
            "eval": {"engine": "hf", "max_new_tokens": 3, "bootstrap": 100, "baselines": ["base"]},
            "gates": [{"metric": "accuracy", "min": 0.0},
                      {"metric": "valid_rate", "min": 0.99, "on": "lower_bound", "eval_set": "golden"}],
            "deploy": {"node_hour_usd": 3.0}}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["run", str(path), "--until", "gate", "--json"])
    loop = last_json(res.output, "task")
    assert list(loop["steps"]) == ["factory", "train", "eval", "gate"], loop
    return {"tmp": tmp, "reg": Registry.open(spec["registry"], cache_dir=tmp / "cache"), "loop": loop,
            "uri": spec["registry"]}


@pytest.mark.slow
def test_card_sections_and_numbers_match_the_registry(released, tmp_path):
    reg, steps = released["reg"], released["loop"]["steps"]
    model, ev_id = steps["train"]["ref"], steps["eval"]["ref"]
    r = CliRunner().invoke(app, ["card", model, "--out", str(tmp_path / "card"), "--registry", released["uri"],
                                 "--json"])
    assert r.exit_code == 0, r.output
    card = json.loads(r.stdout)  # --json: one object, nothing else
    md = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert json.loads((tmp_path / "card" / "model_card.json").read_text())["model"] == model
    for s in SECTIONS:
        assert s in md, s

    ev = reg.get(ev_id)
    results = json.loads(reg.read_file(ev_id, "results.json"))
    assert card["eval"]["eval"] == ev_id and card["intended_use"]["labels"] == LABELS
    assert card["base_model"]["licence"] == "MIT" and "**licence**: MIT" in md
    # eval tables: every figure and interval is the eval manifest's, with its method
    for tab in card["eval"]["tables"]:
        s = results["sets"][tab["set"]]
        assert tab["n"] == s["n"] == ev.metadata["sets"][tab["set"]]["n"]
        for row in tab["rows"]:
            assert row["model"] == s["metrics"][row["metric"]] == ev.metadata["sets"][tab["set"]]["metrics"][row["metric"]]
            assert row["ci"] == s["ci"].get(row["metric"]) and row["ci_method"] == s["ci_method"].get(row["metric"])
            base = results["baselines"]["base"]["sets"][tab["set"]]
            assert row["baselines"]["base"]["value"] == base["metrics"][row["metric"]]
        acc = next(x for x in tab["rows"] if x["metric"] == "accuracy")
        lo, hi = acc["ci"]
        assert f"| accuracy | {acc['model']:.3f} | [{lo:.3f}, {hi:.3f}] | Wilson |" in md
    # the lower-bound gate on golden's validity: ≤ 8 rows can never give a Wilson lower bound ≥ 0.99
    (verdict,) = card["gates"]
    assert verdict["verdict"] == "fail" and verdict["record"] == steps["gate"]["ref"]
    lb = next(c for c in verdict["checks"] if c["on"] == "lower_bound")
    assert not lb["passed"] and lb["value"] == results["sets"]["golden"]["ci"]["valid_rate"][0]
    # data: the dataset version's own counts and its leak check
    ds = reg.get(steps["factory"]["ref"])
    assert card["data"]["dataset"] == ds.id and card["data"]["accepted"] == ds.metadata["accepted"]
    assert card["data"]["rejected"] == ds.metadata["rejected"] and sum(ds.metadata["rejected"].values()) >= 1
    assert card["data"]["leaked"] == ds.metadata["leaked"] and "leak check" in md
    # training and its cost
    run = reg.get(reg.get(model).inputs["run"])
    t = card["training"]
    assert t["run"] == run.id and t["steps"] == run.metadata["steps"] == 2
    assert t["node_hours"] == pytest.approx(run.metadata["wall_seconds"] / 3600)
    assert t["cost_usd"] == pytest.approx(t["node_hours"] * 3.0)
    assert t["mfu"] == run.metadata.get("mfu", "not recorded")
    # serving cost from the measured throughput of the eval and the spec's node price
    perf = results["perf"]
    per_1k = 3.0 / (perf["examples_per_s"] * 3600) * 1000
    assert card["cost"]["usd_per_1k_requests"] == pytest.approx(per_1k)
    valid = results["metrics"]["valid_rate"]
    assert card["cost"]["usd_per_1k_valid"] == (pytest.approx(per_1k / valid) if valid else None)
    # failure clusters are counted from the eval's own rows
    ps = results["primary_set"]
    rows = [json.loads(l) for l in reg.read_file(ev_id, f"predictions/model/{ps}.jsonl").decode().splitlines()]
    wrong = [x for x in rows if not x["correct"]]
    assert card["failures"]["wrong"] == len(wrong) and card["failures"]["n"] == len(rows)
    assert sum(card["failures"]["error_kinds"].values()) == len(wrong)
    assert sum(c["count"] for c in card["failures"]["top_confusions"]) <= len(wrong)
    if wrong:
        top = card["failures"]["top_confusions"][0]
        assert top["count"] == max(sum(1 for x in wrong if f"{x['ref_label']} → {x['pred_label']}" == k)
                                   for k in {f"{x['ref_label']} → {x['pred_label']}" for x in wrong})
    # lineage reaches the dataset through the model
    assert {x["id"] for x in card["lineage"]} >= {model, run.id, ds.id}


@pytest.mark.slow
def test_export_writes_the_card_beside_the_weights(released, tmp_path, tiny_model):
    model = released["loop"]["steps"]["train"]["ref"]
    r = CliRunner().invoke(app, ["export", model, "--format", "safetensors", "--out", str(tmp_path / "x"),
                                 "--registry", released["uri"], "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["card"] == [str(tmp_path / "x" / "MODEL_CARD.md"), str(tmp_path / "x" / "model_card.json")]
    assert list((tmp_path / "x").glob("*.safetensors")) and "## Evaluation" in (tmp_path / "x" / "MODEL_CARD.md").read_text()
    # a model registered directly (no run, no eval) still gets a card, which says what is missing
    r = CliRunner().invoke(app, ["registry", "add-model", str(tiny_model), "--task", "parity", "--registry",
                                 released["uri"], "--json"])
    assert r.exit_code == 0, r.output
    bare = json.loads(r.stdout)["model"]
    r = CliRunner().invoke(app, ["card", bare, "--out", str(tmp_path / "c"), "--registry", released["uri"]])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "c" / "MODEL_CARD.md").read_text()
    assert "No eval of this model" in md and "training run: not recorded" in md and "licence**: not recorded" in md
    r = CliRunner().invoke(app, ["card", released["loop"]["steps"]["eval"]["ref"], "--registry", released["uri"]])
    assert r.exit_code == 2 and "not a model" in r.output
