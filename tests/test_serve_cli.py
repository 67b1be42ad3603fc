"""`crucible serve | deploy | status | rollback | serve --stop` as a user runs them: the installed
entry point in subprocesses, its own `ray start --head` (a process group of its own), real Serve,
real HTTP on 127.0.0.1, two tiny models from `crucible init-model`.

The module shares one running app; the tests run in file order (serve -> canary -> auth ->
rollback -> stop). A finalizer always stops what the CLI started: `serve --stop`, then, as a last
resort, the process group recorded in the state file.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.slow

CRUCIBLE = Path(sys.executable).parent / "crucible"
TASK = "clisrv"
TOKEN = "cli-admin-token-6"


def _env(root: Path, **extra) -> dict:
    # As a user's shell: no Ray settings inherited from the test process (the CLI makes its own
    # from $CRUCIBLE_CACHE), a registry and a cache of this module's own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(CRUCIBLE_CACHE=str(root / "cache"), CRUCIBLE_REGISTRY=f"file://{root / 'registry'}",
               CRUCIBLE_ADMIN_TOKEN=TOKEN, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run(ctx: dict, *args: str, check: int | None = 0, timeout: float = 240, **env_extra) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(CRUCIBLE), *args], cwd=ctx["root"], env=_env(ctx["root"], **env_extra),
                          capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, (f"crucible {' '.join(args)}: exit {proc.returncode}\n"
                                          f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _state(ctx) -> dict | None:
    path = ctx["root"] / "cache" / "serve" / f"{TASK}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ps() -> list[tuple[int, int, int, str, str]]:
    """(pid, ppid, pgid, stat, args) of every process, from `ps`."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid=,stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    rows = []
    for line in out.splitlines():
        pid, ppid, pgid, stat, args = (line.split(None, 4) + [""])[:5]
        rows.append((int(pid), int(ppid), int(pgid), stat, args))
    return rows


def _head_tree(pgid: int) -> dict[int, str]:
    """Live processes of the head: its process group and all their descendants (Ray puts each
    worker, the Serve proxy included, in a process group of its own)."""
    rows = _ps()
    tree = {pid for pid, _, group, _, _ in rows if group == pgid}
    grew = True
    while grew:
        new = {pid for pid, ppid, _, _, _ in rows if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return {pid: args for pid, _, _, stat, args in rows if pid in tree and not stat.startswith("Z")}


def _left_of(pgid: int, pids: set[int], marker: str) -> list[str]:
    """Live processes in the head's group, among ``pids``, or naming its session folder."""
    return [f"{pid} {pgid_} {stat} {args[:120]}" for pid, _, pgid_, stat, args in _ps()
            if not stat.startswith("Z") and (pgid_ == pgid or pid in pids or marker in args)]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, gpt2_tokenizer):
    from tests.s3server import free_port

    root = tmp_path_factory.mktemp("serve-cli")
    ctx = {"root": root}
    refs = {}
    for name, seed in (("prod", 1), ("other", 2)):
        run(ctx, "init-model", str(root / name), "--tokenizer", str(gpt2_tokenizer), "--layers", "1",
            "--hidden", "32", "--heads", "2", "--seed", str(seed), "--json")
        alias = ["--alias", "production"] if name == "prod" else []
        refs[name] = last_json(run(ctx, "registry", "add-model", str(root / name), "--task", TASK, *alias,
                                   "--json"))["model"]
    port = free_port()
    spec = root / "spec.yaml"
    # deploy.port stays at its default: `serve --port` overrides it and the other commands must
    # find the app where `serve` put it. auto_rollback off: this module rolls back by hand.
    spec.write_text(yaml.safe_dump({
        "task": TASK, "model": {"base": str(root / "prod")}, "registry": f"file://{root / 'registry'}",
        "deploy": {"num_cpus": 0.25, "canary_weight": 0.1, "max_new_tokens": 16, "auto_rollback": False,
                   "max_concurrency": 32, "log_flush_rows": 1000}}))
    ctx.update(spec=str(spec), port=port, refs=refs, url=f"http://127.0.0.1:{port}")
    yield ctx
    # always stop what the CLI started, even when a test failed half-way
    state = _state(ctx)
    if state is not None:
        subprocess.run([str(CRUCIBLE), "serve", ctx["spec"], "--stop", "--json"], cwd=root, env=_env(root),
                       capture_output=True, text=True, timeout=180)
        if state.get("pgid"):
            from infra.ray_env import process_group_members, stop_process_group

            if process_group_members(state["pgid"]):
                stop_process_group(state["pgid"])


