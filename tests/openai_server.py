"""A small OpenAI-compatible ``/v1/chat/completions`` server for tests (stdlib only).

It serves any engine (the tests use the HF engine on the tiny model) on 127.0.0.1, can require a
bearer key, and can answer the first N requests with 503 to exercise client retries.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pipelines.engines import GenParams


@contextmanager
def serve(engine, *, api_key: str | None = None, fail_first: int = 0):
    lock = threading.Lock()  # one generate at a time: the HF engine is not thread-safe
    state = {"failures_left": fail_first, "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, code: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            state["requests"] += 1
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                return self._send(401, {"error": {"message": "bad or missing API key"}})
            with lock:
                if state["failures_left"] > 0:
                    state["failures_left"] -= 1
                    return self._send(503, {"error": {"message": "warming up"}})
                params = GenParams(max_new_tokens=int(body.get("max_tokens", 16)),
                                   temperature=float(body.get("temperature", 0.0)),
                                   stop=tuple(body.get("stop") or ()), seed=int(body.get("seed", 0)))
                c = engine.generate([body["messages"]], params)[0]
            self._send(200, {"id": "cmpl-test", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "finish_reason": c.finish_reason,
                                          "message": {"role": "assistant", "content": c.text}}],
                             "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                                       "total_tokens": c.prompt_tokens + c.completion_tokens}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
