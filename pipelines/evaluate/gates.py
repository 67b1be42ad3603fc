"""Release gates: the spec's ``gates`` applied to an eval's results, failing closed.

A gate names a metric (a contract metric such as ``accuracy``, a perf figure such as
``latency_p95_s``, or ``regressions`` — examples a baseline got right and the model got wrong),
the eval sets it applies to (default: every set), and bounds: ``min``/``max`` on the value, and/or
``beats: BASELINE`` (the model must be at least ``margin`` better than that baseline; lower is
better for latencies). ``regressions`` reads the comparison with ``against`` (or ``beats``).
A metric or baseline the eval did not measure fails the gate, with the reason: a gate that
cannot be checked must not pass.

``on: lower_bound`` (or ``upper_bound``) makes min/max compare that end of the metric's 95%
interval instead of the point value, so 40/40 valid rows (Wilson [0.912, 1]) do not pass a 0.99
floor; with ``beats`` it asks the paired delta's interval to clear the margin. A metric without
an interval (latencies) fails such a gate.

For json and tool_call contracts, ``eval.min_valid_rate`` (default 0.99) adds an implicit gate on
``valid_rate`` for every set unless a gate already names ``valid_rate``/``schema_valid_rate``.
"""

from __future__ import annotations

from typing import Any

LOWER_IS_BETTER = {"latency_p50_s", "latency_p95_s", "regressions"}


def _block(results: dict, eval_set: str, system: str | None = None) -> dict:
    if system is None:
        return results.get("sets", {}).get(eval_set) or {}
    return results.get("baselines", {}).get(system, {}).get("sets", {}).get(eval_set) or {}


def _value(results: dict, eval_set: str, metric: str, system: str | None = None,
           against: str | None = None, on: str = "value") -> float | None:
    if metric == "regressions":
        return _block(results, eval_set, against or "").get("compare", {}).get("regressions")
    block = _block(results, eval_set, system)
    if on != "value":
        ci = block.get("ci", {}).get(metric)
        return None if not ci else ci[0 if on == "lower_bound" else 1]
    return block.get("metrics", {}).get(metric, block.get("perf", {}).get(metric))


def effective_gates(spec) -> list[dict[str, Any]]:
    gates = [g.model_dump() for g in spec.gates]
    floor = getattr(spec.eval, "min_valid_rate", 0.99)
    named = {g["metric"] for g in gates}
    if spec.contract.type in ("json", "tool_call") and floor is not None and not named & {"valid_rate",
                                                                                          "schema_valid_rate"}:
        gates.append({"metric": "valid_rate", "eval_set": None, "min": floor, "max": None, "beats": None,
                      "margin": 0.0, "against": None, "on": "value", "implicit": True})
    return gates


def check(results: dict, gates: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"passed": bool, "checks": [...], "failed": [...]}``, one check per gate and eval set."""
    checks = []
    sets = list(results.get("sets", {}))
    for i, g in enumerate(gates):
        targets = [g["eval_set"]] if g.get("eval_set") else sets
        for s in targets:
            checks.append(_check_one(i, g, s, results))
    failed = [c for c in checks if not c["passed"]]
    return {"passed": not failed and bool(checks), "checks": checks, "failed": failed,
            "note": None if checks else "no gates to apply (the spec has none)"}


def _check_one(i: int, g: dict, eval_set: str, results: dict) -> dict[str, Any]:
    metric, on = g["metric"], g.get("on") or "value"
    against = g.get("against") or (g.get("beats") if metric == "regressions" else None)
    value = _value(results, eval_set, metric, against=against, on=on)
    c = {"gate": i, "metric": metric, "eval_set": eval_set, "on": on, "value": value, "min": g.get("min"),
         "max": g.get("max"), "beats": g.get("beats"), "margin": g.get("margin", 0.0), "passed": True,
         "reasons": [], "implicit": bool(g.get("implicit"))}
    if on != "value":
        c["point"] = _value(results, eval_set, metric, against=against)
        c["ci_method"] = _block(results, eval_set).get("ci_method", {}).get(metric)
    if value is None:
        if metric == "regressions":
            why = f"comparison with baseline '{against}' was not measured"
        elif c.get("point") is not None:  # measured, but without an interval (e.g. a latency)
            why = f"metric '{metric}' has no interval for the gate's {on}"
        else:
            why = f"metric '{metric}' was not measured"
        c.update(passed=False, reasons=[f"{why} on set '{eval_set}'"])
        return c
    name = metric if on == "value" else f"{metric} {on.replace('_', ' ')}"
    if g.get("min") is not None and value < g["min"]:
        c["reasons"].append(f"{name} {value:.4g} < min {g['min']:.4g}")
    if g.get("max") is not None and value > g["max"]:
        c["reasons"].append(f"{name} {value:.4g} > max {g['max']:.4g}")
    if g.get("beats") and metric != "regressions" and on != "value":
        _check_beats_interval(c, g, eval_set, results)
    elif g.get("beats") and metric != "regressions":
        base = _value(results, eval_set, metric, system=g["beats"])
        c["baseline_value"] = base
        margin = g.get("margin") or 0.0
        if base is None:
            c["reasons"].append(f"baseline '{g['beats']}' has no {metric} on set '{eval_set}'")
        elif metric in LOWER_IS_BETTER and not value <= base - margin:
            c["reasons"].append(f"{metric} {value:.4g} is not below {g['beats']}'s {base:.4g} by {margin:g}")
        elif metric not in LOWER_IS_BETTER and not value >= base + margin:
            c["reasons"].append(f"{metric} {value:.4g} does not beat {g['beats']}'s {base:.4g} by {margin:g}")
    c["passed"] = not c["reasons"]
    return c


def _check_beats_interval(c: dict, g: dict, eval_set: str, results: dict) -> None:
    """``beats`` with ``on``: the paired delta's interval end (model − baseline) must clear the margin."""
    metric, margin = g["metric"], g.get("margin") or 0.0
    d = _block(results, eval_set, g["beats"]).get("compare", {}).get("delta", {}).get(metric)
    lower = metric in LOWER_IS_BETTER
    end = None if not d else d["hi" if lower else "lo"]
    c["delta_bound"] = end
    if end is None or end != end:  # missing or NaN: no paired interval
        c["reasons"].append(f"no paired interval for {metric} against '{g['beats']}' on set '{eval_set}'")
    elif lower and not end <= -margin:
        c["reasons"].append(f"{metric} delta's upper bound {end:+.4g} vs {g['beats']} is not below −{margin:g}")
    elif not lower and not end >= margin:
        c["reasons"].append(f"{metric} delta's lower bound {end:+.4g} vs {g['beats']} does not clear {margin:g}")
