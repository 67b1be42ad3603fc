"""Traffic decisions: the sticky canary split and the shadow mirror.

The split hashes a stable key (the request's ``user``, ``safety_identifier`` or ``prompt_cache_key``,
else a session header, else nothing) into
[0, 1) and sends the key to the canary when the point falls below the canary weight. The same key
always lands on the same side for a given weight, and raising the weight only moves users from
production to canary (never back), so a user never flips between models as a canary ramps up.
Requests with no key are split at random: nothing to keep them sticky to.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

SESSION_HEADERS = ("x-session-id", "x-crucible-session")


def bucket(key: str, salt: str = "") -> float:
    """A deterministic point in [0, 1) for ``key``; the salt (the task) decorrelates tasks."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


STICKY_FIELDS = ("user", "safety_identifier", "prompt_cache_key")  # OpenAI's, newest last


def sticky_key(body: dict, headers) -> str | None:
    """Who the request is for: OpenAI's ``user`` (or ``safety_identifier``, ``prompt_cache_key``),
    else a session header, else None. Any of the three fields gives the same key for the same value,
    so a client moving from ``user`` to ``safety_identifier`` keeps its side of the split."""
    for name in STICKY_FIELDS:
        user = body.get(name) if isinstance(body, dict) else None
        if isinstance(user, str) and user:
            return "user:" + user
    for h in SESSION_HEADERS:
        value = headers.get(h) if headers is not None else None
        if value:
            return "session:" + value
    return None


def choose(key: str | None, canary_weight: float, *, has_canary: bool, salt: str = "") -> str:
    """``"canary"`` or ``"production"`` for one request."""
    if not has_canary or canary_weight <= 0:
        return "production"
    point = bucket(key, salt) if key is not None else random.random()
    return "canary" if point < canary_weight else "production"


class Mirror:
    """Fire-and-forget background work (the shadow call) that can never touch the primary answer.

    Tasks are kept referenced until done (asyncio holds only weak references to tasks), bounded in
    number (a slow shadow must not pile up unbounded work: beyond ``limit`` the mirror is skipped
    and counted), and every exception is swallowed and counted.
    """

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.tasks: set[asyncio.Task] = set()
        self.sent = self.skipped = self.failed = 0

    def submit(self, make: Callable[[], Awaitable[None]]) -> bool:
        if len(self.tasks) >= self.limit:
            self.skipped += 1
            return False
        self.sent += 1
        task = asyncio.get_running_loop().create_task(self._guard(make))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _guard(self, make: Callable[[], Awaitable[None]]) -> None:
        try:
            await make()
        except Exception as e:  # noqa: BLE001 - a shadow failure is data, never an outage
            self.failed += 1
            log.warning("shadow call failed: %s", e)

    def stats(self) -> dict:
        return {"sent": self.sent, "skipped": self.skipped, "failed": self.failed, "in_flight": len(self.tasks)}
