"""Model replicas: one model per Serve application, behind the one small interface the router uses.

The seam (every replica kind has these, called over a Serve handle):

- ``async generate(messages, params) -> dict``: ``{"model", "prompt_tokens", "choices": [{"text",
  "finish_reason", "completion_tokens", "logprobs"?}], "replica_s", "engine_s"?}`` (``params["n"]``
  choices; ``replica_s``: seconds from the call's arrival to its answer, ``engine_s``: of those, the
  engine's, where the replica can tell), or ``{"error", "status", "param"?}`` for a request this model
  cannot take (a prompt over the limit).
- ``async stream(messages, params)`` (an async generator, called with ``handle.options(stream=True)``):
  first ``{"model", "prompt_tokens"}`` or an error dict as above, then ``{"delta": str}`` items, last
  ``{"finish_reason", "completion_tokens"}``.
- ``info() -> dict``.
- ``http_route() -> dict | None``: where the router may call this replica over HTTP instead (below).
- ``async host(ref) -> dict``: serve one more model beside this one (``{"model", "hosted": True}``), or
  ``{"hosted": False, "reason"}``; ``generate``/``stream`` then take that model as a third argument.
  Only the vLLM replica can (LoRA adapters of its base); the HF replica serves one model.

Over HTTP: where Serve's HTTP ingress is HAProxy (Ray's direct ingress, local mode's default), each
model app also gets a private route, ``/_replica/APP``, guarded by a token of its own; the router
POSTs ``{"messages", "params", "model"?, "stream"?}`` there with ``authorization: Bearer TOKEN`` and
gets the same dicts back (a stream as one JSON object per line). Measured here, an HTTP request to a
deployment that calls a second one: 2.8 ms p50 over a Serve handle (gRPC), 1.9 ms over HTTP through
HAProxy with aiohttp: a handle call costs ~1 ms of CPU on each side, the HTTP request ~0.3.

``params`` is ``serving.protocol.params_for``'s dict: max_tokens, temperature, top_p, stop, seed, n,
logprobs (None or the number of alternatives), max_prompt_tokens, guide. ``REPLICAS`` maps
``deploy.engine`` to the deployment class; a new replica kind registers there.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import random
import secrets
import threading
import time

from ray import serve

from pipelines.templates import with_system_prompt

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


REPLICA_ROUTE = "/_replica/"
REPLICA_HEADER = "x-crucible-replica"  # on every answer of the route: the replica's, not the ingress's


def replica_http(name: str) -> dict | None:
    """The private HTTP route and token for model app ``name`` where Serve's HTTP ingress is HAProxy
    (``infra.ray_env.serve_fast_path_env``); None elsewhere: through Serve's Python proxy an HTTP hop
    costs more than a handle call, so the router keeps the handle."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return None
    return {"route": REPLICA_ROUTE + name, "token": secrets.token_urlsafe(24)}


async def answer_http(replica, request):
    """The seam over HTTP (a replica's ``__call__``): the router's POST, checked against the app's token."""
    from starlette.responses import JSONResponse, StreamingResponse

    mark = {REPLICA_HEADER: "1"}
    token = (replica.http or {}).get("token")
    if not token or not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {token}"):
        return JSONResponse({"failure": "not authorized"}, status_code=401, headers=mark)
    body = await request.json()
    args = (body["messages"], body["params"]) + ((body["model"],) if body.get("model") else ())
    if body.get("stream"):
        async def lines():
            stream = replica.stream(*args)
            try:
                async for item in stream:
                    yield json.dumps(item) + "\n"
            except Exception as e:  # noqa: BLE001 - the router turns it into the 502 a handle call gives
                yield json.dumps({"failure": f"{type(e).__name__}: {e}"}) + "\n"
            finally:  # the router went away: stop the engine now, not when the generator is collected
                await stream.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=mark)
    try:
        return JSONResponse(await replica.generate(*args), headers=mark)
    except Exception as e:  # noqa: BLE001
        return JSONResponse({"failure": f"{type(e).__name__}: {e}"}, status_code=500, headers=mark)


def gen_params(p: dict):
    from pipelines.engines import GenParams

    return GenParams(max_new_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                     stop=tuple(p["stop"]), seed=p["seed"], guide=p.get("guide"), logprobs=p.get("logprobs"))


async def inject_faults(faults: dict, ref: str) -> None:
    """Test-only fault injection (``delay_s``, ``error_rate``): a real replica stalls or fails."""
    if faults.get("delay_s"):
        await asyncio.sleep(faults["delay_s"])
    if random.random() < faults.get("error_rate", 0.0):
        raise RuntimeError(f"injected fault in {ref} (test-only fault injection)")


