"""Any OpenAI-compatible ``/v1/chat/completions`` endpoint: a teacher, a judge, our own Serve app.

The API key is read from an environment variable (named by the caller, e.g. ``judge.api_key_env``),
never from a spec or a command line. Requests run concurrently on a small thread pool; connection
errors, timeouts, 429 and 5xx are retried with exponential backoff (honouring ``Retry-After``);
other 4xx are the caller's mistake and fail at once with the server's message.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from pipelines.engines import Chat, Completion, GenParams

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class HTTPError(RuntimeError):
    """A request that failed for good (after retries, or a non-retryable status)."""


def chat_completions_url(url: str) -> str:
    """Accept ``http://host:port``, ``…/v1`` or the full ``…/v1/chat/completions``."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


class HTTPEngine:
    name = "http"

    def __init__(self, url: str, model: str | None = None, *, api_key_env: str | None = None,
                 concurrency: int = 8, retries: int = 4, timeout_s: float = 120.0, backoff_s: float = 0.5,
                 headers: dict | None = None, stream_interval: int | None = None):
        import httpx

        if not url or "://" not in url:
            raise ValueError(f"http engine: url {url!r} must be an http(s):// address")
        self.url = chat_completions_url(url)
        self.model = model or "default"
        self.concurrency = max(1, concurrency)
        self.retries = retries
        self.backoff_s = backoff_s
        self.default_system_prompt = None
        self.default_guide = None
        # vLLM's own request field: a watched stream (``stop_outside``) sends its first token at once and
        # then every ``stream_interval`` tokens; other servers (OpenAI, ours) answer 400 to it
        self.stream_interval = stream_interval
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"http engine: environment variable {api_key_env} (the API key) is not set")
            hdrs["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(timeout=timeout_s, headers=hdrs,
                                    limits=httpx.Limits(max_connections=self.concurrency))

    def close(self) -> None:
        self._client.close()

    def generate(self, chats: list[Chat], params: GenParams = GenParams()) -> list[Completion]:
        if len(chats) <= 1 or self.concurrency == 1:
            return [self._one(c, params, i) for i, c in enumerate(chats)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda ic: self._one(ic[1], params, ic[0]), enumerate(chats)))

    def _body(self, chat: Chat, params: GenParams, index: int) -> dict:
        body = {"model": self.model, "messages": chat, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p,
                # a distinct but reproducible seed per request, so samples of one batch differ
                "seed": params.seed + index}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.guide:  # OpenAI's json_schema response format; a choice as vLLM's structured outputs
            g = json.loads(params.guide)
            if "json_schema" in g:
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "contract", "schema": g["json_schema"]}}
            else:
                body["structured_outputs"] = {"choice": g["choice"]}
        return body

    def _one(self, chat: Chat, params: GenParams, index: int) -> Completion:
        import httpx

        body = self._body(chat, params, index)
        watch = None
        if params.stop_outside and not params.guide:
            from pipelines.guide import compiled

            watch = compiled(params.stop_outside)
        if watch is not None:
            body.update(stream=True, stream_options={"include_usage": True})
            if self.stream_interval:  # usage in every chunk: a cut stream's token count, chunks holding several
                body["stream_interval"] = self.stream_interval
                body["stream_options"]["continuous_usage_stats"] = True
        last = ""
        for attempt in range(self.retries + 1):
            start = time.perf_counter()
            try:
                if watch is not None:
                    with self._client.stream("POST", self.url, json=body) as r:
                        if r.status_code == 200:
                            return _watched(r, watch, start, attempt)
                        r.read()
                else:
                    r = self._client.post(self.url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                last = f"{type(e).__name__}: {e}"
                self._sleep(attempt, None)
                continue
            if r.status_code == 200:
                return _parse(r.json(), time.perf_counter() - start, attempt)
            last = f"HTTP {r.status_code}: {r.text[:300]}"
            if r.status_code not in RETRY_STATUS:
                raise HTTPError(f"{self.url}: {last}")
            self._sleep(attempt, r.headers.get("retry-after"))
        raise HTTPError(f"{self.url}: failed after {self.retries + 1} attempts; last error {last}")

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        if attempt >= self.retries:
            return
        try:
            delay = float(retry_after) if retry_after else self.backoff_s * 2 ** attempt
        except ValueError:
            delay = self.backoff_s * 2 ** attempt
        time.sleep(min(delay, 30.0) * (1 + 0.1 * random.random()))


def _watched(response, guide, start: float, attempt: int) -> Completion:
    """A streamed completion read until its text leaves ``guide``; then the stream is closed (the
    server aborts the request) and the text so far is the answer, ``extra["left_guide"]`` set."""
    text, state, reason, usage, pieces = "", guide.start, "stop", {}, 0
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            delta = (choice.get("delta") or {}).get("content") or ""
            if delta:
                text, pieces = text + delta, pieces + 1
                state = guide.advance(state, delta) if state is not None else None
            reason = choice.get("finish_reason") or reason
        if state is None:
            response.close()
            break
    extra = {"retries": attempt, **({"left_guide": True} if state is None else {})}
    return Completion(text=text, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                      completion_tokens=int(usage.get("completion_tokens", pieces)),
                      finish_reason="length" if reason == "length" and state is not None else "stop",
                      latency_s=time.perf_counter() - start, extra=extra)


def _parse(data: dict, latency: float, attempt: int) -> Completion:
    try:
        choice = data["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") or choice.get("text") or ""
    except (KeyError, IndexError, TypeError):
        raise HTTPError(f"not an OpenAI chat completion response: {str(data)[:300]}") from None
    usage = data.get("usage") or {}
    reason = choice.get("finish_reason") or "stop"
    extra = {"retries": attempt}
    if message.get("tool_calls"):
        extra["tool_calls"] = message["tool_calls"]
    return Completion(text=text, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                      completion_tokens=int(usage.get("completion_tokens", 0)),
                      finish_reason="length" if reason == "length" else "stop", latency_s=latency, extra=extra)
