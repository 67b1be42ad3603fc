"""The spec: defaults, every error at once with its path, overrides, path resolution."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pipelines.spec import SpecError, load_spec, spec_from_dict
from tests.conftest import ROOT, shared

MINIMAL = {"task": "demo", "model": {"base": "some-org/some-model"}}


def _errors(raw, overrides=None, **kw) -> list[str]:
    with pytest.raises(SpecError) as exc:
        spec_from_dict(raw, overrides, **kw)
    return exc.value.errors


def test_minimal_spec_gets_sane_defaults():
    spec = spec_from_dict(dict(MINIMAL))
    assert spec.contract.type == "text" and spec.model.template == "auto"
    assert spec.train.method == "lora" and spec.train.lora.r == 16 and spec.train.deepspeed is None
    assert (spec.data.split.train, spec.data.split.dev, spec.data.split.test) == (0.8, 0.1, 0.1)
    assert spec.registry.startswith("file://") and spec.model.trust_remote_code is False
    assert len(spec.spec_hash()) == 16


def test_every_error_is_reported_at_once_with_its_path():
    raw = {"task": "Bad Task", "contract": {"type": "label", "lables": ["a"]},
           "data": {"split": {"train": 0.5, "dev": 0.1, "test": 0.1}, "columns": {"x": "robot"}},
           "model": {"bsae": "x"}, "train": {"lora": {"r": 0}}, "gates": [{"metric": "accuracy"}]}
    errors = _errors(raw)
    joined = "\n".join(errors)
    for expected in ("task: ", "contract.lables: unknown key (did you mean 'labels'?)",
                     "data.split: train + dev + test must sum to 1", "data.columns: column 'x' maps to 'robot'",
                     "model.base: required", "model.bsae: unknown key (did you mean 'base'?)",
                     "train.lora.r: ", "gates[0]: a gate needs at least one of min, max, beats"):
        assert expected in joined, f"missing {expected!r} in:\n{joined}"
    assert len(errors) == 8


@pytest.mark.parametrize("raw,expected", [
    ({"contract": {"type": "label"}}, "contract: contract.type 'label' needs contract.labels"),
    ({"contract": {"type": "json"}}, "contract: contract.type 'json' needs contract.schema"),
    ({"contract": {"type": "json", "schema": {"type": "nonsense"}}}, "not a valid JSON Schema"),
    ({"contract": {"type": "tool_call"}}, "needs contract.tools"),
    ({"train": {"method": "qlora"}}, "train: method 'qlora' quantises the base to 4 bits"),
    ({"train": {"deepspeed": {"stage": 1, "offload_optimizer": True}}}, "offload_optimizer needs stage 2 or 3"),
    ({"contract": {"type": "regex"}}, "contract.type: Input should be 'text', 'label', 'json' or 'tool_call'"),
])
def test_cross_field_rules(raw, expected):
    errors = _errors({**MINIMAL, **raw})
    assert any(expected in e for e in errors), errors


def test_overrides_are_yaml_and_validated_like_the_file():
    spec = spec_from_dict(dict(MINIMAL), ["train.max_steps=50", "train.lora.target_modules=[q_proj, v_proj]",
                                          "data.eval.golden=golden.jsonl", "model.system_prompt='Be brief: yes.'"])
    assert spec.train.max_steps == 50 and spec.train.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.data.eval["golden"].endswith("/golden.jsonl") and spec.model.system_prompt == "Be brief: yes."
    errors = _errors(dict(MINIMAL), ["train.max_steps=lots", "train.lora.rank=4", "nokey", "model.base.x=1"])
    assert any(e.startswith("train.max_steps:") for e in errors)
    assert any(e.startswith("train.lora.rank: unknown key") for e in errors)
    assert "--set 'nokey': expected dotted.key=VALUE" in errors
    assert any(e.startswith("--set model.base.x:") for e in errors)
    spec = spec_from_dict({**MINIMAL, "gates": [{"metric": "accuracy", "min": 0.5}]}, ["gates.0.min=0.9"])
    assert spec.gates[0].min == 0.9


def test_relative_paths_resolve_against_the_spec_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object"}))
    (tmp_path / "model").mkdir()
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "task": "demo", "model": {"base": "./model"}, "contract": {"type": "json", "schema": "schema.json"},
        "data": {"train": "data/*.jsonl", "eval": {"held": "data/a.jsonl"}}}))
    spec = load_spec(tmp_path / "spec.yaml", check_paths=True)
    assert spec.data.train == [str(tmp_path / "data" / "*.jsonl")]
    assert spec.contract.schema_ == str(tmp_path / "schema.json") and spec.json_schema_doc() == {"type": "object"}
    assert spec.model.base == str(tmp_path / "model")
    hub = load_spec(tmp_path / "spec.yaml", ["model.base=org/name", "data.eval={}"])
    assert hub.model.base == "org/name"  # a hub name is left alone
    errors = _errors({**MINIMAL, "data": {"train": ["missing/*.jsonl"], "eval": {"g": "nope.jsonl"}},
                      "gates": [{"metric": "accuracy", "min": 0.5, "eval_set": "other"}]},
                     base_dir=tmp_path, check_paths=True)
    assert errors == [f"data.train[0]: no file matches {tmp_path}/missing/*.jsonl",
                      f"data.eval.g: no such file {tmp_path}/nope.jsonl",
                      "gates[0].eval_set: 'other' is not one of data.eval (g)"]


def test_broken_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: demo\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"not valid YAML \(line 3"):
        load_spec(bad)


def test_example_spec_validates_once_its_data_is_prepared(tmp_path):
    csv_path = shared("datasets", "customer-support", "support.csv")
    subprocess.run([sys.executable, str(ROOT / "examples/support-triage/prepare.py"), str(csv_path), str(tmp_path)],
                   check=True, capture_output=True)
    pool = [json.loads(l) for l in (tmp_path / "triage.jsonl").read_text().splitlines()]
    golden = [json.loads(l) for l in (tmp_path / "golden.jsonl").read_text().splitlines()]
    adversarial = [json.loads(l) for l in (tmp_path / "adversarial.jsonl").read_text().splitlines()]
    assert pool[0]["messages"][0]["role"] == "user" and json.loads(pool[0]["messages"][1]["content"])["intent"]
    assert len(pool) + len(golden) == 3020 and len(golden) == len(adversarial) > 100
    assert not {r["messages"][0]["content"] for r in pool} & {r["messages"][0]["content"] for r in golden}
    changed = sum(a["messages"][0]["content"] != g["messages"][0]["content"] for a, g in zip(adversarial, golden))
    assert changed == len(golden)  # every adversarial row differs from its golden twin, same answer
    assert all(a["messages"][1] == g["messages"][1] for a, g in zip(adversarial, golden))
    spec = load_spec(ROOT / "examples/support-triage/spec.yaml",
                     [f"data.train=[{tmp_path}/triage.jsonl]", f"data.eval.golden={tmp_path}/golden.jsonl",
                      f"data.eval.adversarial={tmp_path}/adversarial.jsonl"], check_paths=True)
    assert spec.task == "support-triage" and spec.contract.type == "json"
    assert spec.json_schema_doc()["required"] == ["intent", "category", "entity"]
