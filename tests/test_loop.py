"""`crucible run`: the whole loop on a tiny model, resuming from the registry, stopping at a failed gate."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from infra.registry import Registry
from jobs.cli import app


def run(*args) -> tuple[int, dict]:
    res = CliRunner().invoke(app, ["run", *args, "--json"])
    return res.exit_code, json.loads(res.stdout)  # worker logs and progress go to stderr


@pytest.fixture
def loop_spec(tmp_path, tiny_model):
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"please repeat the number {i} back to me"},
                                         {"role": "assistant", "content": f"{i}"}]} for i in range(10, 50)]
    rows.append(dict(rows[3], id="copy-of-r3"))  # an exact duplicate the factory must drop
    golden = [{"id": f"g{i}", "messages": [{"role": "user", "content": f"repeat this: {i} {i}"},
                                           {"role": "assistant", "content": f"{i}"}]} for i in (100, 200, 300, 400)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "golden.jsonl").write_text("".join(json.dumps(r) + "\n" for r in golden))
    spec = {"task": "echo", "contract": {"type": "text"}, "registry": f"file://{tmp_path / 'registry'}",
            "data": {"train": ["train.jsonl"], "eval": {"golden": "golden.jsonl"}},
            "model": {"base": str(tiny_model), "max_seq_len": 64},
            "train": {"workers": 1, "max_steps": 2, "micro_batch_size": 4},
            "eval": {"engine": "hf", "max_new_tokens": 4, "bootstrap": 0, "baselines": ["base"]},
            "gates": [{"metric": "token_f1", "eval_set": "golden", "min": 0.0}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, Registry.open(spec["registry"])


@pytest.mark.slow
def test_loop_runs_resumes_and_stops_at_a_failed_gate(ray_local, loop_spec):
    spec, reg = loop_spec
    code, first = run(str(spec))
    assert code == 0, first
    steps = first["steps"]
    assert list(steps) == ["factory", "train", "eval", "gate", "deploy"]
    assert not any(s["reused"] for s in steps.values())
    assert steps["factory"]["accepted"] and sum(steps["factory"]["accepted"].values()) == 40  # the copy was dropped
    model = steps["train"]["ref"]
    assert reg.get(model).inputs["dataset"] == steps["factory"]["ref"]
    assert reg.resolve("echo@canary") == model and first["passed"] is True
    ev = reg.get(steps["eval"]["ref"])
    assert ev.inputs["model"] == model and ev.inputs["dataset"] == steps["factory"]["ref"]
    # The eval report carries the training run's loss curve, inlined in the HTML.
    assert reg.read_file(ev.id, "loss.png").startswith(b"\x89PNG")
    assert "data:image/png;base64," in reg.read_file(ev.id, "report.html").decode()

    # Nothing changed: every step up to eval is reused, not redone.
    code, again = run(str(spec), "--until", "eval")
    assert code == 0 and list(again["steps"]) == ["factory", "train", "eval"]
    assert all(s["reused"] for s in again["steps"].values())
    assert [again["steps"][k]["ref"] for k in again["steps"]] == [steps[k]["ref"] for k in again["steps"]]

    # A gate the tiny model cannot meet: exit 1, the verdict is recorded, nothing is deployed.
    deployments = len(reg.list("deployment", "echo"))
    code, failed = run(str(spec), "--set", "gates=[{metric: token_f1, eval_set: golden, min: 1.0}]")
    assert code == 1 and failed["passed"] is False and "deploy" not in failed["steps"]
    assert failed["steps"]["gate"]["failed"] == ["token_f1@golden"]
    assert reg.get(failed["steps"]["gate"]["ref"]).metadata["passed"] is False
    assert len(reg.list("deployment", "echo")) == deployments

    # A data setting the dataset depends on: the factory runs again.
    code, rebuilt = run(str(spec), "--until", "factory", "--set", "data.dedupe.threshold=0.7")
    assert code == 0 and rebuilt["steps"]["factory"]["reused"] is False
    assert rebuilt["steps"]["factory"]["ref"] != steps["factory"]["ref"]
