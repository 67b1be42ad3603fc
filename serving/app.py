"""The Serve application: one Serve app per model (no HTTP route), and a router app on ``/``.

Keeping each model in its own Serve application lets the router change who serves what at run
time (deploy a canary, promote it, roll it back) without redeploying itself or reloading any
model: a promotion is a pointer swap inside the router, so no in-flight request is dropped; a
retired model's app is deleted afterwards, and Serve drains it gracefully.

``deploy(spec, plan)`` starts everything; ``serving.router`` decides the split and mirrors to the
shadow; ``serving.policy`` decides rollbacks and promotions; ``serving.requestlog`` logs traffic.
"""

import asyncio
import hashlib
import json
import logging
import random
import threading
import time
import uuid

from ray import serve

from pipelines.templates import with_system_prompt

log = logging.getLogger(__name__)


# Forwarded from the deployer's environment into replicas (Ray does not pass the driver's env):
# the admin token, where model files are cached, and object-store credentials for s3:// registries.
FORWARD_ENV = ("CRUCIBLE_ADMIN_TOKEN", "CRUCIBLE_CACHE", "HF_HUB_OFFLINE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


def actor_options(num_cpus: float) -> dict:
    import os

    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    return {"num_cpus": num_cpus, "runtime_env": {"env_vars": env}}


def app_name(task: str, ref: str) -> str:
    """The Serve app holding one model: the task plus the model id's random suffix."""
    return f"{task}--{ref.rsplit('-', 1)[-1]}"


# -- model replicas -----------------------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=16, graceful_shutdown_timeout_s=30)
class ModelReplica:
    """One model behind the engine interface; concurrent requests are batched into one generate.

    ``faults`` is fault injection for tests only (``error_rate``, ``delay_s``): it makes a real
    replica fail or stall so the router's isolation and rollback can be tested over real HTTP.
    """

    def __init__(self, ref: str, registry_uri: str, engine: str = "auto", faults: dict | None = None,
                 threads: int | None = None):
        import torch

        from infra.registry import Registry
        from pipelines.engines import get_engine

        if threads and not torch.cuda.is_available():
            # Ray gives a replica one thread per whole CPU it asked for (at least 1). More threads than
            # cores across the node's replicas makes every one of them crawl, so only on request.
            torch.set_num_threads(threads)
        reg = Registry.open(registry_uri)
        self.ref = reg.get(ref).id
        self.engine = get_engine(engine, model=self.ref, registry=reg)
        self.tokenizer = getattr(self.engine, "tokenizer", None)
        self.system_prompt = getattr(self.engine, "default_system_prompt", None)
        self.faults = faults or {}
        self.lock = threading.Lock()

    async def generate(self, messages: list[dict], params: dict) -> dict:
        if self.faults.get("delay_s"):
            await asyncio.sleep(self.faults["delay_s"])
        if random.random() < self.faults.get("error_rate", 0.0):
            raise RuntimeError(f"injected fault in {self.ref} (test-only fault injection)")
        limit = params.pop("max_prompt_tokens", None)
        if limit and self.tokenizer is not None:
            text = self.tokenizer.apply_chat_template(with_system_prompt(messages, self.system_prompt),
                                                      tokenize=False, add_generation_prompt=True)
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > limit:
                return {"error": f"the prompt has {n} tokens; this deployment takes at most {limit}", "status": 400}
        return await self._batched((messages, params))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[tuple[list[dict], dict]]) -> list[dict]:
        # one generate per distinct parameter set: requests differ mostly in messages
        return await asyncio.to_thread(self._generate_groups, items)

    def _generate_groups(self, items):
        from pipelines.engines import GenParams

        out: list[dict | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (_, p) in enumerate(items):
            groups.setdefault(json.dumps(p, sort_keys=True), []).append(i)
        with self.lock:
            for key, idx in groups.items():
                p = json.loads(key)
                params = GenParams(max_new_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                                   stop=tuple(p["stop"]), seed=p["seed"], guide=p.get("guide"))
                # a request without a system message gets the model's saved one, as in eval and predict
                chats = [with_system_prompt(items[i][0], self.system_prompt) for i in idx]
                for i, c in zip(idx, self.engine.generate(chats, params)):
                    out[i] = {"text": c.text, "prompt_tokens": c.prompt_tokens,
                              "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
                              "model": self.ref}
        return out

    def info(self) -> dict:
        return {"model": self.ref, "engine": self.engine.name}


def model_target(spec, ref: str, registry_uri: str, faults: dict | None = None):
    """The Serve app (a ``RunTarget``) for one model, without an HTTP route."""
    from ray.serve.api import RunTarget

    from serving.vllm_replica import vllm_target

    d = spec.deploy
    if d.engine != "hf" and (target := vllm_target(spec, ref, registry_uri, faults)) is not None:
        return target  # vLLM wherever it runs this model; the HF replica below is the fallback
    app = ModelReplica.options(num_replicas=d.replicas, ray_actor_options=actor_options(d.num_cpus),
                               max_queued_requests=4 * d.max_concurrency).bind(ref, registry_uri, d.engine, faults,
                                                                               d.threads_per_replica)
    return RunTarget(app, name=app_name(spec.task, ref), route_prefix=None)


def deploy_model(spec, ref: str, registry_uri: str, *, faults: dict | None = None) -> str:
    """Run (or keep) the Serve app for one model; returns its app name once it is healthy."""
    from infra.registry import Registry

    ref = Registry.open(registry_uri).get(ref).id
    target = model_target(spec, ref, registry_uri, faults)
    serve.run(target.target, name=target.name, route_prefix=None)
    return target.name


def running_apps() -> set[str]:
    return set(serve.status().applications)


def deploy(spec, plan: dict, registry_uri: str, *, faults: dict | None = None, extra: tuple[str, ...] = ()) -> dict:
    """Start every model in ``plan`` (and ``extra`` refs, started but unrouted) and the router, all
    at once so the models load in parallel. ``faults``: {ref: faults}, tests only."""
    from ray.serve.api import RunTarget

    faults = faults or {}
    refs = dict.fromkeys([r for r in plan["models"].values() if r] + list(extra))
    targets = [model_target(spec, ref, registry_uri, faults.get(ref)) for ref in refs]
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
    from serving.state import read_plan

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
    return model_target(spec, ref, reg.uri).target


# -- the router ---------------------------------------------------------------------------------------
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

api = FastAPI(title="crucible", docs_url=None, redoc_url=None)


def _error(status: int, message: str, model: str | None, kind: str = "invalid_request_error", **headers) -> JSONResponse:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if model:
        h["x-crucible-model"] = model
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=h)


