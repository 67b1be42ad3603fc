"""A Serve model replica on vLLM: continuous batching from vLLM's own OpenAI server.

Each replica owns one managed vLLM server (``pipelines.engines.vllm_server``) holding the base
weights once, with the replica's model and any further LoRA adapters of the same base loaded into
it (multi-LoRA): ``generate(..., model=REF)`` picks one of them per request, so a canary or shadow
that is an adapter of production's base is served by production's replica: ``shared_hosts`` decides
that when the app starts, ``host`` loads one more adapter into the running server when the router
deploys it (vLLM's runtime LoRA loading, on the server's 127.0.0.1 port only). Requests are forwarded one by
one as they come (no ``@serve.batch``): the server batches whatever is in flight at every step.

It implements ``serving.replica``'s seam (``generate``, ``stream``, ``info``, ``host``, ``http_route``, and
the seam over HTTP), so the router treats it like the HF ``ModelReplica``; ``generate`` and ``stream``
take an optional ``model``, one of the models it hosts.
"""

from __future__ import annotations

import json
import time

from ray import serve

from pipelines.templates import with_system_prompt
from serving.replica import answer_http, inject_faults, prompt_limit


def guide_body(guide: str | None) -> dict:
    """``GenParams.guide`` as vLLM request fields (the same mapping the http engine uses)."""
    if not guide:
        return {}
    g = json.loads(guide)
    if "json_schema" in g:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "contract", "schema": g["json_schema"]}}}
    return {"structured_outputs": {"choice": g["choice"]}}


