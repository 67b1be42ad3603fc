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