def prompt_limit(tokenizer, messages: list[dict], limit: int | None) -> tuple[dict | None, int]:
    """(the 400 answer when the rendered prompt is over ``limit`` tokens, else None; its token count)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if limit and n > limit:
        return {"error": f"the prompt has {n} tokens; this deployment takes at most {limit}", "status": 400,
                "param": "messages"}, n
    return None, n


@serve.deployment(max_ongoing_requests=16, graceful_shutdown_timeout_s=30)
class ModelReplica:
    """One model behind the engine interface (HF, the fallback everywhere); concurrent requests are
    batched into one generate; ``stream`` runs the engine's incremental generation.

    ``faults`` is fault injection for tests only (``error_rate``, ``delay_s``): it makes a real
    replica fail or stall so the router's isolation and rollback can be tested over real HTTP.
    """

    def __init__(self, ref: str, registry_uri: str, engine: str = "auto", faults: dict | None = None,
                 threads: int | None = None, http: dict | None = None):
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
        self.http = http
        self.lock = threading.Lock()

    async def __call__(self, request):
        return await answer_http(self, request)

    def http_route(self) -> dict | None:
        return self.http

    async def _admit(self, messages: list[dict], params: dict) -> tuple[dict | None, int]:
        """(an error answer or None, the prompt's token count) after the test faults and the limit."""
        await inject_faults(self.faults, self.ref)
        if self.tokenizer is None:
            return None, 0
        return prompt_limit(self.tokenizer, with_system_prompt(messages, self.system_prompt),
                            params.get("max_prompt_tokens"))

    async def generate(self, messages: list[dict], params: dict) -> dict:
        arrived = time.perf_counter()
        problem, _ = await self._admit(messages, params)
        if problem:
            return problem
        return {**await self._batched((messages, params)), "replica_s": time.perf_counter() - arrived}

    async def stream(self, messages: list[dict], params: dict):
        problem, n_prompt = await self._admit(messages, params)
        if problem:
            yield problem
            return
        if not hasattr(self.engine, "stream"):
            yield {"error": f"engine {self.engine.name!r} cannot stream", "status": 400, "param": "stream"}
            return
        yield {"model": self.ref, "prompt_tokens": n_prompt}
        # Not under self.lock: a stream is its own generate call, and holding the lock for the whole
        # stream would stall every batched request behind it.
        it = self.engine.stream(with_system_prompt(messages, self.system_prompt), gen_params(params))
        try:
            while (item := await asyncio.to_thread(next, it, None)) is not None:
                if isinstance(item, str):
                    yield {"delta": item}
                else:
                    yield {"finish_reason": item.finish_reason, "completion_tokens": item.completion_tokens,
                           "prompt_tokens": item.prompt_tokens}
        finally:  # the router cancelled (its client went away): the engine stops at its next step
            try:
                it.close()
            except ValueError:  # a step is running in its thread; dropping the generator closes it after
                pass

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[tuple[list[dict], dict]]) -> list[dict]:
        # one generate per distinct parameter set: requests differ mostly in messages
        return await asyncio.to_thread(self._generate_groups, items)

    def _generate_groups(self, items):
        out: list[dict | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (_, p) in enumerate(items):
            groups.setdefault(json.dumps(p, sort_keys=True), []).append(i)
        with self.lock:
            for key, idx in groups.items():
                p = json.loads(key)
                n = p.get("n", 1)
                # a request without a system message gets the model's saved one, as in eval and predict;
                # n choices are n rows of one batch (identical under greedy decoding, as with any engine)
                chats = [with_system_prompt(items[i][0], self.system_prompt) for i in idx for _ in range(n)]
                done = self.engine.generate(chats, gen_params(p))
                for k, i in enumerate(idx):
                    mine = done[k * n:(k + 1) * n]
                    out[i] = {"model": self.ref, "prompt_tokens": mine[0].prompt_tokens,
                              "choices": [_choice(c) for c in mine]}
        return out

    def info(self) -> dict:
        return {"model": self.ref, "engine": self.engine.name}

    async def host(self, ref: str) -> dict:
        return {"model": ref, "hosted": False, "reason": "an HF replica serves one model"}


def _choice(c) -> dict:
    choice = {"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}
    if "logprobs" in c.extra:
        choice["logprobs"] = c.extra["logprobs"]
    return choice


# deploy.engine -> the replica deployment serving it. Engines without their own replica kind run
# inside ModelReplica through pipelines.engines (which is also how the HF fallback works).
REPLICAS = {"hf": ModelReplica}


def replica_for(engine: str):
    return REPLICAS.get(engine, ModelReplica)