def chat(client: httpx.Client, user: str, content: str = "hello") -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": TASK, "user": user, "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": content}]})


def many_users(url: str, users: list[str]) -> list[httpx.Response]:
    async def go():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def one(u):
                async with sem:
                    return await c.post("/v1/chat/completions", json={
                        "model": TASK, "user": u, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            return await asyncio.gather(*(one(u) for u in users))
    return asyncio.run(go())


def test_serve_starts_its_own_ray_and_answers_over_http(ctx):
    assert not _port_open(ctx["port"])
    t0 = time.perf_counter()
    served = last_json(run(ctx, "serve", ctx["spec"], "--port", str(ctx["port"]), "--json"))
    print(f"\ncrucible serve returned in {time.perf_counter() - t0:.1f} s")
    assert served["url"] == ctx["url"] and served["models"]["production"] == ctx["refs"]["prod"]
    assert served["models"]["canary"] is None
    state = _state(ctx)
    assert state["pgid"] and state["address"].startswith("127.0.0.1:") and state["url"] == ctx["url"]
    from infra.ray_env import process_group_members

    assert len(process_group_members(state["pgid"])) >= 3  # ray start, GCS, raylet, workers...
    # the CLI has exited; the app keeps answering
    with httpx.Client(base_url=ctx["url"], timeout=60) as c:
        r = chat(c, "alice")
        assert r.status_code == 200, r.text
        assert r.headers["x-crucible-model"] == ctx["refs"]["prod"] == r.json()["model"]
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
        assert c.get("/healthz").json()["models"]["production"] == ctx["refs"]["prod"]


def test_deploy_canary_splits_traffic_and_status_shows_it(ctx):
    refs = ctx["refs"]
    t0 = time.perf_counter()
    deployed = last_json(run(ctx, "deploy", ctx["spec"], "--model", refs["other"], "--as", "canary",
                             "--weight", "0.5", "--json"))
    print(f"\ncrucible deploy (a new model's app) returned in {time.perf_counter() - t0:.1f} s")
    assert deployed["model"] == refs["other"] and deployed["as"] == "canary" and deployed["canary_weight"] == 0.5
    assert deployed.get("live", True)  # went through the running app, not the registry only
    users = [f"user-{i}" for i in range(60)]
    rs = many_users(ctx["url"], users)
    assert [r.status_code for r in rs] == [200] * len(rs), {r.status_code for r in rs}
    served = [r.headers["x-crucible-model"] for r in rs]
    assert all(r.json()["model"] == m for r, m in zip(rs, served))
    assert set(served) == {refs["prod"], refs["other"]}
    assert 0.2 <= served.count(refs["other"]) / len(served) <= 0.8
    again = many_users(ctx["url"], users[:20])  # sticky per user
    assert [r.headers["x-crucible-model"] for r in again] == served[:20]
    status = last_json(run(ctx, "status", ctx["spec"], "--json"))
    assert status["running"] and status["url"] == ctx["url"]
    assert status["models"] == {"production": refs["prod"], "canary": refs["other"], "shadow": None}
    assert status["canary_weight"] == 0.5
    assert status["live"]["canary"]["requests"] == served.count(refs["other"]) + again_count(again, refs["other"])
    assert status["live"]["production"]["requests"] >= served.count(refs["prod"])
    assert [e["action"] for e in status["recent_events"]][-2:] == ["serve", "deploy"]
    human = run(ctx, "status", ctx["spec"]).stdout
    assert "running" in human and refs["other"] in human and "50%" in human


def again_count(rs, ref) -> int:
    return [r.headers["x-crucible-model"] for r in rs].count(ref)


def test_wrong_admin_token_exits_2_and_changes_nothing(ctx):
    refs = ctx["refs"]
    bad = run(ctx, "status", ctx["spec"], check=2, CRUCIBLE_ADMIN_TOKEN="not-the-token")
    assert "refused the admin token" in bad.stderr and "CRUCIBLE_ADMIN_TOKEN" in bad.stderr
    bad = run(ctx, "rollback", ctx["spec"], "--json", check=2, CRUCIBLE_ADMIN_TOKEN="not-the-token")
    assert "refused the admin token" in last_json(bad)["error"]
    status = last_json(run(ctx, "status", ctx["spec"], "--json"))
    assert status["models"]["canary"] == refs["other"] and status["canary_weight"] == 0.5


def test_rollback_removes_the_canary_and_leaves_production(ctx):
    refs = ctx["refs"]
    rolled = last_json(run(ctx, "rollback", ctx["spec"], "--json"))
    assert rolled["action"] == "rollback" and rolled["model"] == refs["other"] and not rolled["automatic"]
    assert rolled["production"] == refs["prod"]
    assert rolled["deleted_app"] == f"{TASK}--{refs['other'].rsplit('-', 1)[-1]}"  # its replica is gone too
    status = last_json(run(ctx, "status", ctx["spec"], "--json"))
    assert status["running"] and status["canary_weight"] == 0
    assert status["models"] == {"production": refs["prod"], "canary": None, "shadow": None}
    rs = many_users(ctx["url"], [f"user-{i}" for i in range(30)])
    assert {r.headers["x-crucible-model"] for r in rs} == {refs["prod"]}
    from infra.registry import Registry

    reg = Registry.open(f"file://{ctx['root'] / 'registry'}")
    assert reg.alias(TASK, "canary")["target"] is None
    assert reg.alias(TASK, "production")["target"] == refs["prod"]
    # nothing left to roll back: a clear error, exit 2 (the router's 409 is a failed check: exit 1)
    again = run(ctx, "rollback", ctx["spec"], check=None)
    assert again.returncode in (1, 2) and "no canary" in again.stderr


def test_stop_shuts_the_app_and_only_its_own_ray(ctx):
    state = _state(ctx)
    assert state is not None
    tree = _head_tree(state["pgid"])
    names = " ".join(tree.values())
    assert "ray::ServeController" in names and "ray::ProxyActor" in names, tree  # found via the tree
    t0 = time.perf_counter()
    stopped = last_json(run(ctx, "serve", ctx["spec"], "--stop", "--json"))
    print(f"\ncrucible serve --stop returned in {time.perf_counter() - t0:.1f} s")
    assert stopped["stopped_ray"] and stopped["pgid"] == state["pgid"]
    assert TASK in stopped["stopped_apps"] and f"{TASK}--{ctx['refs']['prod'].rsplit('-', 1)[-1]}" in stopped["stopped_apps"]
    assert not _port_open(ctx["port"])
    with pytest.raises(httpx.HTTPError):
        httpx.get(ctx["url"] + "/healthz", timeout=2)
    assert _left_of(state["pgid"], set(tree), state["temp_dir"]) == []
    assert _state(ctx) is None
    # the app is gone: the commands fall back to the registry view
    status = last_json(run(ctx, "status", ctx["spec"], "--json"))
    assert not status["running"] and status["models"]["production"] == ctx["refs"]["prod"]
    assert status["recent_events"][-1]["action"] == "stop"
    # stopping again is harmless and starts nothing
    twice = last_json(run(ctx, "serve", ctx["spec"], "--stop", "--json"))
    assert twice == {"stopped_apps": [], "stopped_ray": False, "pgid": None}
    assert _state(ctx) is None
