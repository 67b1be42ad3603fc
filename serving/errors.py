"""Every error the app answers, in one place: OpenAI's error object ``{message, type, param, code}``.

Code anywhere in serving raises ``APIError(status, message, param=…, code=…)``; the router turns it
into the HTTP answer with ``response``. The ``type`` follows from the status, as OpenAI's does.
"""

from __future__ import annotations

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         502: "server_error", 503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        self.model: str | None = None  # the model that answered, for the x-crucible-model header

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error" if
                                                                     self.status >= 500 else "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self, model: str | None):
        from fastapi.responses import JSONResponse

        headers = {**self.headers, **({"x-crucible-model": model} if model else {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, why: str = "") -> APIError:
    return APIError(400, f"'{param}' is not supported by this deployment{': ' + why if why else ''}",
                    param=param, code="unsupported_parameter")


def overloaded(message: str) -> APIError:
    return APIError(503, message, code="overloaded", headers={"Retry-After": "1"})


def from_replica_failure(exc: BaseException, timeout_s: float) -> APIError:
    """A replica that raised or timed out: 504 after the timeout, 503 when Serve refused it for
    back-pressure, else 502."""
    import asyncio

    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return APIError(504, f"the model took longer than {timeout_s:g} s", code="timeout")
    if "BackPressure" in type(exc).__name__:
        return overloaded(f"the model is at capacity: {str(exc)[:200]}")
    return APIError(502, f"the model failed: {type(exc).__name__}: {str(exc)[:300]}", code="model_error")


def from_validation(exc) -> APIError:
    """A pydantic ``ValidationError`` on a request body: 400 naming the first bad field."""
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if not _branch_tag(p)]
    param = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc)) or None
    if err.get("type") == "extra_forbidden" and param:
        return unsupported(param)
    message = err.get("msg", "invalid value").removeprefix("Value error, ")
    return bad_request(f"'{param}': {message}" if param else message, param=param)


def _branch_tag(part) -> bool:
    """pydantic puts the union branch it tried into an error's location (``str``,
    ``literal['none','auto']``, ``NamedToolChoice``, ``function-after[…]``): not a field name (ours are
    all lowercase identifiers)."""
    return isinstance(part, str) and (not part.isidentifier() or part[0].isupper() or
                                      part in ("str", "int", "float", "bool", "list", "dict", "none"))
