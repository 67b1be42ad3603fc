"""``crucible serve | deploy | promote | rollback | status``: the task's Serve application.

``serve`` starts (or updates) the app from the registry's aliases on a Ray it starts locally (a
``ray start --head`` of its own, on 127.0.0.1, stopped again by ``serve --stop``) or on
``$RAY_ADDRESS``. The other commands talk to the running app's admin routes with
``$CRUCIBLE_ADMIN_TOKEN``; when no app is running they change the registry only (aliases plus an
event) through ``pipelines.release``, as the running router does, and the next ``serve`` picks it up.

Also runs as ``python -m jobs.serve SPEC`` (same as ``crucible serve SPEC``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from jobs.common import CheckFailed, JsonOpt, RegistryOpt, SetOpt, command, emit, open_registry, out

SpecArg = typer.Argument(..., help="The spec YAML file.")


def _load(spec_path: Path, set_: list[str] | None, registry: str | None):
    from pipelines.spec import load_spec

    spec = load_spec(spec_path, set_ or [])
    reg = open_registry(registry or spec.registry)
    return spec, reg


def _state_file(task: str) -> Path:
    cache = Path(os.environ.get("CRUCIBLE_CACHE") or ".cache/crucible").resolve()
    return cache / "serve" / f"{task}.json"


def _base_url(spec) -> str:
    """Where the task's app answers: the URL ``crucible serve`` recorded (it may have had --host or
    --port), else the spec's ``deploy.host:port``."""
    state_path = _state_file(spec.task)
    if state_path.exists():
        try:
            url = json.loads(state_path.read_text()).get("url")
        except (OSError, ValueError):
            url = None
        if url:
            return url
    return f"http://{spec.deploy.host}:{spec.deploy.port}"


def _update_state(task: str, **fields) -> None:
    state_path = _state_file(task)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({**state, **fields}))


def _admin(spec, method: str, path: str, body: dict | None = None) -> dict | None:
    """Call an admin route of the running app; None when no app answers at the spec's address."""
    import httpx

    from serving.auth import admin_headers

    try:
        httpx.get(_base_url(spec) + "/healthz", timeout=3).raise_for_status()
    except httpx.HTTPError:
        return None
    r = httpx.request(method, _base_url(spec) + path, json=body, headers=admin_headers(), timeout=600)
    try:
        payload = r.json()
    except ValueError:  # not the router answering (a proxy error page): report the status
        payload = {"error": {"message": f"HTTP {r.status_code} from {r.url}: {r.text[:300]}"}}
    if r.status_code == 401:
        raise ValueError("the app refused the admin token: set $CRUCIBLE_ADMIN_TOKEN to the one it was started with")
    if r.status_code >= 400:
        message = payload.get("error", {}).get("message", r.text)
        raise (CheckFailed if r.status_code == 409 else ValueError)(message)
    return payload


# -- a local Ray head of our own ------------------------------------------------------------------------
def _head_alive(state: dict) -> bool:
    from infra.ray_env import process_group_members

    return bool(state.get("pgid")) and bool(process_group_members(state["pgid"]))


def _temp_dir(task: str) -> Path:
    """Ray's session files for our head: under the cache, unless that path is too long for the
    unix sockets Ray puts there (107 bytes, session name included); then a short /tmp folder."""
    import tempfile

    temp = _state_file(task).parent / f"ray-{task}"
    if len(str(temp)) > 40:
        return Path(tempfile.mkdtemp(prefix="crucible-ray-"))
    return temp


