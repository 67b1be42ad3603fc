"""Admin authentication: a bearer token compared in constant time with ``$CRUCIBLE_ADMIN_TOKEN``.

The token is read from the environment on each check (never stored in a spec, a manifest or a
log). With no token configured, admin routes are closed to everyone rather than open.
"""

from __future__ import annotations

import hmac
import os

TOKEN_ENV = "CRUCIBLE_ADMIN_TOKEN"


def admin_ok(authorization: str | None, token: str | None = None) -> bool:
    expected = token if token is not None else os.environ.get(TOKEN_ENV, "")
    if not expected or not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


def admin_headers(token: str | None = None) -> dict[str, str]:
    """Headers for a client (the CLI) calling admin routes with the token from the environment."""
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ValueError(f"${TOKEN_ENV} is not set: admin routes need it")
    return {"Authorization": f"Bearer {token}"}
