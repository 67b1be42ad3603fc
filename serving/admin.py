"""The router's admin side: who serves what, changed at run time behind a bearer token.

Each change is first made in the router's memory (a pointer swap in one event-loop step, so every
request sees either the old or the new model, never half a change), then written through
``pipelines.release``, the one place deployment state is recorded. ``AdminRoutes`` is a mixin of
the ``Router`` deployment (``serving.router``); its routes are on ``routes``, included in the
router's FastAPI app.
"""


import asyncio
import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.errors import APIError, bad_request
from serving.replica import app_name

log = logging.getLogger(__name__)
routes = APIRouter(prefix="/admin")


class AdminRoutes:
    # -- changes (also called by the policy: automatic rollback and promotion) ----------------------
    async def _rollback(self, reasons: list[str], automatic: bool) -> dict:
        from pipelines import release

        async with self.admin_lock:
            canary = self.models["canary"]
            if not canary:
                raise APIError(409, "there is no canary to roll back", code="no_canary")
            self.weight = 0.0  # first: from this instant no request goes to the canary
            self.models["canary"] = None
            summary = self.stats["canary"].summary()
            self.stats["canary"].reset()
            event = await asyncio.to_thread(release.rollback, self._registry(), self.task, reasons=reasons,
                                            automatic=automatic, live=True, canary_stats=summary)
            return {**event, "retired_app": self._unused_app(canary)}

    async def _promote(self, reasons: list[str], automatic: bool) -> dict:
        from pipelines import release

        async with self.admin_lock:
            canary, old = self.models["canary"], self.models["production"]
            if not canary:
                raise APIError(409, "there is no canary to promote", code="no_canary")
            self.models["production"], self.models["canary"], self.weight = canary, None, 0.0
            self.stats["production"], self.stats["canary"] = self.stats["canary"], self.stats["production"]
            self.stats["canary"].reset()
            event = await asyncio.to_thread(release.promote, self._registry(), self.task, reasons=reasons,
                                            automatic=automatic, live=True)
            return {**event, "retired_app": self._unused_app(old)}

    # -- plumbing -------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        from serving.auth import admin_ok

        if not admin_ok(request.headers.get("authorization")):
            raise APIError(401, "admin routes need 'Authorization: Bearer <CRUCIBLE_ADMIN_TOKEN>'",
                           code="unauthorized", headers={"WWW-Authenticate": "Bearer"})

    async def _admin_body(self, request: Request) -> dict:
        raw = await request.body()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise bad_request(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        return body

    async def _admin(self, request: Request, action) -> JSONResponse:
        """Authorize, run ``action(body)``, answer its dict or the error (one place for both)."""
        try:
            self._authorize(request)
            payload = await action(await self._admin_body(request))
        except APIError as e:
            return e.response(self.models["production"])
        except ValueError as e:  # pipelines.release refuses bad input with ValueError
            return bad_request(str(e)).response(self.models["production"])
        return JSONResponse(payload, headers={"x-crucible-model": self.models["production"] or ""})

    # -- routes -----------------------------------------------------------------------------------------
    @routes.get("/status")
    async def admin_status(self, request: Request):
        async def action(_):
            return await asyncio.to_thread(self.status)
        return await self._admin(request, action)

    def status(self) -> dict:
        decision = self._decision()
        return {"task": self.task, "models": self.models, "canary_weight": self.weight,
                "apps": {m: self._app(m) for m in self.models.values() if m},
                "live": {r: s.summary() for r, s in self.stats.items()}, "shadow_mirror": self.mirror.stats(),
                "in_flight": self.in_flight, "rejected_overload": self.rejected,
                "decision": decision.to_dict() if decision else None,
                "request_log": {"buffered": len(self.log.rows), "manifests": self.log.written}}

    @routes.post("/weights")
    async def admin_weights(self, request: Request):
        from pipelines import release

        async def action(body):
            w = body.get("canary_weight")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w <= 1:
                raise bad_request("'canary_weight' must be a number from 0 to 1", "canary_weight")
            if w > 0 and not self.models["canary"]:
                raise bad_request("there is no canary: deploy one first", "canary_weight")
            async with self.admin_lock:
                previous, self.weight = self.weight, float(w)
                event = await asyncio.to_thread(release.set_weight, self._registry(), self.task, self.weight,
                                                previous=previous, live=True)
            return event
        return await self._admin(request, action)

    @routes.post("/rollback")
    async def admin_rollback(self, request: Request):
        async def action(_):
            return await self._rollback(["requested by an operator"], automatic=False)
        return await self._admin(request, action)

    @routes.post("/promote")
    async def admin_promote(self, request: Request):
        async def action(body):
            self.gate_cache.pop(self.models["canary"] or "", None)  # an operator's call reads the newest eval
            decision = await asyncio.to_thread(self._decision)
            if decision is None:
                raise APIError(409, "there is no canary to promote", code="no_canary")
            if decision.action != "promote" and not body.get("force"):
                raise APIError(409, "the policy does not allow promotion yet: " + "; ".join(decision.reasons)
                               + " (send {\"force\": true} to override)", code="policy")
            reasons = decision.reasons if decision.action == "promote" else ["forced by an operator"] + decision.reasons
            return await self._promote(reasons, automatic=False)
        return await self._admin(request, action)

    @routes.post("/deploy")
    async def admin_deploy(self, request: Request):
        """``{"model": REF, "as": "canary"|"shadow", "weight": w}``: start its app if needed, then route."""
        from pipelines import release
        from serving.app import deploy_model, running_apps

        async def action(body):
            role = body.get("as", "canary")
            if role not in ("canary", "shadow"):
                raise bad_request("'as' must be 'canary' or 'shadow' (use promote to change production)", "as")
            weight = body.get("weight", self.cfg.canary_weight if role == "canary" else None)
            if role == "canary" and (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                                     or not 0 <= weight <= 1):
                raise bad_request("'weight' must be a number from 0 to 1", "weight")
            try:
                ref = await asyncio.to_thread(lambda: self._registry().get(str(body.get("model"))).id)
            except Exception as e:  # noqa: BLE001 - RefError and the like: the caller's input
                raise bad_request(str(e), "model") from None
            shared = await self._share(ref)
            name = self._app(shared) if shared else app_name(self.task, ref)
            if not shared and name not in await asyncio.to_thread(running_apps):
                # a new model's app starts beside the running ones; traffic moves only once it is up
                await asyncio.to_thread(deploy_model, self.spec, ref, self.registry_uri)
            async with self.admin_lock:
                if shared:
                    self.hosts[ref] = self.hosts.get(shared, shared)
                else:
                    self.hosts.pop(ref, None)
                self.stats[role].reset()
                self.models[role] = ref
                if role == "canary":
                    self.weight = float(weight)
                event = await asyncio.to_thread(release.deploy, self._registry(), self.task, ref, role,
                                                self.weight if role == "canary" else None, live=True,
                                                current_weight=self.weight)
            return {**event, "app": name, **({"served_beside": shared} if shared else {})}
        return await self._admin(request, action)

    async def _share(self, ref: str) -> str | None:
        """Production's ref when its replica now serves ``ref`` too (an adapter of the same base,
        loaded into its running vLLM server), else None: ``ref`` gets an app of its own."""
        prod = self.models["production"]
        if not (self.cfg.share_base and prod and ref != prod):
            return None
        try:
            answer = await self._handle(prod).host.remote(ref)
        except Exception as e:  # noqa: BLE001 - production's replica failed to answer: the canary gets its own app
            answer = {"hosted": False, "reason": f"{type(e).__name__}: {e}"}
        if not answer["hosted"]:
            log.info("%s gets its own replica, not %s's: %s", ref, prod, answer["reason"])
        return prod if answer["hosted"] else None

    @routes.post("/flush")
    async def admin_flush(self, request: Request):
        async def action(_):
            await asyncio.gather(*list(self.mirror.tasks), return_exceptions=True)
            return {"manifest": await asyncio.to_thread(self.log.flush)}
        return await self._admin(request, action)
