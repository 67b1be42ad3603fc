"""The request log: JSONL rows (request, answer, model, latency, contract validity, shadow answer)
written to the registry in chunks, with PII scrubbed before anything leaves the process.

Each flush writes one ``deployment`` manifest with ``metadata.type = "request_log"`` and a single
file ``requests.jsonl``. Rows carry ``messages`` (the chat plus the answer as the assistant turn),
so the factory's ``messages`` reader can take a request log as a source: production traffic
becomes eval and training data.

PII is scrubbed by the factory's own scrubber (``pipelines.factory.gates.scrub``), so a request log
fed back to the factory holds exactly what the factory would have kept.
"""

from __future__ import annotations

import json
import logging
import threading
import time

log = logging.getLogger(__name__)

def scrub(text: str) -> str:
    """``text`` with e-mails, phones, cards, IPs and secrets replaced by placeholders (``[EMAIL]`` …)."""
    from pipelines.factory.gates import scrub as factory_scrub

    return factory_scrub(text)[0] if isinstance(text, str) else text


def scrub_messages(messages: list[dict]) -> list[dict]:
    return [{**m, "content": scrub(m.get("content", ""))} for m in messages]


def make_row(*, messages: list[dict], answer: str | None, model: str, role: str, latency_ms: float,
             valid: bool | None, reason: str | None, status: int, user_hash: str | None,
             shadow: dict | None = None, alternatives: list[str] | None = None) -> dict:
    """One log row; ``messages`` ends with the answer as the assistant turn when there is one."""
    chat = scrub_messages(messages)
    if answer is not None:
        chat = chat + [{"role": "assistant", "content": scrub(answer)}]
    row = {"ts": time.time(), "model": model, "role": role, "status": status, "latency_ms": round(latency_ms, 2),
           "valid": valid, "reason": reason, "user": user_hash, "messages": chat}
    if alternatives:  # the other choices of an n > 1 request
        row["alternatives"] = [scrub(a) for a in alternatives]
    if shadow is not None:
        row["shadow"] = {**shadow, "answer": scrub(shadow.get("answer"))}
    return row


class RequestLog:
    """Buffers rows and writes them to the registry every ``flush_rows`` rows or on ``flush()``."""

    def __init__(self, registry_uri: str | None, task: str, *, flush_rows: int = 200):
        self.registry_uri, self.task, self.flush_rows = registry_uri, task, flush_rows
        self.rows: list[dict] = []
        self.lock = threading.Lock()
        self.written: list[str] = []  # manifest ids

    def append(self, row: dict) -> bool:
        """Buffer a row; True when the buffer is full and the caller should ``flush()`` (off its
        event loop: a flush is a registry write)."""
        with self.lock:
            self.rows.append(row)
            return len(self.rows) >= self.flush_rows

    def add(self, row: dict) -> None:
        if self.append(row):
            self.flush()

    def flush(self) -> str | None:
        """Write buffered rows as one manifest; returns its id (None when there was nothing)."""
        with self.lock:
            rows, self.rows = self.rows, []
        if not rows:
            return None
        from infra.registry import Registry

        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        try:
            m = Registry.open(self.registry_uri).create(
                "deployment", self.task, files={"requests.jsonl": data},
                inputs={"models": sorted({r["model"] for r in rows if r.get("model")})},  # lineage: who answered
                metadata={"type": "request_log", "rows": len(rows), "format": "messages",
                          "first_ts": rows[0]["ts"], "last_ts": rows[-1]["ts"],
                          "models": sorted({r["model"] for r in rows})})
        except Exception as e:  # noqa: BLE001 - keep the rows for the next try rather than lose them
            log.warning("request log flush failed (%s); keeping %d rows", e, len(rows))
            with self.lock:
                self.rows = rows + self.rows
            return None
        self.written.append(m.id)
        return m.id


def read_request_logs(registry, task: str) -> list[dict]:
    """Every logged row of a task, oldest first (for the factory and for tests)."""
    rows = []
    for m in registry.list("deployment", task):
        if m.metadata.get("type") == "request_log":
            rows += [json.loads(line) for line in registry.read_file(m.id, "requests.jsonl").decode().splitlines()]
    return rows
