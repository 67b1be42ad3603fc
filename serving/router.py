"""The router: the OpenAI-compatible front of a task, on ``/``.

It parses a request (``serving.protocol``), picks production or the canary (``serving.traffic``),
calls that model's replica (``serving.replica``'s interface; over HTTP or a Serve handle, see
``serving.upstream``), mirrors to the shadow, checks the answer against the contract, counts it (live
stats for the policy, Prometheus metrics, the request log) and answers, as one JSON body or as
server-sent events. Every error answer is an ``APIError`` (``serving.errors``). Admin routes are
``serving.admin``.
"""


import asyncio
import hashlib
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from ray import serve

from serving import protocol as P
from serving.admin import AdminRoutes, routes
from serving.errors import APIError, bad_request, from_replica_failure, overloaded
from serving.replica import app_name

log = logging.getLogger(__name__)

api = FastAPI(title="crucible", docs_url=None, redoc_url=None)
api.include_router(routes)


class Call:
    """One request on its way through the router: where it goes, and its accounting when done
    (live stats, metrics, request log, the shadow's pairing, the policy), the same for a JSON answer
    and a stream."""

    def __init__(self, router: "Router", role: str, messages: list[dict], params: dict, key: str | None, *,
                 stream: bool, tools: bool, start: float):
        self.router, self.role, self.messages, self.params = router, role, messages, params
        self.ref = router.models[role]
        self.stream, self.tools = stream, tools
        self.user_hash = hashlib.sha256(key.encode()).hexdigest()[:16] if key else None
        self.start = start  # when the router took the request
        self.answered: float | None = None  # seconds from arrival to the answer (see latency)
        self.primary_done = asyncio.get_running_loop().create_future()
        self.mirrored = bool(router.models["shadow"]) and router._mirror(messages, params, self.primary_done)

    async def finish(self, answer: str | None, status: int, message: str, *, completion_tokens: int = 0,
                     alternatives: list[str] | None = None):
        """Check and account for the answer now; returns the contract's verdict (None without an answer)."""
        verdict = self.router.checker.check(answer) if answer is not None else None
        self.telemetry(verdict, answer, status, message, completion_tokens=completion_tokens,
                       alternatives=alternatives)()
        await self.settle(verdict, status)
        return verdict

    async def settle(self, verdict, status: int) -> None:
        """What the rollout policy needs before the answer goes out: the role's live stats, and for
        the canary the policy's decision, so a rollback or promotion has happened by the time the
        request that triggered it is answered."""
        r = self.router
        if status < 400 or status >= 500:  # a client's bad request says nothing about the model
            r.stats[self.role].record(status == 200, verdict.valid if verdict else None, self.latency())
        if self.role == "canary":
            await r._maybe_act()

    def telemetry(self, verdict, answer: str | None, status: int, message: str, *, completion_tokens: int = 0,
                  alternatives: list[str] | None = None):
        """The metrics and the request-log row for this answer, as a function to call once (a
        successful answer calls it after its response is sent: scrubbing PII for the log row and
        recording metrics take a few hundred microseconds the client need not wait for)."""
        latency = self.latency()

        def record() -> None:
            r = self.router
            valid = verdict.valid if verdict else None
            r.metrics.observe(role=self.role, model=self.ref, status=status, valid=valid, latency_s=latency,
                              completion_tokens=completion_tokens, stream=self.stream)
            row = dict(messages=self.messages, answer=answer, model=self.ref, role=self.role,
                       latency_ms=latency * 1000, valid=valid, reason=verdict.reason if verdict else message,
                       status=status, user_hash=self.user_hash)
            if alternatives:
                row["alternatives"] = alternatives
            if not self.primary_done.done():
                self.primary_done.set_result(row)
            if not self.mirrored:  # else the shadow task logs both answers side by side
                r._log(row)

        return record

    def latency(self) -> float:
        if self.answered is None:
            self.answered = time.perf_counter() - self.start
        return self.answered


