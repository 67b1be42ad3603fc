"""Who serves what: the one place deployment state is changed (deploy, promote, rollback, weights).

The state lives in the registry, so a restarted router, the CLI and the loop all see the same thing:

- aliases ``TASK@production``, ``TASK@canary``, ``TASK@shadow`` name the models;
- each change is a new ``deployment`` manifest with ``metadata.type = "events"``: the event, the plan
  after it (models and canary weight), and every earlier event (capped), so the latest such manifest
  alone tells the whole story and the current weight.

A running router keeps its own in-memory pointers (a swap there is instant, with no request seeing
half a change) and writes each change through these functions; with no app running, the CLI and the
loop call the same functions directly. This module knows nothing of Serve.
"""

from __future__ import annotations

import time

ROLES = ("production", "canary", "shadow")
MAX_EVENTS = 500


# -- reading ------------------------------------------------------------------------------------------
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


def gate_verdict(reg, task: str, model_id: str) -> bool | None:
    """The newest gate verdict on ``model_id`` (``crucible gate`` records one as an ``eval``
    artifact with ``inputs.model`` and ``metadata.passed``): True/False, or None when never gated."""
    for m in reversed(reg.list("eval", task)):
        if m.inputs.get("model") == model_id and isinstance(m.metadata.get("passed"), bool):
            return m.metadata["passed"]
    return None


# -- writing ------------------------------------------------------------------------------------------
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
    """Point ``TASK@role`` at ``ref`` (None clears it, by compare-and-swap); returns the previous target."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    record = reg.alias(task, role)
    previous = record["target"] if record else None
    reg.set_alias(task, role, ref, expected=previous, note=f"crucible release: {role}")
    return previous


def _plan_after(reg, task: str, weight: float) -> dict:
    plan = read_plan(reg, task, weight)
    plan["canary_weight"] = weight if plan["models"]["canary"] else 0.0
    return plan


def deploy(reg, task: str, model_ref: str, role: str, weight: float | None = None, *, live: bool = False,
           current_weight: float = 0.0) -> dict:
    """Make ``model_ref`` the canary (at ``weight``) or the shadow, or production when none is set
    (a first deploy; later production changes go through ``promote``). Returns the event with its id."""
    if role not in ROLES:
        raise ValueError(f"'as' must be one of {', '.join(ROLES)}")
    ref = reg.get(model_ref).id
    if role == "production":
        current = reg.alias(task, "production")
        if current and current["target"] and current["target"] != ref:
            raise ValueError(f"{task}@production is {current['target']}: deploy the new model as canary "
                             "and promote it")
    if role == "canary" and (not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight <= 1):
        raise ValueError("'weight' must be a number from 0 to 1")
    previous = set_role(reg, task, role, ref)
    weight = float(weight) if role == "canary" else current_weight
    event = {"action": "deploy", "as": role, "model": ref, "previous": previous, "live": live,
             **({"canary_weight": weight} if role == "canary" else {})}
    return {**event, "event": record_event(reg, task, event, _plan_after(reg, task, weight))}


def promote(reg, task: str, *, reasons: list[str], automatic: bool = False, live: bool = False) -> dict:
    """The canary becomes production; the canary alias is cleared. Returns the event with its id."""
    canary = (reg.alias(task, "canary") or {}).get("target")
    if not canary:
        raise ValueError(f"{task}@canary is not set: there is no canary to promote")
    previous = set_role(reg, task, "production", canary)
    set_role(reg, task, "canary", None)
    event = {"action": "promote", "model": canary, "previous": previous, "automatic": automatic, "live": live,
             "reasons": reasons}
    return {**event, "event": record_event(reg, task, event, _plan_after(reg, task, 0.0))}


def rollback(reg, task: str, *, reasons: list[str], automatic: bool = False, live: bool = False,
             canary_stats: dict | None = None) -> dict:
    """The canary alias is cleared (production untouched). Returns the event with its id."""
    canary = set_role(reg, task, "canary", None)
    if not canary:
        raise ValueError(f"{task}@canary is not set: there is no canary to roll back")
    event = {"action": "rollback", "model": canary, "automatic": automatic, "live": live, "reasons": reasons,
             **({"canary_stats": canary_stats} if canary_stats is not None else {})}
    plan = _plan_after(reg, task, 0.0)
    event["production"] = plan["models"]["production"]
    return {**event, "event": record_event(reg, task, event, plan)}


def set_weight(reg, task: str, weight: float, *, previous: float | None = None, live: bool = False) -> dict:
    """Record a new canary weight (the canary must be set unless the weight is 0)."""
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight <= 1:
        raise ValueError("'canary_weight' must be a number from 0 to 1")
    if weight > 0 and not (reg.alias(task, "canary") or {}).get("target"):
        raise ValueError("there is no canary: deploy one first")
    event = {"action": "weights", "canary_weight": float(weight), "previous": previous, "live": live}
    return {**event, "event": record_event(reg, task, event, _plan_after(reg, task, float(weight)))}
