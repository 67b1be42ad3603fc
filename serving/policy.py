"""Promotion and rollback: pure decisions from live metrics and the canary's eval gate verdict.

``decide`` compares the canary's live window with production's, using the thresholds in the
spec's ``deploy`` section, and answers ``rollback`` (a threshold is breached), ``promote`` (enough
requests, every threshold met, eval gate passed) or ``wait``, with the reasons. It never acts:
the router and the CLI act on the answer, so the rules are testable without a server.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


class LiveStats:
    """A rolling window of one model's recent requests: ok / contract-valid / latency."""

    def __init__(self, window: int = 1000):
        self.window: deque[tuple[bool, bool | None, float]] = deque(maxlen=window)
        self.total = 0

    def record(self, ok: bool, valid: bool | None, latency_s: float) -> None:
        self.window.append((ok, valid, latency_s))
        self.total += 1

    def reset(self) -> None:
        self.window.clear()
        self.total = 0

    def summary(self) -> dict:
        # The router's policy reads this in a worker thread while its event loop keeps recording:
        # one copy first (list() of a deque is a single C call, atomic under the GIL), else Python-level
        # iteration can meet an append ("deque mutated during iteration", a 500 under load)
        window = list(self.window)
        n = len(window)
        errors = sum(1 for ok, _, _ in window if not ok)
        checked = [v for ok, v, _ in window if ok and v is not None]
        lat = sorted(l for ok, _, l in window if ok)
        return {"requests": n, "total": self.total, "errors": errors,
                "error_rate": errors / n if n else 0.0,
                "validity": sum(checked) / len(checked) if checked else None,
                "p50_ms": _pct(lat, 50) * 1000 if lat else None,
                "p95_ms": _pct(lat, 95) * 1000 if lat else None}


def _pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a p95 is a latency someone actually saw)."""
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


@dataclass
class Decision:
    action: str  # "promote" | "rollback" | "wait"
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"action": self.action, "reasons": self.reasons}


def breaches(prod: dict, canary: dict, cfg) -> list[str]:
    """Every threshold the canary's live window breaches relative to production."""
    out = []
    if canary["error_rate"] > cfg.max_error_rate:
        out.append(f"error rate {canary['error_rate']:.1%} > max_error_rate {cfg.max_error_rate:.1%} "
                   f"({canary['errors']}/{canary['requests']})")
    if canary["validity"] is not None and prod["validity"] is not None \
            and canary["validity"] < prod["validity"] - cfg.max_validity_drop:
        out.append(f"contract validity {canary['validity']:.1%} < production {prod['validity']:.1%} "
                   f"- max_validity_drop {cfg.max_validity_drop:.1%}")
    if canary["p95_ms"] is not None and prod["p95_ms"] and prod["requests"] >= cfg.rollback_min_requests \
            and canary["p95_ms"] > cfg.max_p95_ratio * prod["p95_ms"]:
        out.append(f"p95 latency {canary['p95_ms']:.0f} ms > {cfg.max_p95_ratio:g} x production "
                   f"{prod['p95_ms']:.0f} ms")
    return out


def decide(prod: dict, canary: dict, cfg, gate_passed: bool | None) -> Decision:
    """What to do with the canary now. ``cfg`` is the spec's ``deploy`` section; ``gate_passed``
    the canary's eval gate verdict (None: no eval found, which blocks promotion)."""
    if canary["requests"] < cfg.rollback_min_requests:
        return Decision("wait", [f"{canary['requests']} live canary request(s); judging needs "
                                 f"{cfg.rollback_min_requests}"])
    found = breaches(prod, canary, cfg)
    if found:
        return Decision("rollback", found)
    waits = []
    if canary["requests"] < cfg.min_requests:
        waits.append(f"{canary['requests']} live canary request(s) of min_requests {cfg.min_requests}")
    if gate_passed is None:
        waits.append("no eval gate verdict for the canary model")
    elif not gate_passed:
        waits.append("the canary's eval gate failed")
    return Decision("wait", waits) if waits else Decision("promote", ["every threshold met after "
                                                                      f"{canary['requests']} requests; eval gate passed"])