# no Serve access log: each request is already in the request log and the metrics, and a log line per
# request costs CPU in the replica and in Ray's log forwarding (measured by bench.serve_vllm)
@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=30, logging_config={"enable_access_log": False})
class VLLMReplica:
    def __init__(self, ref: str, registry_uri: str, adapters: list[str] | None = None, faults: dict | None = None,
                 threads: int | None = None, max_model_len: int = 2048, http: dict | None = None):
        import asyncio

        from infra.registry import Registry
        from pipelines.engines.loading import resolve_model
        from pipelines.engines.vllm_server import VLLMServer, _lora_rank_bucket, merged_if_adapter
        from pipelines.modeling import load_tokenizer

        self.registry = Registry.open(registry_uri)
        self.ref = self.registry.get(ref).id
        # an adapter alone is served merged (LoRA decodes ~4x slower on vLLM's CPU build)
        main = merged_if_adapter(resolve_model(self.ref, self.registry), self.registry, merge=not adapters)
        self.base = main.weights_path
        self.tokenizer = load_tokenizer(main.tokenizer_path)
        self.prompts = {self.ref: main.system_prompt}  # model name -> its saved system prompt
        loras = {self.ref: str(main.path)} if main.adapter else {}
        ranks = [main.lora_rank] if main.adapter else []
        for a in adapters or []:  # further adapters must share the base: one copy of its weights
            name, r, why = self._adapter(a)
            if why:
                raise ValueError(f"adapter {a}: {why}; give it a replica of its own")
            loras[name], self.prompts[name] = str(r.path), r.system_prompt
            ranks.append(r.lora_rank)
        self.server = VLLMServer(self.base, served_name=self.ref if not main.adapter else "base",
                                 tokenizer=main.tokenizer_path, loras=loras, max_model_len=max_model_len,
                                 max_lora_rank=_lora_rank_bucket(max(ranks, default=16)), threads=threads)
        self.load_lock = asyncio.Lock()
        self.faults = faults or {}
        self.http = http
        self.session = None  # aiohttp, made on the replica's loop at the first request (see _post)

    async def __call__(self, request):
        return await answer_http(self, request)

    def http_route(self) -> dict | None:
        return self.http

    def _adapter(self, ref: str):
        """(its id, its resolved model, None) for a LoRA adapter this server can serve beside its base,
        else (id, resolved model, why not)."""
        from pipelines.engines.loading import resolve_model

        name = self.registry.get(ref).id
        r = resolve_model(name, self.registry)
        return name, r, why_not_shared(self.base, self.tokenizer.chat_template, r)

    async def host(self, ref: str) -> dict:
        """Serve one more adapter of this replica's base from its running server (multi-LoRA: no second
        copy of the base, no new server): ``{"model", "hosted": True}`` or ``{"hosted": False, "reason"}``.
        The router calls it on one replica when a canary or shadow is deployed; any other replica of the
        app loads the adapter on its first request for it (``_served``)."""
        import asyncio

        async with self.load_lock:
            name, r, why = await asyncio.to_thread(self._adapter, ref)
            if name in self.prompts:
                return {"model": name, "hosted": True}
            why = why or await asyncio.to_thread(self.server.load_lora, name, str(r.path), r.lora_rank)
            if why:
                return {"model": name, "hosted": False, "reason": why}
            self.prompts[name] = r.system_prompt
            return {"model": name, "hosted": True}

    def _post(self, body: dict):
        """POST to the vLLM server's chat route. aiohttp, not httpx: ~0.3 ms of CPU less per request here,
        which a 2-core node would otherwise take from the engine."""
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(self.server.url, timeout=aiohttp.ClientTimeout(total=None),
                                                 connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30))
        return self.session.post("/v1/chat/completions", json=body)

    async def _served(self, model: str | None) -> str:
        name = model or self.ref
        if name not in self.prompts:
            hosted = await self.host(name)
            if not hosted["hosted"]:
                raise ValueError(f"model {name!r} cannot be served by this replica: {hosted['reason']}")
        return name

    def _over_limit(self, messages: list[dict], limit: int | None) -> dict | None:
        """The 400 answer for a prompt over ``limit`` tokens, else None. vLLM counts the prompt itself,
        so tokenize only where it could be over: a token covers at least one byte of the rendered
        prompt (byte-level BPE, byte fallback; +1 for a SentencePiece prefix), so a prompt of fewer
        bytes than the limit is within it without tokenizing."""
        if not limit:
            return None
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if len(text.encode()) + 1 <= limit:
            return None
        return prompt_limit(self.tokenizer, messages, limit)[0]

    def _body(self, messages: list[dict], params: dict, name: str) -> dict:
        """The seam's parsed ``params`` (``serving.protocol.params_for``) as a vLLM OpenAI request."""
        body = {"model": name, "messages": messages, "max_tokens": params["max_tokens"],
                "temperature": params["temperature"], "top_p": params["top_p"], "seed": params["seed"],
                "n": params.get("n", 1), **guide_body(params.get("guide"))}
        if params.get("stop"):
            body["stop"] = params["stop"]
        if params.get("logprobs") is not None:
            body.update(logprobs=True, top_logprobs=params["logprobs"])
        return body

    async def generate(self, messages: list[dict], params: dict, model: str | None = None) -> dict:
        """The router's call (``serving.replica``'s seam): ``{"model", "prompt_tokens", "choices"}``."""
        arrived = time.perf_counter()
        await inject_faults(self.faults, self.ref)
        name = await self._served(model)
        messages = with_system_prompt(messages, self.prompts[name])
        problem = self._over_limit(messages, params.get("max_prompt_tokens"))
        if problem:
            return problem
        t0 = time.perf_counter()
        async with self._post(self._body(messages, params, name)) as r:
            raw = await r.read()
        engine_s = time.perf_counter() - t0  # the engine's share of the latency (the router reports the rest)
        if r.status != 200:
            return {"error": _message(raw), "status": r.status}
        data = json.loads(raw)
        usage = data.get("usage") or {}
        choices = []
        for c in sorted(data["choices"], key=lambda c: c["index"]):
            choice = {"text": c["message"].get("content") or "", "finish_reason": _finish(c.get("finish_reason")),
                      # vLLM reports usage for all n choices together; each choice's own count is not returned
                      "completion_tokens": usage.get("completion_tokens", 0) // max(len(data["choices"]), 1)}
            if params.get("logprobs") is not None:
                choice["logprobs"] = (c.get("logprobs") or {}).get("content") or []
            choices.append(choice)
        return {"model": name, "prompt_tokens": usage.get("prompt_tokens", 0), "choices": choices,
                "engine_s": engine_s, "replica_s": time.perf_counter() - arrived}

    async def stream(self, messages: list[dict], params: dict, model: str | None = None):
        """The seam's stream: ``{"model", "prompt_tokens"}``, ``{"delta"}`` items, then the finish."""
        await inject_faults(self.faults, self.ref)
        name = await self._served(model)
        messages = with_system_prompt(messages, self.prompts[name])
        problem = self._over_limit(messages, params.get("max_prompt_tokens"))
        if problem:
            yield problem
            return
        body = {**self._body(messages, params, name), "stream": True,
                "stream_options": {"include_usage": True}}
        started, finish, usage = False, "stop", {}
        # leaving this block before the end (the router cancelled) closes the connection: vLLM aborts the request
        async with self._post(body) as r:
            if r.status != 200:
                yield {"error": _message(await r.read()), "status": r.status}
                return
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices") or []:
                    if not started:
                        started = True
                        yield {"model": name, "prompt_tokens": (chunk.get("usage") or {}).get("prompt_tokens", 0)}
                    if text := (c.get("delta") or {}).get("content"):
                        yield {"delta": text}
                    if c.get("finish_reason"):
                        finish = _finish(c["finish_reason"])
        if not started:
            yield {"model": name, "prompt_tokens": usage.get("prompt_tokens", 0)}
        yield {"finish_reason": finish, "completion_tokens": usage.get("completion_tokens", 0),
               "prompt_tokens": usage.get("prompt_tokens", 0)}

    def info(self) -> dict:
        return {"model": self.ref, "engine": "vllm", "models": sorted(self.prompts), "url": self.server.url,
                "server_pid": self.server.proc.pid}

    def __del__(self):
        try:
            self.server.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def why_not_shared(base: str, chat_template: str | None, r) -> str | None:
    """None when the resolved model ``r`` can be served beside ``base`` by a server rendering
    ``chat_template`` (a LoRA adapter of that base, with the same template), else why not."""
    from pipelines.modeling import load_tokenizer

    if not r.adapter or r.base_path != base:
        return f"not a LoRA adapter of the replica's base {base}"
    if load_tokenizer(r.tokenizer_path).chat_template != chat_template:
        return "its chat template differs from the base's (one server renders one template)"
    return None


def shared_hosts(spec, models: dict, registry_uri: str) -> dict[str, str]:
    """``{canary or shadow ref: production ref}`` for the adapters of production's base that production's
    vLLM replica serves beside it (``deploy.share_base``); empty where production is not on vLLM."""
    from infra.registry import Registry
    from pipelines.engines import pick_engine
    from pipelines.engines.loading import resolve_model
    from pipelines.modeling import load_tokenizer

    prod = models.get("production")
    reg = Registry.open(registry_uri)
    if not prod or not spec.deploy.share_base or pick_engine(spec.deploy.engine, prod, reg) != "vllm":
        return {}
    p = resolve_model(prod, reg)
    base = p.weights_path
    template = load_tokenizer(p.tokenizer_path).chat_template
    out = {}
    for role in ("canary", "shadow"):
        ref = models.get(role)
        if ref and ref != prod and why_not_shared(base, template, resolve_model(ref, reg)) is None:
            out[ref] = prod
    return out


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _message(raw: bytes) -> str:
    """The message of a vLLM error answer."""
    try:
        body = json.loads(raw)
        err = body.get("error", body) if isinstance(body, dict) else body
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        return raw[:300].decode(errors="replace")


def vllm_target(spec, ref: str, registry_uri: str, faults: dict | None = None, adapters: tuple[str, ...] = (),
                http: dict | None = None):
    """The Serve deployment for ``ref`` (and ``adapters`` of its base, served beside it) on a vLLM replica,
    or None where vLLM cannot run it here (HF then)."""
    from infra.registry import Registry
    from pipelines.engines import pick_engine

    d = spec.deploy
    if pick_engine(d.engine, ref, Registry.open(registry_uri)) != "vllm":
        return None
    from serving.app import actor_options

    return VLLMReplica.options(num_replicas=d.replicas, ray_actor_options=actor_options(d.num_cpus),
                               max_queued_requests=4 * d.max_concurrency).bind(
        ref, registry_uri, list(adapters), faults, d.threads_per_replica, http=http)
