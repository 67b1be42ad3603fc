"""A Serve model replica on vLLM: continuous batching from vLLM's own OpenAI server.

Each replica owns one managed vLLM server (``pipelines.engines.vllm_server``) holding the base
weights once, with the replica's model and any further LoRA adapters of the same base loaded into
it (multi-LoRA): ``generate(..., model=REF)`` picks one of them per request, so a canary that is an
adapter of production's base can be served by production's replica. Requests are forwarded one by
one as they come (no ``@serve.batch``): the server batches whatever is in flight at every step.

Two call shapes:
- ``generate(messages, params)`` → ``{"text", "prompt_tokens", "completion_tokens",
  "finish_reason", "model"}`` or ``{"error", "status"}``: what the router calls today (the same as
  the HF ``ModelReplica``).
- ``chat(body)`` → an OpenAI chat completion dict, and ``chat_stream(body)`` → an async iterator
  of SSE ``data: …`` chunks ending with ``data: [DONE]`` (call it through
  ``handle.options(stream=True)``): the OpenAI request forwarded as it is, with the model's saved
  system prompt and guide applied where the request has none.
"""

from __future__ import annotations

import asyncio
import json
import random

from ray import serve

from pipelines.templates import with_system_prompt


def guide_body(guide: str | None) -> dict:
    """``GenParams.guide`` as vLLM request fields (the same mapping the http engine uses)."""
    if not guide:
        return {}
    g = json.loads(guide)
    if "json_schema" in g:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "contract", "schema": g["json_schema"]}}}
    return {"structured_outputs": {"choice": g["choice"]}}


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=30)
class VLLMReplica:
    def __init__(self, ref: str, registry_uri: str, adapters: list[str] | None = None, faults: dict | None = None,
                 threads: int | None = None, max_model_len: int = 2048):
        import httpx

        from infra.registry import Registry
        from pipelines.engines.loading import resolve_model
        from pipelines.engines.vllm_server import VLLMServer
        from pipelines.modeling import load_tokenizer

        reg = Registry.open(registry_uri)
        self.ref = reg.get(ref).id
        main = resolve_model(self.ref, reg)
        base = main.base_path if main.adapter else str(main.path)
        loras = {self.ref: str(main.path)} if main.adapter else {}
        for a in adapters or []:  # further adapters must share the base: one copy of its weights
            r = resolve_model(a, reg)
            if not r.adapter or r.base_path != base:
                raise ValueError(f"adapter {a}: not a LoRA adapter of {base}; give it a replica of its own")
            loras[reg.get(a).id] = str(r.path)
        ranks = [json.loads((resolve_model(m, reg).path / "adapter_config.json").read_text()).get("r", 16)
                 for m in loras]
        from pipelines.engines.vllm_server import _lora_rank_bucket

        self.server = VLLMServer(base, served_name=self.ref if not main.adapter else "base",
                                 tokenizer=main.tokenizer_path, loras=loras, max_model_len=max_model_len,
                                 max_lora_rank=_lora_rank_bucket(max(ranks, default=16)), threads=threads)
        self.names = {self.ref, *loras}  # model names a request may pick (one copy of the base serves all)
        self.tokenizer = load_tokenizer(main.tokenizer_path)
        self.system_prompt = main.system_prompt
        self.default_guide = main.guide
        self.faults = faults or {}
        self.client = httpx.AsyncClient(base_url=self.server.url, timeout=None,
                                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    def _served(self, model: str | None) -> str:
        name = model or self.ref
        if name not in self.names:
            raise ValueError(f"model {name!r} is not loaded in this replica (it has {sorted(self.names)})")
        return name

    async def _faults(self) -> None:
        if self.faults.get("delay_s"):
            await asyncio.sleep(self.faults["delay_s"])
        if random.random() < self.faults.get("error_rate", 0.0):
            raise RuntimeError(f"injected fault in {self.ref} (test-only fault injection)")

    def _too_long(self, messages: list[dict], limit: int | None) -> dict | None:
        if not limit:
            return None
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > limit:
            return {"error": f"the prompt has {n} tokens; this deployment takes at most {limit}", "status": 400}
        return None

    async def generate(self, messages: list[dict], params: dict, model: str | None = None) -> dict:
        """The router's call: parsed messages and params (as ``serving.app.Router._parse`` makes them)."""
        await self._faults()
        messages = with_system_prompt(messages, self.system_prompt)
        problem = self._too_long(messages, params.get("max_prompt_tokens"))
        if problem:
            return problem
        body = {"model": self._served(model), "messages": messages, "max_tokens": params["max_tokens"],
                "temperature": params["temperature"], "top_p": params["top_p"], "seed": params["seed"],
                **guide_body(params.get("guide"))}
        if params.get("stop"):
            body["stop"] = params["stop"]
        r = await self.client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            return {"error": _message(r), "status": r.status_code}
        data = r.json()
        choice, usage = data["choices"][0], data.get("usage") or {}
        return {"text": choice["message"].get("content") or "", "prompt_tokens": usage.get("prompt_tokens", 0),
                "completion_tokens": usage.get("completion_tokens", 0),
                "finish_reason": "length" if choice.get("finish_reason") == "length" else "stop", "model": self.ref}

    def _openai_body(self, body: dict) -> dict:
        body = dict(body)
        body["model"] = self._served(body.get("model") if body.get("model") in self.names else None)
        body["messages"] = with_system_prompt(body["messages"], self.system_prompt)
        if self.default_guide and not any(k in body for k in ("response_format", "structured_outputs")):
            body.update(guide_body(self.default_guide))
        return body

    async def chat(self, body: dict) -> dict:
        """An OpenAI chat request dict → the response dict (or ``{"error": {...}, "status"}``)."""
        await self._faults()
        r = await self.client.post("/v1/chat/completions", json={**self._openai_body(body), "stream": False})
        data = r.json()
        if r.status_code != 200:
            return {"error": data.get("error", data), "status": r.status_code}
        data["model"] = body.get("model") or self.ref
        return data

    async def chat_stream(self, body: dict):
        """An OpenAI chat request dict with ``stream`` → SSE chunks (``data: {...}\\n\\n`` … ``data: [DONE]``)."""
        await self._faults()
        req = {**self._openai_body(body), "stream": True}
        async with self.client.stream("POST", "/v1/chat/completions", json=req) as r:
            if r.status_code != 200:
                await r.aread()
                yield f"data: {json.dumps({'error': _message(r), 'status': r.status_code})}\n\n"
                return
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    yield line + "\n\n"

    def info(self) -> dict:
        return {"model": self.ref, "engine": "vllm", "models": sorted(self.names), "url": self.server.url}

    def __del__(self):
        try:
            self.server.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _message(r) -> str:
    try:
        err = r.json().get("error", r.json())
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        return r.text[:300]


def vllm_target(spec, ref: str, registry_uri: str, faults: dict | None = None):
    """The Serve app for ``ref`` on a vLLM replica, or None where vLLM cannot run it here (HF then)."""
    from ray.serve.api import RunTarget

    from infra.registry import Registry
    from pipelines.engines import pick_engine

    d = spec.deploy
    if pick_engine(d.engine, ref, Registry.open(registry_uri)) != "vllm":
        return None
    from serving.app import actor_options, app_name

    app = VLLMReplica.options(num_replicas=d.replicas, ray_actor_options=actor_options(d.num_cpus),
                              max_queued_requests=4 * d.max_concurrency).bind(
        ref, registry_uri, None, faults, d.threads_per_replica)
    return RunTarget(app, name=app_name(spec.task, ref), route_prefix=None)