def _timing(call: Call, result: dict, upstream_s: float) -> str:
    """A ``Server-Timing`` header: the router's whole time (``router``), its wait on the model replica
    (``upstream``: the hop there and back plus the replica's time; its ``desc`` says which hop, ``http``
    or ``handle``, see ``serving.upstream``), and where the replica reports them, its own time
    (``replica``) and its engine's (``engine``). So a client (bench.serve_vllm) can tell what each
    layer of serving adds to the engine."""
    parts = [f"router;dur={(time.perf_counter() - call.start) * 1000:.2f}",
             f'upstream;dur={upstream_s * 1000:.2f};desc="{result.get("via", "handle")}"']
    for name in ("replica", "engine"):
        if result.get(f"{name}_s") is not None:
            parts.append(f"{name};dur={result[f'{name}_s'] * 1000:.2f}")
    return ", ".join(parts)


def _after(record):
    """``record`` as a response's background task: Starlette runs it right after writing the body, in
    the request's own task and not in a thread (a coroutine function that awaits nothing), so a client
    that reads the request log or the metrics next finds this request there."""

    async def run() -> None:
        try:
            record()
        except Exception:  # noqa: BLE001 - the answer is out; a failed record must not look like a failed request
            log.exception("recording a request failed")

    return BackgroundTask(run)


