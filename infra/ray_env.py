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
        # Local mode runs without the dashboard, so Ray Train's placement-group cleaner cannot reach
        # the state API and warns about it every second of a run; the driver skips that one line.
        "RAY_DEDUP_LOGS_SKIP_REGEX": os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX",
                                                    "Failed to query Ray Train Controller actor state"),
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


# -- a local Ray head in a process group of its own --------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_local_head(temp_dir: str | os.PathLike, *, num_cpus: int, dashboard: bool, timeout: float = 90.0,
                     cache_dir: str | os.PathLike | None = None, resources: dict[str, float] | None = None,
                     env: dict[str, str] | None = None):
    """``ray start --head --block`` on 127.0.0.1 (free ports, files under ``temp_dir``, the local
    auth settings of :func:`local_ray_env`) in a new session, so the head and every process it
    starts share one process group that :func:`stop_process_group` can end without touching any
    other Ray on the machine (``ray stop`` would kill them all).

    Waits until the head is up (``ray start`` printed its startup message; with ``dashboard``, the
    Jobs API answers) and returns ``(popen, gcs_address, dashboard_url or None)``. The process
    group id is ``popen.pid``. ``resources`` are custom node resources, ``env`` extra environment
    for the node and everything it runs (e.g. the registry's credentials, as a cluster's nodes
    have them). Raises RuntimeError (with the head's log tail) when it does not start.
    """
    temp_dir = Path(temp_dir).resolve()
    gcs = f"127.0.0.1:{free_port()}"
    args = ["--head", f"--port={gcs.rsplit(':', 1)[1]}", f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}"]
    dashboard_url = None
    if dashboard:
        dash = free_port()
        args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
        dashboard_url = f"http://127.0.0.1:{dash}"
    else:
        args += ["--include-dashboard=false"]
    proc = _ray_start(args, temp_dir / "ray-head.log", num_cpus=num_cpus, resources=resources, env=env,
                      cache_dir=cache_dir, timeout=timeout, ready_url=dashboard_url and f"{dashboard_url}/api/version")
    return proc, gcs, dashboard_url


def start_local_worker(gcs_address: str, log_dir: str | os.PathLike, *, num_cpus: int,
                       resources: dict[str, float] | None = None, env: dict[str, str] | None = None,
                       timeout: float = 90.0, cache_dir: str | os.PathLike | None = None):
    """A second node for a head from :func:`start_local_head`: ``ray start --address --block`` on
    127.0.0.1 with free ports of its own, in a process group of its own, so a test can stop this
    node alone (:func:`stop_process_group`, like losing a machine) and start another. Its logs go
    to ``log_dir``; Ray keeps its session files in the head's temp dir. Returns the Popen once
    ``ray start`` reports the node up."""
    log_dir = Path(log_dir).resolve()
    args = [f"--address={gcs_address}", f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]
    return _ray_start(args, log_dir / f"ray-worker-{free_port()}.log", num_cpus=num_cpus, resources=resources,
                      env=env, cache_dir=cache_dir, timeout=timeout, launcher=_JOINING_RAY_START)


# Local mode's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is what keeps every Ray address on loopback, but
# the same flag makes `ray start --address` refuse to join (Ray 2.60, scripts.py), and setting it
# to 1 turns 127.0.0.1 into the eth0 address. So a joining node runs Ray's own `ray start` with
# only that refusal lifted: its CLI sees the flag on, the address helpers (services.py) still off.
_JOINING_RAY_START = """
import sys, types
import ray._private.ray_constants as constants
import ray.scripts.scripts as scripts
view = types.ModuleType(constants.__name__)
view.__dict__.update(vars(constants))
view.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = view
sys.argv[0] = "ray"
sys.exit(scripts.main())
"""


def _ray_start(args: list[str], log_path: Path, *, num_cpus: int, resources, env, cache_dir, timeout: float,
               ready_url: str | None = None, launcher: str | None = None):
    """Run ``ray start ARGS --block`` in a new session, logging to ``log_path``; wait until it is up."""
    import json
    import subprocess
    import time

    log_path.parent.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    # On a loaded machine `ray start` gave up on its raylet after the default 60 s ("The current node
    # timed out during startup"); it may wait as long as we do.
    patience = {"RAY_raylet_start_wait_time_s": str(int(timeout))}
    full_env = {**patience, **os.environ, **local_ray_env(cache_dir), **(env or {}),
                "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    ray_cli = [sys.executable, "-c", launcher] if launcher else [str(bin_dir / "ray")]
    args = [*ray_cli, "start", *args, "--block", "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--num-cpus={num_cpus}", "--disable-usage-stats",
            *([f"--resources={json.dumps(resources)}"] if resources else [])]
    with open(log_path, "ab") as log_file:
        start = log_file.tell()
        proc = subprocess.Popen(args, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def tail() -> str:
        return log_path.read_bytes()[start:].decode(errors="replace")[-3000:]

    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{tail()}")
            ready = "Ray runtime started" in log_path.read_bytes()[start:].decode(errors="replace")
            if ready and ready_url:
                import httpx

                try:
                    ready = httpx.get(ready_url, timeout=2).status_code in (200, 401)
                except httpx.HTTPError:
                    ready = False
            if ready:
                return proc
            if time.time() > deadline:
                raise RuntimeError(f"the Ray node was not up after {timeout:g} s:\n{tail()}")
            time.sleep(0.3)
    except BaseException:
        stop_process_group(proc.pid, proc)
        raise


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """{pid: (ppid, pgrp, state)} for every process (Linux /proc; {} elsewhere)."""
    table = {}
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return table
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def process_group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a head started by :func:`start_local_head`: its process
    group, plus every descendant of it. Ray puts each worker (the Serve controller and proxy,
    replicas, tasks) in a process group of its own, so the group alone is not the whole head."""
    table = _proc_table()
    if not table:  # no /proc: the group only
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    found = {pid for pid, (_, pgrp, _) in table.items() if pgrp == pgid}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(pid for pid in found if table[pid][2] not in ("Z", "X"))


def stop_process_group(pgid: int, proc=None, *, grace: float = 10.0) -> bool:
    """End a head from :func:`start_local_head`: its process group ``pgid`` and every process it
    started (workers sit in groups of their own): SIGTERM, then SIGKILL for whatever is left after
    ``grace`` seconds. ``proc`` (its Popen, when it is our child) is reaped. Never ``ray stop``.
    Returns True when nothing of it is left."""
    import signal
    import time

    seen: set[int] = set()  # kept across rounds: a worker orphaned by its raylet loses its parent link
    for sig in (signal.SIGTERM, signal.SIGKILL):
        seen.update(process_group_members(pgid))
        targets = _alive(sorted(seen))
        if not targets:
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # not ours (a reused id): leave it alone
            return False
        for pid in targets:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while time.time() < deadline:
            if proc is not None:
                proc.poll()
            if not _alive(targets) and not process_group_members(pgid):
                break
            time.sleep(0.2)
        else:
            continue
        break
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - a child that ignores SIGKILL is not ours to fix
            pass
    return not process_group_members(pgid) and not _alive(sorted(seen))


def _alive(pids: list[int]) -> list[int]:
    table = _proc_table()
    return [pid for pid in pids if pid in table and table[pid][2] not in ("Z", "X")]
