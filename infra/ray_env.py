"""Connecting to Ray: a local single-node Ray on 127.0.0.1 by default, or a cluster by address.

Local mode keeps Ray's sockets on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does that on
Linux too), its session files under the project's .cache/ray, and token auth on with a token
kept in the project's cache rather than ~/.ray, so nothing lands in $HOME and another user on
the machine cannot drive our Ray. A cluster keeps whatever auth its operator set.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def local_ray_env(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment for a local Ray (also used by subprocesses we start, e.g. `ray start`)."""
    cache = Path(cache_dir or os.environ.get("CRUCIBLE_CACHE") or ".cache/crucible").resolve()
    token_path = cache / "ray_auth_token"
    if not token_path.exists():
        token_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
        "RAY_AUTH_TOKEN_PATH": os.environ.get("RAY_AUTH_TOKEN_PATH", str(token_path)),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_V2_ENABLED": os.environ.get("RAY_TRAIN_V2_ENABLED", "1"),
    }


def prepare_local_env(cache_dir: str | os.PathLike | None = None) -> None:
    """Set the local-mode environment; call before anything imports ray (entry points, conftest)."""
    if not os.environ.get("RAY_ADDRESS"):
        for k, v in local_ray_env(cache_dir).items():
            os.environ.setdefault(k, v)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, cache_dir: str | None = None):
    """``ray.init`` once: local (loopback, project temp dir) or ``address`` (a cluster)."""
    address = address or os.environ.get("RAY_ADDRESS")
    env = {} if address else local_ray_env(cache_dir)
    if "ray" in sys.modules and env and os.environ.get("RAY_AUTH_MODE") != env["RAY_AUTH_MODE"]:
        # Ray reads its auth mode and bind address when it is imported; changing them now would
        # give the driver and the GCS different ideas of auth. Call prepare_local_env() first.
        log.warning("ray was imported before crucible set up local mode; using Ray's own defaults")
        env = {}
    os.environ.update(env)
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=True)
        return ray
    temp = Path(env["RAY_AUTH_TOKEN_PATH"]).parent / "ray"
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=str(temp),
             runtime_env={"env_vars": {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}},
             configure_logging=True, logging_level="WARNING", log_to_driver=True)
    return ray