# Defined after Call: Serve captures the class (and the module globals it uses) when it is decorated.
# no Serve access log: every request is in the request log and the metrics (see serving.vllm_replica)
@serve.deployment(graceful_shutdown_timeout_s=30, logging_config={"enable_access_log": False})
@serve.ingress(api)
class Router(AdminRoutes):
    def __init__(self, spec: dict, plan: dict, registry_uri: str):
        from pipelines.contract import Checker
        from pipelines.guide import guide_for
        from pipelines.spec import Spec
        from serving.metrics import RouterMetrics
        from serving.policy import LiveStats
        from serving.requestlog import RequestLog
        from serving.traffic import Mirror
        from serving.upstream import Upstream

        self.spec = Spec.model_validate(spec)
        self._handles: dict = {}  # app name -> its handle (see _app_handle)
        self.cfg = self.spec.deploy
        self.task = self.spec.task
        self.registry_uri = registry_uri
        self.checker = Checker(self.spec.contract)
        self.default_guide = guide_for(self.spec.contract)
        self.models: dict[str, str | None] = dict(plan["models"])
        # model ref -> the model whose app serves it, for adapters served beside production's base
        # (multi-LoRA in one vLLM replica); a model not listed has an app of its own
        self.hosts: dict[str, str] = dict(plan.get("hosts") or {})
        self.weight = float(plan.get("canary_weight", 0.0))
        self.stats = {role: LiveStats() for role in ("production", "canary", "shadow")}
        self.metrics = RouterMetrics(self.task)
        self.mirror = Mirror(limit=self.cfg.max_concurrency)
        self.log = RequestLog(registry_uri, self.task, flush_rows=self.cfg.log_flush_rows)
        self.in_flight = 0
        self.rejected = 0
        self.gate_cache: dict[str, tuple[float, bool | None]] = {}
        self.admin_lock = asyncio.Lock()
        self.last_decision: dict | None = None
        self.created: dict[str, int] = {}  # model ref -> its manifest's creation time (for /v1/models)
        self.upstream = Upstream(self._app_handle)

    # -- helpers -------------------------------------------------------------------------------
    def _app(self, ref: str) -> str:
        return app_name(self.task, self.hosts.get(ref, ref))

    def _handle(self, ref: str):
        return self._app_handle(self._app(ref))

    def _app_handle(self, name: str):
        # One handle per model app, kept: get_app_handle asks the controller (a blocking call, ~1 ms,
        # inside the request path). A handle follows its app by name across redeploys.
        if name not in self._handles:
            self._handles[name] = serve.get_app_handle(name)
        return self._handles[name]

    def _which(self, ref: str) -> tuple:
        """The replica call's trailing arguments: the model to use where its app hosts several."""
        return (ref,) if ref in self.hosts else ()

    def _unused_app(self, ref: str) -> str | None:
        """``ref``'s app once ``ref`` is no longer routed, unless it still serves a routed model."""
        name = self._app(ref)
        return None if any(m and self._app(m) == name for m in self.models.values()) else name

    def _registry(self):
        from infra.registry import Registry

        return Registry.open(self.registry_uri)

    def _gate(self, ref: str) -> bool | None:
        cached = self.gate_cache.get(ref)
        if cached and time.time() - cached[0] < 30:
            return cached[1]
        from pipelines.release import gate_verdict

        verdict = gate_verdict(self._registry(), self.task, ref)
        self.gate_cache[ref] = (time.time(), verdict)
        return verdict

    def _created(self, ref: str) -> int:
        if ref not in self.created:
            from datetime import datetime

            stamp = self._registry().get(ref).created_at
            self.created[ref] = int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        return self.created[ref]

    # -- OpenAI-compatible routes ---------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        return JSONResponse({"status": "ok", "models": self.models},
                            headers={"x-crucible-model": self.models["production"] or ""})

    @api.get("/v1/models")
    async def list_models(self):
        served = [(role, ref) for role, ref in self.models.items() if ref and role != "shadow"]
        created = await asyncio.to_thread(lambda: {ref: self._created(ref) for _, ref in served})
        cards = [P.ModelCard(id=self.task, created=created.get(self.models["production"], P.now()))]
        cards += [P.ModelCard(id=ref, created=created[ref], role=role) for role, ref in served]
        return JSONResponse({"object": "list", "data": [c.model_dump(exclude_none=True) for c in cards]},
                            headers={"x-crucible-model": self.models["production"] or ""})

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        prod = self.models["production"]
        start = time.perf_counter()
        if self.in_flight >= self.cfg.max_concurrency:
            self.rejected += 1
            return self._refused(overloaded(f"overloaded: {self.in_flight} requests in flight; retry shortly"),
                                 start)
        self.in_flight += 1
        self.metrics.set_in_flight(self.in_flight)
        handed_over = False  # a stream releases its in-flight slot when it ends
        try:
            answer = await self._chat(request, start)
            handed_over = isinstance(answer, StreamingResponse)
            return answer
        except APIError as e:
            return self._refused(e, start) if e.model is None else e.response(e.model)
        except Exception as e:  # noqa: BLE001 - a bug here must still answer, with the header
            log.exception("router error")
            return APIError(500, f"router error: {type(e).__name__}: {e}", code="router_error").response(prod)
        finally:
            if not handed_over:
                self._release_slot()

    def _refused(self, err: APIError, start: float):
        """An answer given before any model was chosen (overload, a bad request): counted under role
        ``none``; those that reached a model are counted by ``Call.finish``."""
        self.metrics.observe(role="none", model=None, status=err.status, valid=None,
                             latency_s=time.perf_counter() - start, completion_tokens=0, stream=False)
        return err.response(self.models["production"])

    def _release_slot(self) -> None:
        self.in_flight -= 1
        self.metrics.set_in_flight(self.in_flight)

    async def _read(self, request: Request) -> dict:
        limit = self.cfg.max_body_bytes
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limit:
            raise APIError(413, f"request body is {size} bytes; the limit is {limit}", code="body_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"request body is {len(raw)} bytes; the limit is {limit}", code="body_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the body is not valid JSON: {e}") from None

    async def _chat(self, request: Request, start: float):
        from serving.traffic import choose, sticky_key

        body = await self._read(request)
        req = P.parse_request(body)
        messages = req.chat()
        if sum(len(m["content"]) for m in messages) > 8 * self.cfg.max_prompt_tokens:
            raise bad_request(f"the prompt is far longer than max_prompt_tokens {self.cfg.max_prompt_tokens}",
                              "messages")
        contract = self.spec.contract
        if req.tools and contract.type != "tool_call" and req.tool_choice != "none":
            raise bad_request(f"'tools': this deployment's contract is {contract.type!r}; tool calls need a "
                              "tool_call contract", "tools")
        params = P.params_for(req, self.cfg, P.guide_for_request(req, contract, self.default_guide))
        key = sticky_key(body, request.headers)
        if req.model in (None, "", self.task):
            role = choose(key, self.weight, has_canary=bool(self.models["canary"]), salt=self.task)
        else:
            role = next((r for r, ref in self.models.items() if ref == req.model and r != "shadow"), None)
            if role is None:
                raise APIError(404, f"model {req.model!r} is not served here; use {self.task!r} or one of "
                                    f"{[m for r, m in self.models.items() if m and r != 'shadow']} (GET /v1/models)",
                               param="model", code="model_not_found")
        call = Call(self, role, messages, params, key, stream=req.stream,
                    tools=req.tools_wanted(contract.type), start=start)
        if req.stream:
            return await self._stream(call, include_usage=bool(req.stream_options and req.stream_options.include_usage))
        return await self._complete(call)

    async def _complete(self, call: "Call"):
        result = None
        sent = time.perf_counter()
        try:
            result = await asyncio.wait_for(self.upstream.generate(self._app(call.ref), call.messages, dict(call.params),
                                                                   *self._which(call.ref)),
                                            timeout=self.cfg.request_timeout_s)
            if "error" in result:
                raise APIError(result["status"], result["error"], param=result.get("param"))
        except Exception as e:  # noqa: BLE001 - a replica error is an answer, never an outage
            err = e if isinstance(e, APIError) else from_replica_failure(e, self.cfg.request_timeout_s)
            await call.finish(None, err.status, err.message)
            err.model = call.ref
            raise err from None
        upstream_s = time.perf_counter() - sent
        choices = result["choices"]
        tokens = sum(c["completion_tokens"] for c in choices)
        verdict = self.checker.check(choices[0]["text"])
        record = call.telemetry(verdict, choices[0]["text"], 200, "", completion_tokens=tokens,
                                alternatives=[c["text"] for c in choices[1:]])
        await call.settle(verdict, 200)
        out = []
        for i, c in enumerate(choices):
            calls = P.as_tool_calls(c["text"]) if call.tools else None
            message = P.ResponseMessage(content=None if calls else c["text"], tool_calls=calls)
            out.append(P.Choice(index=i, message=message, finish_reason="tool_calls" if calls else c["finish_reason"],
                                logprobs={"content": c["logprobs"]} if "logprobs" in c else None))
        body = P.ChatCompletion(id=P.new_id(), created=P.now(), model=call.ref, choices=out,
                                usage=P.usage(result["prompt_tokens"], tokens),
                                crucible={"role": call.role, "valid": verdict.valid, "reason": verdict.reason})
        headers = {"x-crucible-model": call.ref, "server-timing": _timing(call, result, upstream_s)}
        return JSONResponse(body.model_dump(exclude_none=True), headers=headers, background=_after(record))

    async def _stream(self, call: "Call", include_usage: bool):
        """Answer as server-sent events. The first replica item (the prompt's size, or an error such as
        a prompt over the limit) is awaited before answering, so such errors still get a JSON status."""
        gen = None

        async def first_item():
            nonlocal gen
            gen = await self.upstream.stream(self._app(call.ref), call.messages, dict(call.params), *self._which(call.ref))
            return await gen.__anext__()

        try:
            first = await asyncio.wait_for(first_item(), timeout=self.cfg.request_timeout_s)
            if "error" in first:
                raise APIError(first["status"], first["error"], param=first.get("param"))
        except Exception as e:  # noqa: BLE001
            err = e if isinstance(e, APIError) else from_replica_failure(e, self.cfg.request_timeout_s)
            if gen is not None:
                gen.cancel()
            await call.finish(None, err.status, err.message)
            err.model = call.ref
            raise err from None
        return StreamingResponse(self._events(call, gen, first["prompt_tokens"], include_usage),
                                 media_type="text/event-stream", headers={"x-crucible-model": call.ref})

    async def _events(self, call: "Call", gen, prompt_tokens: int, include_usage: bool):
        cid, created = P.new_id(), P.now()

        def chunk(delta: P.Delta | None = None, finish: str | None = None, usage=None) -> bytes:
            choices = [] if delta is None else [P.ChunkChoice(delta=delta, finish_reason=finish)]
            return P.sse(P.ChatCompletionChunk(id=cid, created=created, model=call.ref, choices=choices, usage=usage))

        parts: list[str] = []
        finish, tokens, status, message = None, 0, 499, "the client went away mid-stream"
        try:
            yield chunk(P.Delta(role="assistant", content=""))
            deadline = time.monotonic() + self.cfg.request_timeout_s
            try:
                while True:
                    item = await asyncio.wait_for(gen.__anext__(), timeout=max(0.01, deadline - time.monotonic()))
                    if "delta" in item:
                        parts.append(item["delta"])
                        if not call.tools:  # a tool call is sent whole, once its JSON is complete
                            yield chunk(P.Delta(content=item["delta"]))
                    else:
                        finish, tokens = item["finish_reason"], item["completion_tokens"]
            except StopAsyncIteration:
                pass
            except Exception as e:  # noqa: BLE001 - the replica failed mid-stream: an error event ends it
                err = from_replica_failure(e, self.cfg.request_timeout_s)
                status, message = err.status, err.message
                yield P.sse(json.dumps(err.body()))
                return
            text = "".join(parts)
            calls = P.as_tool_calls(text) if call.tools else None
            if calls:
                finish = "tool_calls"
                yield chunk(P.Delta(tool_calls=[{"index": i, **c} for i, c in enumerate(calls)]))
            elif call.tools:
                yield chunk(P.Delta(content=text))
            yield chunk(P.Delta(), finish or "stop")
            if include_usage:
                yield chunk(usage=P.usage(prompt_tokens, tokens))
            yield P.sse("[DONE]")
            status, message = 200, ""
        finally:
            if status != 200:
                gen.cancel()  # the client went away: stop the replica generating for no one
            self._release_slot()
            # bookkeeping must not be cut short by a client that went away: its own task
            asyncio.get_running_loop().create_task(
                call.finish("".join(parts) if status == 200 else None, status, message, completion_tokens=tokens))

    # -- shadow and logging ---------------------------------------------------------------------
    def _mirror(self, messages, params, primary_done: asyncio.Future) -> bool:
        """Send the request to the shadow in the background; log both answers when both are in."""
        shadow_ref = self.models["shadow"]
        params = {**params, "n": 1, "logprobs": None}  # the shadow's answer is compared, not returned

        async def call():
            start = time.perf_counter()
            shadow = {"model": shadow_ref}
            try:
                res = await asyncio.wait_for(self.upstream.generate(self._app(shadow_ref), messages, params,
                                                                    *self._which(shadow_ref)),
                                             timeout=self.cfg.shadow_timeout_s)
                ok = "error" not in res
                text = res["choices"][0]["text"] if ok else None
                shadow.update(answer=text, status=200 if ok else res["status"])
                verdict = self.checker.check(text) if ok else None
                shadow["valid"] = verdict.valid if verdict else None
            except Exception as e:  # noqa: BLE001 - recorded, then swallowed by the mirror
                shadow.update(answer=None, status=504 if isinstance(e, asyncio.TimeoutError) else 502,
                              error=f"{type(e).__name__}: {str(e)[:200]}", valid=None)
            shadow["latency_ms"] = round((time.perf_counter() - start) * 1000, 2)
            self.stats["shadow"].record(shadow["status"] == 200, shadow.get("valid"), shadow["latency_ms"] / 1000)
            self.metrics.observe(role="shadow", model=shadow_ref, status=shadow["status"], valid=shadow.get("valid"),
                                 latency_s=shadow["latency_ms"] / 1000, completion_tokens=0, stream=False)
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
        try:
            if decision.action == "rollback" and self.cfg.auto_rollback and self.weight > 0:
                await self._rollback(reasons=decision.reasons, automatic=True)
            elif decision.action == "promote" and self.cfg.auto_promote:
                await self._promote(reasons=decision.reasons, automatic=True)
        except APIError as e:  # a concurrent operator change got there first
            log.info("policy action skipped: %s", e.message)

    async def __del__(self):
        # Serve calls this on graceful shutdown: write what is still buffered
        try:
            await asyncio.to_thread(self.log.flush)
            await self.upstream.close()
        except Exception:  # noqa: BLE001
            pass