def _status_of(exc: Exception) -> int:
    """503 when Serve refused the request for back-pressure, else 502 (the replica failed)."""
    name = type(exc).__name__
    return 503 if "BackPressure" in name else 502


@serve.deployment(graceful_shutdown_timeout_s=30)
@serve.ingress(api)
class Router:
    def __init__(self, spec: dict, plan: dict, registry_uri: str):
        from pipelines.contract import Checker
        from pipelines.guide import guide_for
        from pipelines.spec import Spec
        from serving.policy import LiveStats
        from serving.requestlog import RequestLog
        from serving.router import Mirror

        self.spec = Spec.model_validate(spec)
        self._handles: dict = {}  # model ref -> its app's handle (see _handle)
        self.cfg = self.spec.deploy
        self.task = self.spec.task
        self.registry_uri = registry_uri
        self.checker = Checker(self.spec.contract)
        self.default_guide = guide_for(self.spec.contract)
        self.models: dict[str, str | None] = dict(plan["models"])
        self.weight = float(plan.get("canary_weight", 0.0))
        self.stats = {role: LiveStats() for role in ("production", "canary", "shadow")}
        self.mirror = Mirror(limit=self.cfg.max_concurrency)
        self.log = RequestLog(registry_uri, self.task, flush_rows=self.cfg.log_flush_rows)
        self.in_flight = 0
        self.rejected = 0
        self.gate_cache: dict[str, tuple[float, bool | None]] = {}
        self.admin_lock = asyncio.Lock()
        self.last_decision: dict | None = None

    # -- helpers -------------------------------------------------------------------------------
    def _handle(self, ref: str):
        # One handle per model app, kept: get_app_handle asks the controller (a blocking call, ~1 ms,
        # inside the request path). A handle follows its app by name across redeploys.
        if ref not in self._handles:
            self._handles[ref] = serve.get_app_handle(app_name(self.task, ref))
        return self._handles[ref]

    def _plan(self) -> dict:
        return {"task": self.task, "models": dict(self.models), "canary_weight": self.weight}

    def _registry(self):
        from infra.registry import Registry

        return Registry.open(self.registry_uri)

    async def _record(self, event: dict) -> str:
        from serving.state import record_event

        plan = self._plan()
        return await asyncio.to_thread(lambda: record_event(self._registry(), self.task, event, plan))

    def _gate(self, ref: str) -> bool | None:
        cached = self.gate_cache.get(ref)
        if cached and time.time() - cached[0] < 30:
            return cached[1]
        from serving.state import gate_verdict

        verdict = gate_verdict(self._registry(), self.task, ref)
        self.gate_cache[ref] = (time.time(), verdict)
        return verdict

    # -- OpenAI-compatible routes ---------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        return JSONResponse({"status": "ok", "models": self.models},
                            headers={"x-crucible-model": self.models["production"] or ""})

    @api.get("/v1/models")
    async def list_models(self):
        data = [{"id": self.task, "object": "model", "owned_by": "crucible"}]
        data += [{"id": ref, "object": "model", "owned_by": "crucible", "role": role}
                 for role, ref in self.models.items() if ref and role != "shadow"]
        return JSONResponse({"object": "list", "data": data},
                            headers={"x-crucible-model": self.models["production"] or ""})

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        prod = self.models["production"]
        if self.in_flight >= self.cfg.max_concurrency:
            self.rejected += 1
            return _error(503, f"overloaded: {self.in_flight} requests in flight; retry shortly", prod,
                          "overloaded", Retry_After="1")
        self.in_flight += 1
        try:
            return await self._chat(request)
        except Exception as e:  # noqa: BLE001 - a bug here must still answer, with the header
            log.exception("router error")
            return _error(500, f"router error: {type(e).__name__}: {e}", prod, "server_error")
        finally:
            self.in_flight -= 1

    async def _chat(self, request: Request):
        from serving.router import choose, sticky_key

        prod = self.models["production"]
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > self.cfg.max_body_bytes:
            return _error(413, f"request body is {size} bytes; the limit is {self.cfg.max_body_bytes}", prod)
        raw = await request.body()
        if len(raw) > self.cfg.max_body_bytes:
            return _error(413, f"request body is {len(raw)} bytes; the limit is {self.cfg.max_body_bytes}", prod)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the body is not valid JSON: {e}", prod)
        problem, messages, params = self._parse(body)
        if problem:
            return _error(400, problem, prod)
        key = sticky_key(body, request.headers)
        wanted = body.get("model")
        if wanted in (None, "", self.task):
            role = choose(key, self.weight, has_canary=bool(self.models["canary"]), salt=self.task)
        else:
            role = next((r for r, ref in self.models.items() if ref == wanted and r != "shadow"), None)
            if role is None:
                return _error(404, f"model {wanted!r} is not served here; use {self.task!r} or one of "
                                   f"{[m for r, m in self.models.items() if m and r != 'shadow']} (GET /v1/models)",
                              prod, "model_not_found")
        ref = self.models[role]
        user_hash = hashlib.sha256(key.encode()).hexdigest()[:16] if key else None
        primary_done = asyncio.get_running_loop().create_future()
        mirrored = bool(self.models["shadow"]) and self._mirror(messages, params, primary_done)
        start = time.perf_counter()
        status, answer, result, message = 200, None, None, ""
        try:
            result = await asyncio.wait_for(self._handle(ref).generate.remote(messages, dict(params)),
                                            timeout=self.cfg.request_timeout_s)
            if "error" in result:
                status, message = result["status"], result["error"]
            else:
                answer = result["text"]
        except asyncio.TimeoutError:
            status, message = 504, f"the model took longer than {self.cfg.request_timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - a replica error is an answer, never an outage
            status, message = _status_of(e), f"the model failed: {type(e).__name__}: {str(e)[:300]}"
        latency = time.perf_counter() - start
        verdict = self.checker.check(answer) if answer is not None else None
        if status < 400 or status >= 500:
            self.stats[role].record(status == 200, verdict.valid if verdict else None, latency)
        row = dict(messages=messages, answer=answer, model=ref, role=role, latency_ms=latency * 1000,
                   valid=verdict.valid if verdict else None, reason=verdict.reason if verdict else message,
                   status=status, user_hash=user_hash)
        if not primary_done.done():
            primary_done.set_result(row)
        if not mirrored:  # else the shadow task logs both answers side by side
            self._log(row)
        if role == "canary":
            await self._maybe_act()
        if status != 200:
            kind = "overloaded" if status == 503 else "model_error" if status >= 500 else "invalid_request_error"
            extra = {"Retry_After": "1"} if status == 503 else {}
            return _error(status, message, ref, kind, **extra)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": ref,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": result["finish_reason"]}],
            "usage": {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                      "total_tokens": result["prompt_tokens"] + result["completion_tokens"]},
            "crucible": {"role": role, "valid": verdict.valid, "reason": verdict.reason}},
            headers={"x-crucible-model": ref})

    def _parse(self, body) -> tuple[str | None, list[dict], dict]:
        """(problem, messages, params); problem names the field for a 400."""
        if not isinstance(body, dict):
            return "the body must be a JSON object", [], {}
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' is required: a non-empty list of {role, content}", [], {}
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
                return f"messages[{i}]: needs a role of system, user, assistant or tool", [], {}
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                return f"messages[{i}].content: must be a string", [], {}
            clean.append({"role": m["role"], "content": content})
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 64))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return "'max_tokens' must be a positive integer", [], {}
        if max_tokens > self.cfg.max_new_tokens:
            return f"'max_tokens' is {max_tokens}; this deployment allows at most {self.cfg.max_new_tokens}", [], {}
        temperature, top_p = body.get("temperature", 0.0), body.get("top_p", 1.0)
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            return "'temperature' must be a number from 0 to 2", [], {}
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            return "'top_p' must be a number in (0, 1]", [], {}
        if body.get("stream"):
            return "'stream' is not supported by this deployment yet; send stream: false", [], {}
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            return "'stop' must be a string or a list of strings", [], {}
        if sum(len(m["content"]) for m in clean) > 8 * self.cfg.max_prompt_tokens:
            return f"the prompt is far longer than max_prompt_tokens {self.cfg.max_prompt_tokens}", [], {}
        seed = body.get("seed", 0)
        problem, guide = self._guide(body)
        if problem:
            return problem, [], {}
        params = {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
                  "stop": stop, "seed": seed if isinstance(seed, int) else 0,
                  "max_prompt_tokens": self.cfg.max_prompt_tokens, "guide": guide}
        return None, clean, params

    def _guide(self, body: dict) -> tuple[str | None, str | None]:
        """Constrained decoding for this request: OpenAI's ``response_format`` (json_schema,
        json_object, text), vLLM's ``structured_outputs`` ({"json": …} or {"choice": […]}), else the
        contract's own guide when the spec turns ``contract.constrained_decoding`` on."""
        from pipelines.guide import Guide

        rf, so = body.get("response_format"), body.get("structured_outputs")
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind == "text":
                return None, None
            if kind == "json_object":
                g = {"json_schema": {"type": "object"}}
            elif kind == "json_schema" and isinstance((rf.get("json_schema") or {}).get("schema"), dict):
                g = {"json_schema": rf["json_schema"]["schema"]}
            else:
                return "'response_format' must be {type: text | json_object | json_schema, json_schema: {schema}}", None
        elif so is not None:
            if isinstance(so, dict) and isinstance(so.get("json"), dict):
                g = {"json_schema": so["json"]}
            elif isinstance(so, dict) and isinstance(so.get("choice"), list) and so["choice"]:
                g = {"choice": [str(c) for c in so["choice"]]}
            else:
                return "'structured_outputs' must be {json: SCHEMA} or {choice: [...]}", None
        else:
            return None, self.default_guide
        try:
            Guide.from_spec(g)
        except (ValueError, KeyError, TypeError) as e:
            return f"constrained decoding: {e}", None
        return None, json.dumps(g)

    # -- shadow and logging ---------------------------------------------------------------------
    def _mirror(self, messages, params, primary_done: asyncio.Future) -> bool:
        """Send the request to the shadow in the background; log both answers when both are in."""
        shadow_ref = self.models["shadow"]

        async def call():
            start = time.perf_counter()
            shadow = {"model": shadow_ref}
            try:
                res = await asyncio.wait_for(self._handle(shadow_ref).generate.remote(messages, dict(params)),
                                             timeout=self.cfg.shadow_timeout_s)
                ok = "error" not in res
                shadow.update(answer=res.get("text"), status=200 if ok else res["status"])
                verdict = self.checker.check(res.get("text")) if ok else None
                shadow["valid"] = verdict.valid if verdict else None
            except Exception as e:  # noqa: BLE001 - recorded, then swallowed by the mirror
                shadow.update(answer=None, status=504 if isinstance(e, asyncio.TimeoutError) else 502,
                              error=f"{type(e).__name__}: {str(e)[:200]}", valid=None)
            shadow["latency_ms"] = round((time.perf_counter() - start) * 1000, 2)
            self.stats["shadow"].record(shadow["status"] == 200, shadow.get("valid"), shadow["latency_ms"] / 1000)
            row = await primary_done
            self._log({**row, "shadow": shadow})

        return self.mirror.submit(call)

    def _log(self, row: dict) -> None:
        if not self.cfg.log_requests:
            return
        from serving.requestlog import make_row

        shadow = row.pop("shadow", None)
        if self.log.append(make_row(**row, shadow=shadow)):  # the registry write runs off the event loop
            asyncio.get_running_loop().run_in_executor(None, self.log.flush)

    # -- policy -----------------------------------------------------------------------------------
    def _decision(self):
        from serving.policy import decide

        canary = self.models["canary"]
        if not canary:
            return None
        return decide(self.stats["production"].summary(), self.stats["canary"].summary(), self.cfg,
                      self._gate(canary))

    async def _maybe_act(self) -> None:
        if not (self.cfg.auto_rollback or self.cfg.auto_promote) or self.admin_lock.locked():
            return
        decision = await asyncio.to_thread(self._decision)
        if decision is None:
            return
        self.last_decision = decision.to_dict()
        if decision.action == "rollback" and self.cfg.auto_rollback and self.weight > 0:
            await self._rollback(reasons=decision.reasons, automatic=True)
        elif decision.action == "promote" and self.cfg.auto_promote:
            await self._promote(reasons=decision.reasons, automatic=True)

    async def _rollback(self, reasons: list[str], automatic: bool) -> dict:
        async with self.admin_lock:
            canary = self.models["canary"]
            if not canary:
                raise ValueError("there is no canary to roll back")
            self.weight = 0.0  # first: from this instant no request goes to the canary
            summary = self.stats["canary"].summary()
            await asyncio.to_thread(self._set_alias, "canary", None)
            self.models["canary"] = None
            event = {"action": "rollback", "automatic": automatic, "model": canary, "reasons": reasons,
                     "canary_stats": summary, "production": self.models["production"]}
            event_id = await self._record(event)
            self.stats["canary"].reset()
            return {**event, "event": event_id, "retired_app": app_name(self.task, canary)}

    async def _promote(self, reasons: list[str], automatic: bool) -> dict:
        async with self.admin_lock:
            canary, old = self.models["canary"], self.models["production"]
            if not canary:
                raise ValueError("there is no canary to promote")
            # the swap is two pointer writes in one event-loop step: every request sees one model
            self.models["production"], self.models["canary"], self.weight = canary, None, 0.0
            self.stats["production"], self.stats["canary"] = self.stats["canary"], self.stats["production"]
            self.stats["canary"].reset()
            await asyncio.to_thread(self._set_alias, "production", canary)
            await asyncio.to_thread(self._set_alias, "canary", None)
            event = {"action": "promote", "automatic": automatic, "model": canary, "previous": old,
                     "reasons": reasons}
            event_id = await self._record(event)
            return {**event, "event": event_id, "retired_app": app_name(self.task, old)}

    def _set_alias(self, role: str, ref: str | None) -> None:
        from serving.state import set_role

        set_role(self._registry(), self.task, role, ref)

    # -- admin routes ---------------------------------------------------------------------------
    def _denied(self, request: Request) -> JSONResponse | None:
        from serving.auth import admin_ok

        if admin_ok(request.headers.get("authorization")):
            return None
        return _error(401, "admin routes need 'Authorization: Bearer <CRUCIBLE_ADMIN_TOKEN>'",
                      self.models["production"], "unauthorized", WWW_Authenticate="Bearer")

    async def _admin_body(self, request: Request) -> dict:
        raw = await request.body()
        if not raw:
            return {}
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    def _admin_reply(self, payload: dict, status: int = 200) -> JSONResponse:
        return JSONResponse(payload, status_code=status, headers={"x-crucible-model": self.models["production"] or ""})

    @api.get("/admin/status")
    async def admin_status(self, request: Request):
        if denied := self._denied(request):
            return denied
        return self._admin_reply(await asyncio.to_thread(self.status))

    def status(self) -> dict:
        decision = self._decision()
        return {"task": self.task, "models": self.models, "canary_weight": self.weight,
                "live": {r: s.summary() for r, s in self.stats.items()}, "shadow_mirror": self.mirror.stats(),
                "in_flight": self.in_flight, "rejected_overload": self.rejected,
                "decision": decision.to_dict() if decision else None,
                "request_log": {"buffered": len(self.log.rows), "manifests": self.log.written}}

    @api.post("/admin/weights")
    async def admin_weights(self, request: Request):
        if denied := self._denied(request):
            return denied
        try:
            body = await self._admin_body(request)
            w = body.get("canary_weight")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w <= 1:
                raise ValueError("'canary_weight' must be a number from 0 to 1")
            if w > 0 and not self.models["canary"]:
                raise ValueError("there is no canary: deploy one first")
        except ValueError as e:
            return _error(400, str(e), self.models["production"])
        async with self.admin_lock:
            previous, self.weight = self.weight, float(w)
            event_id = await self._record({"action": "weights", "canary_weight": self.weight, "previous": previous})
        return self._admin_reply({"canary_weight": self.weight, "previous": previous, "event": event_id})

    @api.post("/admin/rollback")
    async def admin_rollback(self, request: Request):
        if denied := self._denied(request):
            return denied
        try:
            return self._admin_reply(await self._rollback(["requested by an operator"], automatic=False))
        except ValueError as e:
            return _error(409, str(e), self.models["production"])

    @api.post("/admin/promote")
    async def admin_promote(self, request: Request):
        if denied := self._denied(request):
            return denied
        try:
            body = await self._admin_body(request)
            self.gate_cache.pop(self.models["canary"] or "", None)  # an operator's call reads the newest eval
            decision = await asyncio.to_thread(self._decision)
            if decision is None:
                raise ValueError("there is no canary to promote")
            if decision.action != "promote" and not body.get("force"):
                return _error(409, "the policy does not allow promotion yet: " + "; ".join(decision.reasons)
                              + " (send {\"force\": true} to override)", self.models["production"], "policy")
            reasons = decision.reasons if decision.action == "promote" else ["forced by an operator"] + decision.reasons
            return self._admin_reply(await self._promote(reasons, automatic=False))
        except ValueError as e:
            return _error(409, str(e), self.models["production"])

    @api.post("/admin/deploy")
    async def admin_deploy(self, request: Request):
        """``{"model": REF, "as": "canary"|"shadow", "weight": w}``: start its app if needed, then route."""
        if denied := self._denied(request):
            return denied
        try:
            body = await self._admin_body(request)
            role = body.get("as", "canary")
            if role not in ("canary", "shadow"):
                raise ValueError("'as' must be 'canary' or 'shadow' (use promote to change production)")
            weight = body.get("weight", self.cfg.canary_weight if role == "canary" else None)
            if role == "canary" and (not isinstance(weight, (int, float)) or not 0 <= weight <= 1):
                raise ValueError("'weight' must be a number from 0 to 1")
            ref = await asyncio.to_thread(lambda: self._registry().get(str(body.get("model"))).id)
        except Exception as e:  # noqa: BLE001 - RefError, ValueError, JSON errors: all the caller's input
            return _error(400, str(e), self.models["production"])
        name = app_name(self.task, ref)
        if name not in await asyncio.to_thread(running_apps):
            # a new model's app starts beside the running ones; traffic moves only once it is up
            await asyncio.to_thread(deploy_model, self.spec, ref, self.registry_uri)
        async with self.admin_lock:
            previous = self.models[role]
            self.stats[role].reset()
            self.models[role] = ref
            if role == "canary":
                self.weight = float(weight)
            await asyncio.to_thread(self._set_alias, role, ref)
            event = {"action": "deploy", "as": role, "model": ref, "previous": previous,
                     **({"canary_weight": self.weight} if role == "canary" else {})}
            event_id = await self._record(event)
        return self._admin_reply({**event, "event": event_id, "app": name})

    @api.post("/admin/flush")
    async def admin_flush(self, request: Request):
        if denied := self._denied(request):
            return denied
        await asyncio.gather(*list(self.mirror.tasks), return_exceptions=True)
        return self._admin_reply({"manifest": await asyncio.to_thread(self.log.flush)})

    async def __del__(self):
        # Serve calls this on graceful shutdown: write what is still buffered
        try:
            await asyncio.to_thread(self.log.flush)
        except Exception:  # noqa: BLE001
            pass

