"""The router's Prometheus metrics, through Ray Serve's metrics API.

Ray exports them in Prometheus format on each node's metrics port (``ray start
--metrics-export-port``; the cluster definitions expose it), prefixed ``ray_`` and tagged with
Serve's own tags (application, deployment, replica) besides ours:

- ``crucible_requests_total{task, role, model, status, valid, stream}``: answered requests; ``valid``
  is the contract verdict (``true``/``false``, ``none`` when nothing was checked);
- ``crucible_request_latency_seconds{task, role, model, stream}``: a histogram of end-to-end latency
  (to the last token for a stream);
- ``crucible_completion_tokens_total{task, role, model}``;
- ``crucible_in_flight{task}``: requests in flight in this router.
"""

from __future__ import annotations

LATENCY_BOUNDS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class RouterMetrics:
    def __init__(self, task: str):
        from ray.serve import metrics

        self.task = task
        self.requests = metrics.Counter("crucible_requests", description="chat completions answered",
                                        tag_keys=("task", "role", "model", "status", "valid", "stream"))
        self.latency = metrics.Histogram("crucible_request_latency_seconds", boundaries=LATENCY_BOUNDS_S,
                                         description="end-to-end latency of answered requests",
                                         tag_keys=("task", "role", "model", "stream"))
        self.tokens = metrics.Counter("crucible_completion_tokens", description="completion tokens generated",
                                      tag_keys=("task", "role", "model"))
        self.in_flight = metrics.Gauge("crucible_in_flight", description="requests in flight in the router",
                                       tag_keys=("task",))

    def observe(self, *, role: str, model: str | None, status: int, valid: bool | None, latency_s: float,
                completion_tokens: int, stream: bool) -> None:
        model = model or "none"
        s = "true" if stream else "false"
        self.requests.inc(tags={"task": self.task, "role": role, "model": model, "status": str(status),
                                "valid": "none" if valid is None else str(valid).lower(), "stream": s})
        self.latency.observe(latency_s, tags={"task": self.task, "role": role, "model": model, "stream": s})
        if completion_tokens:
            self.tokens.inc(completion_tokens, tags={"task": self.task, "role": role, "model": model})

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n, tags={"task": self.task})
