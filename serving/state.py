"""Who serves what, kept in the registry so a restarted router (or the CLI) sees the same thing.

- Aliases ``TASK@production``, ``TASK@canary``, ``TASK@shadow`` name the models.
- Each change (deploy, promote, rollback, weights, serve, stop) is a new ``deployment`` manifest
  with ``metadata.type = "events"``: the event, the plan after it, and every earlier event
  (capped), so the latest such manifest alone tells the whole story and the current weight.
"""

from __future__ import annotations

import time

ROLES = ("production", "canary", "shadow")
MAX_EVENTS = 500


def latest_events_manifest(reg, task: str):
    found = [m for m in reg.list("deployment", task) if m.metadata.get("type") == "events"]
    return found[-1] if found else None


def read_plan(reg, task: str, default_weight: float) -> dict:
    """The plan the registry describes: the three aliases and the canary weight last recorded."""
    models = {}
    for role in ROLES:
        record = reg.alias(task, role)
        models[role] = record["target"] if record else None
    last = latest_events_manifest(reg, task)
    weight = default_weight
    if last is not None and last.metadata.get("plan", {}).get("models", {}).get("canary") == models["canary"]:
        weight = last.metadata["plan"].get("canary_weight", default_weight)
    if models["canary"] is None:
        weight = 0.0
    return {"task": task, "models": models, "canary_weight": weight}


def record_event(reg, task: str, event: dict, plan: dict) -> str:
    """Append an event (a new manifest carrying all events so far); returns its id."""
    last = latest_events_manifest(reg, task)
    events = (last.metadata.get("events", []) if last else [])
    event = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event}
    m = reg.create("deployment", task, inputs={"previous": last.id} if last else {},
                   metadata={"type": "events", "event": event, "plan": plan,
                             "events": (events + [event])[-MAX_EVENTS:]})
    return m.id


def set_role(reg, task: str, role: str, ref: str | None) -> str | None:
    """Point ``TASK@role`` at ``ref`` (None clears it); returns the previous target."""
    record = reg.alias(task, role)
    previous = record["target"] if record else None
    reg.set_alias(task, role, ref, expected=previous, note=f"crucible serve: {role}")
    return previous


def gate_verdict(reg, task: str, model_id: str) -> bool | None:
    """The newest gate verdict on ``model_id`` (``crucible gate`` records one as an ``eval``
    artifact with ``inputs.model`` and ``metadata.passed``): True/False, or None when never gated."""
    for m in reversed(reg.list("eval", task)):
        if m.inputs.get("model") == model_id and isinstance(m.metadata.get("passed"), bool):
            return m.metadata["passed"]
    return None


def deploy_in_registry(reg, task: str, model_ref: str, role: str, weight: float) -> dict:
    """Deploy without a running app: move the alias and record the event; the next
    ``crucible serve`` (or a running router's reload) picks the plan up from the registry."""
    ref = reg.get(model_ref).id
    set_role(reg, task, role, ref)
    plan = read_plan(reg, task, weight)
    if role == "canary":
        plan["canary_weight"] = weight
    event = record_event(reg, task, {"action": "deploy", "as": role, "model": ref, "live": False}, plan)
    return {"action": "deploy", "as": role, "model": ref, "event": event, "live": False}
