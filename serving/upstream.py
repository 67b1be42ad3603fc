"""How the router calls a model app: over HTTP through Serve's ingress where the app has a private
route (``serving.replica.replica_http``), else over a Serve handle. Both give the seam's dicts.

The HTTP way goes through HAProxy (Ray's direct ingress): its balancing over the app's replicas, its
health checks and Serve's draining apply as to any HTTP request, and the replica counts the request
as Serve counts any (``max_ongoing_requests``, queue limits answering 503). It is the cheaper hop:
~1 ms p50 and ~2 ms of CPU less per request than a handle call (``serving.replica``'s figures), CPU
that a 2-core node would otherwise take from the engine. A route that cannot be reached (no
HAProxy on this node, the app gone or redeployed), or an answer that is not the replica's own (the
ingress's or Serve's: no replica ready, queues full, a replica that died) sends that call over the
handle, which then answers as it would have (a generation has no side effect to repeat).
"""

from __future__ import annotations

import json
import logging
import time

from serving.replica import REPLICA_HEADER

log = logging.getLogger(__name__)


class ReplicaFailure(RuntimeError):
    """A replica that raised, as its HTTP answer said (the handle way raises Ray's own error)."""


class Upstream:
    def __init__(self, handle_for):
        self.handle_for = handle_for  # app name -> its Serve handle (the router keeps them)
        self.routes: dict[str, tuple[float, dict | None]] = {}  # app name -> (when asked, its route or None)
        self.base: str | None = None  # Serve's HTTP ingress on this node, found on first use ("" if none)
        self.session = None

    async def _route(self, app: str) -> dict | None:
        asked, route = self.routes.get(app, (0.0, None))
        if app not in self.routes or (route is None and time.monotonic() - asked > 30):
            # an app without a route is asked again now and then: it may have been redeployed with one
            try:
                route = await self.handle_for(app).http_route.remote()
            except Exception as e:  # noqa: BLE001 - a replica kind without routes: the handle it is
                log.info("%s: calling it over its handle (%s)", app, type(e).__name__)
                route = None
            self.routes[app] = (time.monotonic(), route)
        if route and self.base is None:
            self.base = await _ingress_url() or ""
        return route if route and self.base else None

    def _forget(self, app: str, *, for_a_while: bool = False) -> None:
        """Ask the app for its route again next time (redeployed: a new token, or no route now), or
        ``for_a_while``: use its handle, and ask again in 30 s (the ingress did not answer)."""
        if for_a_while:
            self.routes[app] = (time.monotonic(), None)
        else:
            self.routes.pop(app, None)

    async def _post(self, route: dict, body: dict):
        import aiohttp

        if self.session is None:
            # one pool for every app; no total timeout: the router's own deadline cancels the call
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                                                 timeout=aiohttp.ClientTimeout(total=None))
        return await self.session.post(self.base + route["route"], json=body,
                                       headers={"authorization": f"Bearer {route['token']}"})

    async def generate(self, app: str, messages: list[dict], params: dict, *which) -> dict:
        """The replica's answer, with ``"via"``: ``"http"`` or ``"handle"``, the way it took."""
        resp = await self._call(app, messages, params, which, stream=False)
        if resp is not None:
            async with resp:
                return {**_answer(resp.status, await resp.read()), "via": "http"}
        return {**await self.handle_for(app).generate.remote(messages, params, *which), "via": "handle"}

    async def stream(self, app: str, messages: list[dict], params: dict, *which):
        """An async iterator of the seam's stream items with ``cancel()``, as a streaming handle call gives."""
        resp = await self._call(app, messages, params, which, stream=True)
        if resp is not None:
            return LineStream(resp)
        return self.handle_for(app).options(stream=True).stream.remote(messages, params, *which)

    async def _call(self, app: str, messages: list[dict], params: dict, which: tuple, *, stream: bool):
        """The replica's HTTP response to the seam's call, or None where the handle must take it."""
        import aiohttp

        route = await self._route(app)
        if route is None:
            return None
        body = {"messages": messages, "params": params, **({"stream": True} if stream else {}),
                **({"model": which[0]} if which else {})}
        try:
            resp = await self._post(route, body)
        except aiohttp.ClientConnectorError as e:
            log.warning("%s: its HTTP route cannot be reached (%s); using its handle", app, e)
            self._forget(app, for_a_while=True)
            return None
        if resp.status == 401 or REPLICA_HEADER not in resp.headers:
            # 401: the app was redeployed with a new token. Not the replica's answer but the ingress's
            # (no such route now, no replica ready yet, its queue full): the handle takes this call, and
            # answers as a handle call does (Serve's own 503 where the replicas are at capacity)
            resp.release()
            if resp.status in (401, 404):
                self._forget(app)
            return None
        return resp

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _answer(status: int, raw: bytes) -> dict:
    """The replica's HTTP answer as the handle call's: its dict, or the exception a handle call raises."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise ReplicaFailure(f"HTTP {status}: {raw[:300].decode(errors='replace')}") from None
    if status != 200 or "failure" in data:
        raise ReplicaFailure(data.get("failure") or f"HTTP {status}")
    return data


class LineStream:
    """A replica's streamed answer (one JSON object per line), read as the router reads a handle's stream."""

    def __init__(self, resp):
        self.resp = resp

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        line = await self.resp.content.readline()
        if not line:
            self.resp.release()
            raise StopAsyncIteration
        item = json.loads(line)
        if "failure" in item:
            self.resp.close()
            raise ReplicaFailure(item["failure"])
        return item

    def cancel(self) -> None:
        """Stop the replica: closing the connection ends the request in Serve, which cancels its stream."""
        self.resp.close()


async def _ingress_url() -> str | None:
    """Serve's HTTP ingress as seen from this node (HAProxy listens on every node with Serve's port)."""
    try:
        from ray.serve.context import _get_global_client

        cfg = await _get_global_client()._controller.get_http_config.remote()
    except Exception as e:  # noqa: BLE001
        log.warning("Serve's HTTP address is unknown (%s); model apps are called over handles", e)
        return None
    host = cfg.host if cfg.host not in (None, "", "0.0.0.0", "::", "localhost") else "127.0.0.1"
    return f"http://{host}:{cfg.port}" if ":" not in host else f"http://[{host}]:{cfg.port}"
