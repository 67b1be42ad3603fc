"""The Serve application, assembled: one Serve app per model, and a router app on ``/``.

Keeping each model in its own Serve application lets the router change who serves what at run
time (deploy a canary, promote it, roll it back) without redeploying itself or reloading any
model: a promotion is a pointer swap inside the router, so no in-flight request is dropped; a
retired model's app is deleted afterwards, and Serve drains it gracefully.

The parts: ``serving.protocol`` (request and response models), ``serving.errors`` (every error
answer), ``serving.replica`` (model replicas and the interface the router calls), ``serving.router``
(the OpenAI routes), ``serving.admin`` (run-time changes, written through ``pipelines.release``),
``serving.traffic`` (the sticky split and the shadow mirror), ``serving.policy`` (rollback and
promotion rules), ``serving.metrics`` and ``serving.requestlog``. ``deploy(spec, plan)`` starts
everything.
"""

from ray import serve

from serving.replica import actor_options, app_name, replica_for, replica_http  # noqa: F401 - app_name is re-exported

# -- model apps ---------------------------------------------------------------------------------------
def model_target(spec, ref: str, registry_uri: str, faults: dict | None = None, adapters: tuple[str, ...] = (),
                 *, http: dict | None):
    """The Serve app (a ``RunTarget``) for one model; ``adapters``: LoRA adapters of its base served
    beside it (vLLM only, see ``serving.vllm_replica.shared_hosts``); ``http``: its private HTTP route
    and token (``serving.replica.replica_http``), or None for no route."""
    from ray.serve.api import RunTarget

    from serving.vllm_replica import vllm_target

    d = spec.deploy
    name = app_name(spec.task, ref)
    app = vllm_target(spec, ref, registry_uri, faults, adapters, http) if d.engine != "hf" else None
    if app is None:  # vLLM wherever it runs this model; the HF replica is the fallback
        app = replica_for(d.engine).options(num_replicas=d.replicas, ray_actor_options=actor_options(d.num_cpus),
                                            max_queued_requests=4 * d.max_concurrency).bind(
            ref, registry_uri, d.engine, faults, d.threads_per_replica, http=http)
    return RunTarget(app, name=name, route_prefix=http["route"] if http else None)


def deploy_model(spec, ref: str, registry_uri: str, *, faults: dict | None = None) -> str:
    """Run (or keep) the Serve app for one model; returns its app name once it is healthy."""
    from infra.registry import Registry

    ref = Registry.open(registry_uri).get(ref).id
    target = model_target(spec, ref, registry_uri, faults, http=replica_http(app_name(spec.task, ref)))
    serve.run(target.target, name=target.name, route_prefix=target.route_prefix)
    return target.name


def running_apps() -> set[str]:
    return set(serve.status().applications)


def _http_for(name: str, running: set[str]) -> dict | None:
    """A model app's private route: a running app keeps the one it has (a new token would change its
    arguments, and Serve would restart its replicas, reloading the model)."""
    if name in running:
        try:
            return serve.get_app_handle(name).http_route.remote().result(timeout_s=60)
        except Exception as e:  # noqa: BLE001 - an app from before routes existed: it gets one now
            import logging

            logging.getLogger(__name__).info("%s: no private route to keep (%s)", name, type(e).__name__)
    return replica_http(name)


def deploy(spec, plan: dict, registry_uri: str, *, faults: dict | None = None, extra: tuple[str, ...] = ()) -> dict:
    """Start every model in ``plan`` (and ``extra`` refs, started but unrouted) and the router, all
    at once so the models load in parallel; a canary or shadow that is an adapter of production's base
    gets no app of its own (``plan["hosts"]`` says who serves it). ``faults``: {ref: faults}, tests only."""
    from ray.serve.api import RunTarget

    from serving.router import Router
    from serving.vllm_replica import shared_hosts

    faults = faults or {}
    hosts = shared_hosts(spec, plan["models"], registry_uri)  # adapters served by production's replica
    plan = {**plan, "hosts": hosts}
    refs = [r for r in dict.fromkeys([r for r in plan["models"].values() if r] + list(extra)) if r not in hosts]
    running = running_apps()
    targets = [model_target(spec, ref, registry_uri, faults.get(ref), tuple(a for a, h in hosts.items() if h == ref),
                            http=_http_for(app_name(spec.task, ref), running)) for ref in refs]
    router = Router.options(ray_actor_options=actor_options(0), max_ongoing_requests=spec.deploy.max_concurrency + 32)
    targets.append(RunTarget(router.bind(spec.to_dict(), plan, registry_uri), name=spec.task, route_prefix="/"))
    serve.run_many(targets)
    return plan


# -- application builders for a declarative config (KubeRay RayService serveConfigV2) ------------------
# Serve deploys each ``applications[]`` entry of a config by calling its ``import_path`` with the
# entry's ``args`` (a dict); one entry is one application. So the router and every model are
# separate entries: ``build_app`` (the router, on "/") and ``build_model_app`` (one model, no route),
# the same applications ``deploy`` starts imperatively.
def _spec_and_registry(args: dict):
    from infra.registry import Registry
    from pipelines.spec import load_spec

    if not args.get("spec"):
        raise ValueError("application args need 'spec': the path of the spec YAML (relative to the working dir)")
    spec = load_spec(args["spec"], list(args.get("set") or []))
    reg = Registry.open(args.get("registry") or spec.registry)
    return spec, reg


def build_app(args: dict):
    """The router application for a config: ``args`` = {spec, registry (default: the spec's),
    set (spec overrides)}. The plan (production/canary/shadow, canary weight) is read from the
    registry when the application is built; the models' own applications are separate entries
    (``build_model_app``), named ``app_name(task, model_id)``."""
    from pipelines.release import read_plan
    from serving.router import Router

    spec, reg = _spec_and_registry(args)
    plan = read_plan(reg, spec.task, spec.deploy.canary_weight)
    if not plan["models"]["production"]:
        raise ValueError(f"{spec.task}@production is not set in {reg.uri}")
    router = Router.options(ray_actor_options=actor_options(0), max_ongoing_requests=spec.deploy.max_concurrency + 32)
    return router.bind(spec.to_dict(), plan, reg.uri)


def build_model_app(args: dict):
    """One model's application for a config: ``args`` = {spec, registry, model (an id or
    TASK@ALIAS)}. Its application name in the config must be ``app_name(task, model_id)``."""
    spec, reg = _spec_and_registry(args)
    if not args.get("model"):
        raise ValueError("model application args need 'model': a model id or TASK@ALIAS")
    ref = reg.get(str(args["model"])).id
    return model_target(spec, ref, reg.uri, http=None).target  # the config's entry has no route
