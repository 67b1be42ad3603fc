"""``pipelines.release``: every deployment-state change on a real registry (a local folder), as the
CLI's offline path and the loop make them (the running router's path is in test_serve.py)."""

from __future__ import annotations

import pytest

from infra.registry import Registry
from pipelines import release

TASK = "rel"


@pytest.fixture
def reg(tmp_path):
    reg = Registry.open(f"file://{tmp_path / 'registry'}")
    refs = {}
    for name in ("a", "b", "c"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(f'{{"name": "{name}"}}')
        refs[name] = reg.add_directory("model", TASK, d).id
    reg.refs = refs
    return reg


def test_deploy_promote_rollback_weights_tell_one_story(reg):
    a, b, c = reg.refs["a"], reg.refs["b"], reg.refs["c"]
    first = release.deploy(reg, TASK, a, "production")
    assert first["previous"] is None and reg.alias(TASK, "production")["target"] == a
    with pytest.raises(ValueError, match="promote"):  # production changes only by promotion after that
        release.deploy(reg, TASK, b, "production")
    release.deploy(reg, TASK, b, "canary", 0.25)
    assert release.read_plan(reg, TASK, 0.1) == {"task": TASK, "models": {"production": a, "canary": b,
                                                                          "shadow": None}, "canary_weight": 0.25}
    release.deploy(reg, TASK, c, "shadow", current_weight=0.25)
    assert release.read_plan(reg, TASK, 0.1)["canary_weight"] == 0.25  # a shadow leaves the split alone
    release.set_weight(reg, TASK, 0.5, previous=0.25)
    assert release.read_plan(reg, TASK, 0.1)["canary_weight"] == 0.5
    promoted = release.promote(reg, TASK, reasons=["gate passed"])
    assert (promoted["model"], promoted["previous"]) == (b, a)
    plan = release.read_plan(reg, TASK, 0.1)
    assert plan["models"] == {"production": b, "canary": None, "shadow": c} and plan["canary_weight"] == 0.0
    release.deploy(reg, TASK, a, "canary", 0.1)
    rolled = release.rollback(reg, TASK, reasons=["error rate"], automatic=True)
    assert rolled["model"] == a and rolled["production"] == b and rolled["automatic"]
    assert reg.alias(TASK, "canary")["target"] is None and reg.alias(TASK, "production")["target"] == b
    events = release.latest_events_manifest(reg, TASK).metadata["events"]
    assert [(e["action"], e.get("as")) for e in events] == [
        ("deploy", "production"), ("deploy", "canary"), ("deploy", "shadow"), ("weights", None),
        ("promote", None), ("deploy", "canary"), ("rollback", None)]
    assert release.latest_events_manifest(reg, TASK).id == rolled["event"]


def test_refusals_name_what_is_wrong_and_change_nothing(reg):
    a, b = reg.refs["a"], reg.refs["b"]
    release.deploy(reg, TASK, a, "production")
    before = release.latest_events_manifest(reg, TASK).id
    for call, words in ((lambda: release.promote(reg, TASK, reasons=[]), "no canary to promote"),
                        (lambda: release.rollback(reg, TASK, reasons=[]), "no canary to roll back"),
                        (lambda: release.set_weight(reg, TASK, 0.3), "no canary"),
                        (lambda: release.set_weight(reg, TASK, 1.5), "canary_weight"),
                        (lambda: release.deploy(reg, TASK, b, "canary", 2), "weight"),
                        (lambda: release.deploy(reg, TASK, b, "primary", 0.1), "'as'")):
        with pytest.raises(ValueError, match=words):
            call()
    assert release.latest_events_manifest(reg, TASK).id == before
    assert release.read_plan(reg, TASK, 0.1)["models"] == {"production": a, "canary": None, "shadow": None}


def test_gate_verdict_is_the_newest_for_that_model(reg):
    a, b = reg.refs["a"], reg.refs["b"]
    assert release.gate_verdict(reg, TASK, a) is None
    reg.create("eval", TASK, inputs={"model": a}, metadata={"passed": False})
    reg.create("eval", TASK, inputs={"model": b}, metadata={"passed": True})
    assert release.gate_verdict(reg, TASK, a) is False
    reg.create("eval", TASK, inputs={"model": a}, metadata={"passed": True})
    assert release.gate_verdict(reg, TASK, a) is True


def test_cli_offline_path_goes_through_release(reg, tmp_path):
    """With no app running, `crucible deploy / promote / rollback / status` change the registry
    through pipelines.release (the same events a running router writes)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    crucible = Path(sys.executable).parent / "crucible"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"task": TASK, "model": {"base": "unused"}, "registry": reg.uri,
                                    "deploy": {"port": 9}}))  # nothing listens on port 9: offline
    env = {**os.environ, "CRUCIBLE_CACHE": str(tmp_path / "cache"), "CRUCIBLE_ADMIN_TOKEN": "t"}

    def run(*args, code=0):
        p = subprocess.run([str(crucible), *args, str(spec), "--json"], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == code, (args, p.stdout, p.stderr[-2000:])
        return json.loads(p.stdout)

    a, b = reg.refs["a"], reg.refs["b"]
    assert run("deploy", "--model", a, "--as", "production")["live"] is False
    assert run("deploy", "--model", b, "--as", "canary", "--weight", "0.3")["canary_weight"] == 0.3
    refused = run("promote", code=1)  # no live metrics to judge by: only --force
    assert "--force" in refused["error"]
    promoted = run("promote", "--force")
    assert (promoted["model"], promoted["previous"], promoted["live"]) == (b, a, False)
    run("deploy", "--model", a, "--as", "canary")
    assert run("rollback")["model"] == a
    status = run("status")
    assert status["running"] is False and status["models"] == {"production": b, "canary": None, "shadow": None}
    assert [e["action"] for e in status["recent_events"]] == ["deploy", "deploy", "promote", "deploy", "rollback"]