def _ensure_cluster(task: str, *, start: bool = True) -> str | None:
    """The Ray address to deploy on: $RAY_ADDRESS, our running head, or (``start``) a new local
    head, recorded with its process group in the state file; None when there is none to use."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    state_path = _state_file(task)
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if _head_alive(state) and state.get("address"):
            return state["address"]
        state_path.unlink()  # a head that died (or a reboot): forget it
    if not start:
        return None
    from infra.ray_env import start_local_head

    temp = _temp_dir(task)
    proc, address, _ = start_local_head(temp, num_cpus=os.cpu_count() or 2, dashboard=False)
    _update_state(task, address=address, pgid=proc.pid, temp_dir=str(temp), started=time.time())
    return address


def _connect(task: str, *, start: bool = True):
    from infra.ray_env import ensure_ray

    address = _ensure_cluster(task, start=start)
    return ensure_ray(address) if address else None


def _stop(spec) -> dict:
    """Delete the task's Serve apps; then, if this command started the Ray, end its process group
    (only that group: never `ray stop`, which would kill every Ray on the machine)."""
    state_path = _state_file(spec.task)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    names: list[str] = []
    ray = _connect(spec.task, start=False)  # never starts a head just to stop it
    if ray is not None:
        from ray import serve

        names = [n for n in serve.status().applications if n == spec.task or n.startswith(spec.task + "--")]
        for name in names:  # graceful (the router flushes its request log), all apps at once
            serve.delete(name, _blocking=False)
        deadline = time.time() + 60
        while names and set(names) & set(serve.status().applications) and time.time() < deadline:
            time.sleep(0.2)
        ray.shutdown()
    stopped_ray = False
    if state.get("pgid") and not os.environ.get("RAY_ADDRESS"):
        from infra.ray_env import stop_process_group

        if _head_alive(state):
            if not stop_process_group(state["pgid"]):
                raise CheckFailed(f"the local Ray (process group {state['pgid']}) did not stop")
            stopped_ray = True
        if state.get("temp_dir", "").startswith(_own_temp_prefix()):
            import shutil

            shutil.rmtree(state["temp_dir"], ignore_errors=True)
    state_path.unlink(missing_ok=True)
    return {"stopped_apps": names, "stopped_ray": stopped_ray, "pgid": state.get("pgid")}


def _own_temp_prefix() -> str:
    import tempfile

    return str(Path(tempfile.gettempdir()) / "crucible-ray-")


def _retire(spec, result: dict) -> str | None:
    """Delete the app of a model the router no longer routes to (after promote or rollback);
    Serve drains it gracefully. Kept when that model still serves in another role."""
    name = result.get("retired_app")
    if not name:
        return None
    live = _admin(spec, "GET", "/admin/status") or {}
    if name in (live.get("apps") or {}).values():  # it still serves a routed model (multi-LoRA)
        return None
    if _connect(spec.task, start=False) is None:
        return None
    from ray import serve

    if name in serve.status().applications:
        serve.delete(name)
    return name


# -- commands ---------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    @app.command("serve")
    @command
    def serve_cmd(spec_path: Path = SpecArg, host: Optional[str] = typer.Option(None, help="Bind address."),
                  port: Optional[int] = typer.Option(None, help="HTTP port."),
                  stop: bool = typer.Option(False, "--stop", help="Shut the app and the local Ray it started."),
                  set_: Optional[list[str]] = SetOpt, registry: Optional[str] = RegistryOpt,
                  as_json: bool = JsonOpt):
        """Start (or update) the task's Serve app: production, plus canary and shadow when set."""
        overrides = (set_ or []) + ([f"deploy.host={host}"] if host else []) + ([f"deploy.port={port}"] if port else [])
        spec, reg = _load(spec_path, overrides, registry)
        from pipelines.release import read_plan, record_event

        if stop:
            result = _stop(spec)
            record_event(reg, spec.task, {"action": "stop", **result}, read_plan(reg, spec.task, 0.0))
            emit(result, as_json, lambda: out.print(f"stopped {', '.join(result['stopped_apps']) or 'nothing'}"
                                                    + ("; local Ray stopped" if result["stopped_ray"] else "")))
            return
        plan = read_plan(reg, spec.task, spec.deploy.canary_weight)
        if not plan["models"]["production"]:
            raise ValueError(f"{spec.task}@production is not set: crucible deploy {spec_path} --model REF "
                             "--as production (or crucible registry alias)")
        url = f"http://{spec.deploy.host}:{spec.deploy.port}"
        _connect(spec.task)
        from ray import serve

        from serving.app import deploy

        serve.start(http_options={"host": spec.deploy.host, "port": spec.deploy.port})
        t0 = time.perf_counter()
        deploy(spec, plan, reg.uri)
        _update_state(spec.task, url=url)  # deploy/promote/rollback/status find the app here
        event = record_event(reg, spec.task, {"action": "serve", "url": url}, plan)
        result = {"url": url, **plan, "event": event, "seconds": round(time.perf_counter() - t0, 1)}
        emit(result, as_json, lambda: out.print(
            f"serving {spec.task} at {url}/v1  production {plan['models']['production']}"
            + (f", canary {plan['models']['canary']} at {plan['canary_weight']:.0%}" if plan['models']['canary'] else "")
            + (f", shadow {plan['models']['shadow']}" if plan['models']['shadow'] else ""), highlight=False))

    @app.command("deploy")
    @command
    def deploy_cmd(spec_path: Path = SpecArg, model: str = typer.Option(..., "--model", help="A model id or TASK@ALIAS."),
                   as_: str = typer.Option("canary", "--as", help="canary, shadow, or production (first deploy only)."),
                   weight: Optional[float] = typer.Option(None, "--weight", min=0, max=1, help="Canary traffic share."),
                   set_: Optional[list[str]] = SetOpt, registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
        """Put a model in front of traffic as the canary (weighted split) or the shadow (mirrored)."""
        spec, reg = _load(spec_path, set_, registry)
        from pipelines import release

        if as_ not in ("canary", "shadow", "production"):
            raise ValueError("--as: canary, shadow or production")
        ref = reg.get(model).id
        plan = release.read_plan(reg, spec.task, spec.deploy.canary_weight)
        if as_ == "production" and plan["models"]["production"]:
            raise ValueError(f"{spec.task}@production is {plan['models']['production']}: deploy the new model "
                             "--as canary and promote it")
        weight = spec.deploy.canary_weight if weight is None else weight
        live = None if as_ == "production" else _admin(spec, "POST", "/admin/deploy",
                                                        {"model": ref, "as": as_, "weight": weight})
        if live is None:  # no app running: the registry alone, picked up by the next `crucible serve`
            live = release.deploy(reg, spec.task, ref, as_, weight if as_ == "canary" else None,
                                  current_weight=plan["canary_weight"])
        emit(live, as_json, lambda: out.print(f"{ref} is now {as_}" + (f" at {weight:.0%}" if as_ == "canary" else "")
                                               + ("" if live.get("live", True) else " (registry only; no app running)"),
                                               highlight=False))

    @app.command("promote")
    @command
    def promote_cmd(spec_path: Path = SpecArg, force: bool = typer.Option(False, "--force", help="Promote even if "
                                                                            "the policy says wait."),
                    set_: Optional[list[str]] = SetOpt, registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
        """Make the canary production (needs its eval gate and live thresholds met, or --force)."""
        spec, reg = _load(spec_path, set_, registry)
        result = _admin(spec, "POST", "/admin/promote", {"force": force})
        if result is None:
            result = _offline_promote(spec, reg, force)
        else:
            result["deleted_app"] = _retire(spec, result)
        emit(result, as_json, lambda: out.print(f"promoted {result['model']} to production", highlight=False))

    @app.command("rollback")
    @command
    def rollback_cmd(spec_path: Path = SpecArg, set_: Optional[list[str]] = SetOpt,
                     registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
        """Send no more traffic to the canary and clear the canary alias; production is untouched."""
        spec, reg = _load(spec_path, set_, registry)
        result = _admin(spec, "POST", "/admin/rollback", {})
        if result is None:
            from pipelines.release import rollback

            result = rollback(reg, spec.task, reasons=["requested by an operator"])
        else:
            result["deleted_app"] = _retire(spec, result)
        emit(result, as_json, lambda: out.print(f"rolled back {result['model']}", highlight=False))

    @app.command("status")
    @command
    def status_cmd(spec_path: Path = SpecArg, set_: Optional[list[str]] = SetOpt,
                   registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
        """Who serves what, the canary weight, live metrics and the policy's current decision."""
        spec, reg = _load(spec_path, set_, registry)
        from pipelines.release import latest_events_manifest, read_plan

        live = None
        if os.environ.get("CRUCIBLE_ADMIN_TOKEN"):
            live = _admin(spec, "GET", "/admin/status")
        last = latest_events_manifest(reg, spec.task)
        result = {"task": spec.task, "url": _base_url(spec), "running": live is not None,
                  **(live or read_plan(reg, spec.task, spec.deploy.canary_weight)),
                  "recent_events": (last.metadata.get("events", []) if last else [])[-10:]}
        emit(result, as_json, lambda: _print_status(result))


def _offline_promote(spec, reg, force: bool) -> dict:
    from pipelines import release

    canary = release.read_plan(reg, spec.task, 0.0)["models"]["canary"]
    if not canary:
        raise ValueError(f"{spec.task}@canary is not set: nothing to promote")
    if not force:
        raise CheckFailed("no app is running, so there are no live metrics to judge the canary by; "
                          f"eval gate: {release.gate_verdict(reg, spec.task, canary)}; use --force to promote anyway")
    return release.promote(reg, spec.task, reasons=["forced offline"])


def _print_status(r: dict) -> None:
    from rich.table import Table

    out.print(f"[bold]{r['task']}[/bold] at {r['url']}: " + ("running" if r["running"] else "not running (registry view)"))
    table = Table()
    for col in ("role", "model", "requests", "errors", "validity", "p50 ms", "p95 ms"):
        table.add_column(col)
    for role, ref in r["models"].items():
        s = (r.get("live") or {}).get(role) or {}
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        table.add_row(role + (f" ({r['canary_weight']:.0%})" if role == "canary" and ref else ""), ref or "-",
                      str(s.get("requests", "-")), str(s.get("errors", "-")), fmt(s.get("validity"), ".1%"),
                      fmt(s.get("p50_ms"), ".0f"), fmt(s.get("p95_ms"), ".0f"))
    out.print(table)
    if r.get("decision"):
        out.print(f"policy: {r['decision']['action']} — {'; '.join(r['decision']['reasons'])}", highlight=False)
    for e in r["recent_events"][-5:]:
        out.print(f"  {e.get('at')} {e.get('action')} {e.get('model', '')}", highlight=False)


def main() -> None:
    from infra.ray_env import prepare_local_env

    prepare_local_env()
    app = typer.Typer(add_completion=False)
    register(app)
    sys.argv.insert(1, "serve")
    app()


if __name__ == "__main__":
    main()
