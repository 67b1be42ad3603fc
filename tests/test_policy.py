"""Promotion and rollback decisions, and the pure pieces of the router: no server needed."""

from __future__ import annotations

import asyncio

import pytest

from pipelines.spec import Deploy
from serving.auth import admin_ok
from serving.policy import LiveStats, decide
from serving.requestlog import make_row, scrub
from serving.traffic import Mirror, bucket, choose, sticky_key

CFG = Deploy(min_requests=50, rollback_min_requests=20, max_error_rate=0.05, max_validity_drop=0.05,
             max_p95_ratio=1.5)


def stats(n: int, *, errors: int = 0, invalid: int = 0, latency: float = 0.05) -> dict:
    s = LiveStats()
    for i in range(n):
        ok = i >= errors
        s.record(ok, (i % n) >= invalid if ok else None, latency)
    return s.summary()


def test_summary_figures():
    s = LiveStats(window=100)
    for i in range(200):
        s.record(i % 10 != 0, True, (i % 100) / 1000)  # every 10th fails
    out = s.summary()
    assert out["requests"] == 100 and out["total"] == 200 and out["errors"] == 10
    assert out["error_rate"] == pytest.approx(0.1) and out["validity"] == 1.0
    assert 94 <= out["p95_ms"] <= 99 and 45 <= out["p50_ms"] <= 55


def test_wait_until_enough_requests():
    d = decide(stats(200), stats(5, errors=5), CFG, True)
    assert d.action == "wait" and "5 live canary" in d.reasons[0]


@pytest.mark.parametrize("canary, words", [
    (dict(errors=3), "error rate"),
    (dict(invalid=10), "contract validity"),
    (dict(latency=0.2), "p95 latency"),
])
def test_rollback_on_each_breach(canary, words):
    d = decide(stats(200), stats(40, **canary), CFG, True)
    assert d.action == "rollback" and any(words in r for r in d.reasons), d.reasons


def test_within_thresholds_is_not_a_breach():
    d = decide(stats(200, invalid=4), stats(40, errors=1, invalid=2, latency=0.07), CFG, True)
    assert d.action == "wait" and "min_requests" in d.reasons[0]  # 1/40 errors is under 5%


def test_promote_needs_requests_and_a_passed_gate():
    prod, canary = stats(200), stats(60, latency=0.06)
    assert decide(prod, canary, CFG, True).action == "promote"
    failed = decide(prod, canary, CFG, False)
    assert failed.action == "wait" and "gate failed" in failed.reasons[0]
    unknown = decide(prod, canary, CFG, None)
    assert unknown.action == "wait" and "no eval gate" in unknown.reasons[0]


def test_split_is_sticky_and_monotonic_in_weight():
    users = [f"user-{i}" for i in range(5000)]
    at10 = {u for u in users if choose(u, 0.1, has_canary=True, salt="t") == "canary"}
    at30 = {u for u in users if choose(u, 0.3, has_canary=True, salt="t") == "canary"}
    assert abs(len(at10) / len(users) - 0.1) < 0.015 and abs(len(at30) / len(users) - 0.3) < 0.02
    assert at10 <= at30  # ramping up never moves a canary user back to production
    assert all(choose(u, 0.1, has_canary=True, salt="t") == "canary" for u in at10)  # deterministic
    assert choose("x", 1.0, has_canary=False) == "production" and choose("x", 0.0, has_canary=True) == "production"
    assert bucket("a", "t1") != bucket("a", "t2")


def test_sticky_key_sources():
    assert sticky_key({"user": "bob"}, {"x-session-id": "s"}) == "user:bob"
    assert sticky_key({}, {"x-session-id": "s"}) == "session:s"
    assert sticky_key({}, {}) is None


def test_admin_token_checks():
    assert admin_ok("Bearer s3cret", "s3cret") and admin_ok("bearer s3cret", "s3cret")
    for header in (None, "", "s3cret", "Bearer wrong", "Basic s3cret", "Bearer "):
        assert not admin_ok(header, "s3cret")
    assert not admin_ok("Bearer ", "")  # no token configured: closed, not open


def test_scrub_and_row():
    text = "I am jo.doe@example.org, call +44 20 7946 0958, card 4111-1111-1111-1111 from 192.168.1.20; order 4521"
    clean = scrub(text)
    for secret in ("jo.doe@example.org", "7946", "4111", "192.168"):
        assert secret not in clean
    assert "order 4521" in clean and "[EMAIL]" in clean and "[CARD]" in clean
    row = make_row(messages=[{"role": "user", "content": text}], answer="mail x@y.io", model="m", role="production",
                   latency_ms=12.345, valid=True, reason=None, status=200, user_hash="h",
                   shadow={"model": "s", "answer": "ring 555-123-4567 now"})
    assert row["messages"][-1] == {"role": "assistant", "content": "mail [EMAIL]"}
    assert row["shadow"]["answer"] == "ring [PHONE] now" and row["latency_ms"] == 12.35


def test_mirror_isolates_failures_and_bounds_work():
    async def main():
        m = Mirror(limit=2)
        gate = asyncio.Event()

        async def slow():
            await gate.wait()

        async def boom():
            raise RuntimeError("shadow broke")

        assert m.submit(slow) and m.submit(boom)
        assert not m.submit(slow)  # over the limit: skipped, never queued
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*list(m.tasks))
        return m.stats()

    assert asyncio.run(main()) == {"sent": 2, "skipped": 1, "failed": 1, "in_flight": 0}


def test_summary_while_another_thread_records():
    """The router reads summaries in a worker thread while its event loop records: never an error."""
    import threading

    from serving.policy import LiveStats

    s, stop, errors = LiveStats(window=5000), threading.Event(), []

    def record():
        i = 0
        while not stop.is_set():
            s.record(i % 7 != 0, i % 3 == 0, 0.001 * (i % 50))
            i += 1

    t = threading.Thread(target=record)
    t.start()
    try:
        for _ in range(300):
            try:
                summary = s.summary()
                assert summary["requests"] <= 5000 and 0 <= summary["error_rate"] <= 1
            except RuntimeError as e:  # "deque mutated during iteration"
                errors.append(e)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:1]
    assert s.total > 0
