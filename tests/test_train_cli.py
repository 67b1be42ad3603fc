"""The `crucible train` and `crucible inspect-batch` commands, end to end through the CLI."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from infra.registry import Registry
from jobs.cli import app


@pytest.fixture
def project(tmp_path, tiny_model):
    reg_uri = f"file://{tmp_path / 'registry'}"
    rows = [{"id": str(i), "messages": [{"role": "user", "content": f"say {i}"},
                                        {"role": "assistant", "content": f"{i}"}], "source": f"x:{i}", "meta": {}}
            for i in range(16)]
    data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    ds = Registry.open(reg_uri).create("dataset", "echo", files={"train.jsonl": data}).id
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"task": "echo", "registry": reg_uri,
                                    "model": {"base": str(tiny_model), "max_seq_len": 64,
                                              "system_prompt": "Repeat the number."},
                                    "train": {"workers": 1, "max_steps": 2, "micro_batch_size": 4}}))
    return spec, ds, reg_uri


def test_inspect_batch_shows_which_tokens_train(project):
    spec, ds, _ = project
    res = CliRunner().invoke(app, ["inspect-batch", str(spec), "-n", "2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["dataset"] == ds and doc["template"] == "tokenizer" and len(doc["examples"]) == 2
    ex = doc["examples"][0]
    trained = "".join(t["text"] for t in ex["tokens"] if t["trained"])
    assert trained == "0<|im_end|>"
    assert "Repeat the number." in "".join(t["text"] for t in ex["tokens"])  # spec system prompt applied
    human = CliRunner().invoke(app, ["inspect-batch", str(spec)])
    assert human.exit_code == 0 and "trained" in human.output


def test_qlora_on_cpu_exits_2_naming_the_field(project):
    spec, _, _ = project
    res = CliRunner().invoke(app, ["train", str(spec), "--set", "train.method=qlora", "--json"])
    assert res.exit_code == 2
    assert "train" in res.output and "qlora" in res.output and "GPU" in res.output


def test_unknown_dataset_exits_2(project):
    spec, _, _ = project
    res = CliRunner().invoke(app, ["train", str(spec), "--dataset", "dataset-echo-20990101000000-deadbeef", "--json"])
    assert res.exit_code == 2 and "no such artifact" in json.loads(res.stdout)["error"]


@pytest.mark.slow
def test_train_json_output(project, ray_local):
    spec, ds, reg_uri = project
    res = CliRunner().invoke(app, ["train", str(spec), "--json"])  # packing on by default for llama
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # worker logs go to stderr: stdout is the one JSON object
    for key in ("run", "model", "first_loss", "final_loss", "tokens_per_s", "real_token_share", "mfu", "peak_flops"):
        assert doc[key] is not None, key
    assert doc["steps"] == 2 and doc["real_token_share"] > 0.9
    assert doc["packing"] is True and doc["precision"] in ("bf16", "fp32") and 0 < doc["mfu"] < 1 and doc["peak_flops"] > 1e8
    run_meta = Registry.open(reg_uri).get(doc["run"]).metadata  # the eval report reads them from here
    assert run_meta["mfu"] == doc["mfu"] and run_meta["precision"] == doc["precision"]
    reg = Registry.open(reg_uri)
    assert reg.get(doc["model"]).inputs["dataset"] == ds
