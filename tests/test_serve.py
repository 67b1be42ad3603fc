"""The Serve app over real HTTP on 127.0.0.1: real local Ray, real tiny models from the registry.

One ``serve.run`` set-up per module: production, canary (weight 0.1), a shadow that sleeps and
fails half the time, and a canary that always fails (started but unrouted until a test deploys
it). The last two use the replica's test-only fault injection; everything else is the real path.
The task's contract is a tool call, so the same app answers plain chat and ``tools``. The OpenAI
surface is driven with the official ``openai`` client.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest

from bench.serve_vllm import server_timing

TOKEN = "test-admin-token-6"
TASK = "serve6"
SAVED_SYSTEM = "You sort support tickets into queues."


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory, gpt2_tokenizer):
    from ray import serve

    from infra.registry import Registry
    from pipelines.modeling import init_model
    from pipelines.spec import spec_from_dict
    from serving.app import deploy, deploy_model
    from tests.s3server import free_port

    mp = pytest.MonkeyPatch()
    mp.setenv("CRUCIBLE_ADMIN_TOKEN", TOKEN)
    root = tmp_path_factory.mktemp("serve")
    uri = f"file://{root / 'registry'}"
    reg = Registry.open(uri)
    refs = {}
    for name, seed in (("production", 1), ("canary", 2), ("shadow", 3), ("broken", 4)):
        init_model(root / name, tokenizer=gpt2_tokenizer, layers=1, hidden=32, heads=2, seed=seed)
        if name == "production":  # a saved default system prompt, as a trained model has
            (root / name / "crucible.json").write_text(json.dumps({"system_prompt": SAVED_SYSTEM}))
        refs[name] = reg.add_directory("model", TASK, root / name).id
    for role in ("production", "canary", "shadow"):
        reg.set_alias(TASK, role, refs[role])
    spec = spec_from_dict({"task": TASK, "model": {"base": str(root / "production")}, "registry": uri,
                           "contract": {"type": "tool_call", "tools": [ROUTE_TOOL["function"]]},
                           "deploy": {"num_cpus": 0.25, "canary_weight": 0.1, "max_concurrency": 16,
                                      "rollback_min_requests": 10, "min_requests": 10, "max_new_tokens": 64,
                                      "max_body_bytes": 4096, "max_prompt_tokens": 60, "log_flush_rows": 1000, "shadow_timeout_s": 10,
                                      "max_p95_ratio": 5.0}})  # CPU noise on 2 cores: judge errors, not jitter
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    plan = {"task": TASK, "models": {r: refs[r] for r in ("production", "canary", "shadow")}, "canary_weight": 0.1}
    faults = {refs["shadow"]: {"delay_s": 1.5, "error_rate": 0.5}, refs["broken"]: {"error_rate": 1.0}}
    t0 = time.perf_counter()
    deploy(spec, plan, uri, faults=faults, extra=(refs["broken"],))
    print(f"\nfour models and the router up in {time.perf_counter() - t0:.1f} s")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    yield {"url": f"http://127.0.0.1:{port}", "client": client, "refs": refs, "reg": reg, "spec": spec}
    client.close()
    serve.shutdown()
    mp.undo()


ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ROUTE_TOOL = {"type": "function", "function": {
    "name": "route_ticket", "description": "send a ticket to a queue",
    "parameters": {"type": "object", "properties": {"queue": {"enum": ["billing", "shipping", "returns"]}},
                   "required": ["queue"], "additionalProperties": False}}}


def chat(client, user="u", content="hello there", **kw):
    body = {"model": TASK, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "user": user, **kw}
    return client.post("/v1/chat/completions", json=body)


async def _many(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def one(b):
            async with sem:
                return await c.post("/v1/chat/completions", json=b)
        return await asyncio.gather(*(one(b) for b in bodies))


def many(app, bodies, concurrency=8):
    return asyncio.run(_many(app["url"], bodies, concurrency))


def test_health_models_and_header(app):
    c, refs = app["client"], app["refs"]
    h = c.get("/healthz")
    assert h.status_code == 200 and h.headers["x-crucible-model"] == refs["production"]
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert TASK in ids and refs["production"] in ids and refs["canary"] in ids
    assert refs["shadow"] not in ids  # the shadow never answers, so it is not offered


def test_chat_completion_shape_and_pinning(app):
    c, refs = app["client"], app["refs"]
    r = chat(c, user="alice")
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-crucible-model"] == body["model"] and body["model"] in (refs["production"], refs["canary"])
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= body["usage"]["completion_tokens"] <= 4
    # the layers' times, each holding the next (the HF replica does not split off its engine's time)
    timing = server_timing(r.headers["server-timing"])
    assert timing.keys() == {"router", "upstream", "replica"} and timing["router"] > timing["upstream"] > timing["replica"] > 0
    assert _via(r) == "http"  # the router reaches the replica over HTTP through HAProxy (serving.upstream)
    pinned = c.post("/v1/chat/completions", json={"model": refs["canary"], "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert pinned.status_code == 200 and pinned.headers["x-crucible-model"] == refs["canary"]


def _via(r) -> str | None:
    """How the router reached the replica, from its ``Server-Timing`` (``upstream;desc=...``)."""
    m = re.search(r'upstream;[^,]*desc="(\w+)"', r.headers.get("server-timing", ""))
    return m.group(1) if m else None


def test_model_replicas_answer_the_router_over_http_and_no_one_else(app):
    """A model app's private route through HAProxy answers only with the app's own token (the seam's
    dicts, a stream as JSON lines), and the router takes it. Where the route fails (a stale token after
    a redeploy, a route gone), the call goes over the app's handle instead, and the route is asked
    again: the real ``serving.upstream`` here, driven from the test against the running app."""
    from ray import serve

    from serving.replica import app_name
    from serving.upstream import Upstream

    c, refs = app["client"], app["refs"]
    name = app_name(TASK, refs["canary"])
    route = serve.get_app_handle(name).http_route.remote().result()
    assert route["route"] == f"/_replica/{name}" and len(route["token"]) >= 32
    messages = [{"role": "user", "content": "where is my parcel?"}]
    params = {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 0, "n": 2, "logprobs": None,
              "max_prompt_tokens": 60, "guide": None}
    body = {"messages": messages, "params": params}
    for headers in ({}, {"authorization": "Bearer not-the-token"}, {"authorization": route["token"]}):
        denied = c.post(route["route"], json=body, headers=headers)
        assert denied.status_code == 401 and "choices" not in denied.text
    own = {"authorization": f"Bearer {route['token']}"}
    answer = c.post(route["route"], json=body, headers=own)
    assert answer.status_code == 200 and answer.json()["model"] == refs["canary"], answer.text
    assert len(answer.json()["choices"]) == 2 and answer.json()["replica_s"] > 0
    lines = [json.loads(x) for x in c.post(route["route"], json={**body, "stream": True}, headers=own).text.splitlines()]
    assert lines[0]["model"] == refs["canary"] and "finish_reason" in lines[-1]
    text = answer.json()["choices"][0]["text"]
    assert "".join(x.get("delta", "") for x in lines) == text  # greedy: the same text
    r = c.post("/v1/chat/completions", json={"model": refs["canary"], "max_tokens": 2, "messages": messages})
    assert r.status_code == 200 and _via(r) == "http"

    async def ways():
        up = Upstream(serve.get_app_handle)
        up.base = app["url"]
        seen = []
        for bad in ({**route, "token": "from-before-a-redeploy"}, {**route, "route": "/_replica/gone"}, None):
            if bad:
                up.routes[name] = (time.monotonic(), bad)
            got = await up.generate(name, messages, params)
            seen.append((got["via"], got["choices"][0]["text"]))
        stream = await up.stream(name, messages, params)
        items = [item async for item in stream]
        await up.close()
        return seen, items

    seen, items = asyncio.run(ways())
    # the stale route falls back to the handle; the next call asks the app and is back on HTTP
    assert seen == [("handle", text), ("handle", text), ("http", text)], seen
    assert items == lines


def test_saved_system_prompt_and_prompt_token_limit(app):
    """A request without a system message is answered with the model's saved one (as eval and
    predict do), and the prompt limit counts real tokens of the rendered prompt."""
    from pipelines.modeling import load_tokenizer

    c, prod = app["client"], app["refs"]["production"]
    tok = load_tokenizer(app["reg"].materialize(prod))

    def n_tokens(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    user = [{"role": "user", "content": "where is my parcel"}]
    own = [{"role": "system", "content": "Be brief."}] + user
    for messages, expected in ((user, [{"role": "system", "content": SAVED_SYSTEM}] + user), (own, own)):
        r = c.post("/v1/chat/completions", json={"model": prod, "max_tokens": 2, "messages": messages})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == n_tokens(expected)
    long = [{"role": "user", "content": "parcel " * 40}]  # under the byte limit, over 60 tokens
    r = c.post("/v1/chat/completions", json={"model": prod, "max_tokens": 2, "messages": long})
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"], r.text


@pytest.mark.slow
def test_split_share_and_sticky_users(app):
    refs = app["refs"]
    bodies = [{"model": TASK, "user": f"user-{i}", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
              for i in range(1000)]
    t0 = time.perf_counter()
    rs = many(app, bodies)
    elapsed = time.perf_counter() - t0
    assert all(r.status_code == 200 for r in rs), {r.status_code for r in rs}
    served = [r.headers["x-crucible-model"] for r in rs]
    share = served.count(refs["canary"]) / len(served)
    print(f"\ncanary share over 1000 users at weight 0.1: {share:.3f} ({elapsed:.1f} s, "
          f"{len(rs) / elapsed:.0f} req/s)")
    assert abs(share - 0.1) <= 0.03
    assert set(served) == {refs["production"], refs["canary"]}
    # sticky: the same user gets the same model every time, and a session header works too
    again = many(app, bodies[:200])
    assert [r.headers["x-crucible-model"] for r in again] == served[:200]
    c = app["client"]
    for sid in ("s-1", "s-2", "s-3"):
        seen = {c.post("/v1/chat/completions", headers={"x-session-id": sid},
                       json={"messages": [{"role": "user", "content": "q"}], "max_tokens": 1}
                       ).headers["x-crucible-model"] for _ in range(4)}
        assert len(seen) == 1


def test_admin_requires_token_and_changes_nothing(app):
    c = app["client"]
    before = c.get("/admin/status", headers=ADMIN).json()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for path, body in (("/admin/weights", {"canary_weight": 0.9}), ("/admin/rollback", {}),
                           ("/admin/promote", {"force": True}),
                           ("/admin/deploy", {"model": app["refs"]["broken"], "as": "canary"})):
            r = c.post(path, json=body, headers=headers)
            assert r.status_code == 401, (path, r.status_code, r.text)
            assert "Bearer" in r.json()["error"]["message"]
        assert c.get("/admin/status", headers=headers).status_code == 401
    after = c.get("/admin/status", headers=ADMIN).json()
    assert after["models"] == before["models"] and after["canary_weight"] == before["canary_weight"] == 0.1


def test_bad_requests_get_4xx_with_a_message(app):
    c, prod = app["client"], app["refs"]["production"]
    cases = [
        (c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400,
         "not valid JSON"),
        (c.post("/v1/chat/completions", json={"model": TASK}), 400, "messages"),
        (c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400, "role"),
        (chat(c, model="no-such-model"), 404, "not served"),
        (chat(c, max_tokens=10_000), 400, "max_tokens"),
        (chat(c, content="x" * 5000), 413, "limit"),
        (chat(c, temperature="hot"), 400, "temperature"),
        (chat(c, response_format={"type": "json_schema"}), 400, "response_format"),
        (chat(c, structured_outputs={"regex": "a+"}), 400, "structured_outputs"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (status, r.text)
        assert words in r.json()["error"]["message"]
        assert r.headers["x-crucible-model"] == prod
    assert chat(c).status_code == 200  # still serving


def test_constrained_decoding_per_request(app):
    """OpenAI's response_format and vLLM's structured_outputs reach the engine: a random tiny model
    answers only what the schema or the choice allows."""
    c, prod = app["client"], app["refs"]["production"]
    schema = {"enum": ["yes", "no", "not sure"]}
    for i in range(3):
        r = chat(c, user=f"json-{i}", model=prod, content=f"pick {i}", max_tokens=32,
                 response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["choices"][0]["message"]["content"]) in schema["enum"]
        r = chat(c, user=f"choice-{i}", model=prod, content=f"pick {i}", max_tokens=8,
                 structured_outputs={"choice": ["red", "green"]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in ("red", "green"), r.text
    free = [chat(c, model=prod, content=f"pick {i}", max_tokens=8).json()["choices"][0]["message"]["content"]
            for i in range(3)]
    assert not any(f in ("red", "green") for f in free)  # the constraint, not the model, made the answers
    from pipelines.engines import GenParams, get_engine

    http = get_engine("http", model=prod, url=app["url"])  # the http engine sends the guide as response_format
    outs = http.generate([[{"role": "user", "content": "q"}]] * 2,
                         GenParams(max_new_tokens=32, guide=json.dumps({"json_schema": schema})))
    assert all(json.loads(o.text) in schema["enum"] for o in outs)


# -- the OpenAI surface, through the official client ---------------------------------------------------
@pytest.fixture(scope="module")
def oai(app):
    from openai import OpenAI

    client = OpenAI(base_url=app["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_openai_models_and_chat(app, oai):
    refs = app["refs"]
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {TASK, refs["production"], refs["canary"]}
    assert all(isinstance(m.created, int) and m.created > 1_700_000_000 for m in models.values())
    r = oai.chat.completions.create(model=refs["production"], messages=ask("hello"), max_tokens=5)
    assert r.object == "chat.completion" and r.model == refs["production"] and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.tool_calls is None
    assert c.finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_streaming_matches_the_whole_answer(app, oai):
    prod = app["refs"]["production"]
    whole = oai.chat.completions.create(model=prod, messages=ask("stream me"), max_tokens=12)
    chunks = list(oai.chat.completions.create(model=prod, messages=ask("stream me"), max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.model == prod for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content  # greedy: the same answer, in pieces
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 1
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # on the wire: SSE events, and [DONE] last; no usage chunk unless asked for
    with app["client"].stream("POST", "/v1/chat/completions", json={
            "model": prod, "messages": ask("stream me"), "max_tokens": 12, "stream": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-crucible-model"] == prod
        events = [line for line in raw.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_openai_json_schema_tools_n_logprobs_stop_seed(app, oai):
    prod = app["refs"]["production"]
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    r = oai.chat.completions.create(model=prod, messages=ask("ok?"), max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
    # tools: the answer is a tool call, with finish_reason tool_calls, arguments valid for the tool
    import jsonschema

    for stream in (False, True):
        kw = dict(model=prod, messages=ask("my parcel is late"), max_tokens=64, tools=[ROUTE_TOOL],
                  tool_choice="required")
        if stream:
            chunks = list(oai.chat.completions.create(**kw, stream=True))
            calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            name, args = calls[0].function.name, calls[0].function.arguments
        else:
            r = oai.chat.completions.create(**kw)
            msg, finish = r.choices[0].message, [r.choices[0].finish_reason]
            assert msg.content is None and len(msg.tool_calls) == 1 and msg.tool_calls[0].id.startswith("call_")
            name, args = msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments
        assert finish == ["tool_calls"] and name == "route_ticket"
        jsonschema.validate(json.loads(args), ROUTE_TOOL["function"]["parameters"])
    none = oai.chat.completions.create(model=prod, messages=ask("hi"), max_tokens=4, tools=[ROUTE_TOOL],
                                       tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    # n: three sampled choices, indexed; the same seed gives the same three again
    kw = dict(model=prod, messages=ask("pick"), max_tokens=8, n=3, temperature=1.0, seed=11)
    a, b = oai.chat.completions.create(**kw), oai.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and len(set(texts)) > 1
    assert a.usage.completion_tokens == b.usage.completion_tokens > 8  # counted over all choices
    other = oai.chat.completions.create(**{**kw, "seed": 12})
    assert [c.message.content for c in other.choices] != texts
    # logprobs: one entry per token, the chosen token heads its alternatives under greedy decoding
    r = oai.chat.completions.create(model=prod, messages=ask("why"), max_tokens=5, logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 and e.token == e.top_logprobs[0].token for e in entries)
    # stop: cut before a string the model is known to produce
    sampled = oai.chat.completions.create(model=prod, messages=ask("pick"), max_tokens=12, temperature=1.0,
                                          seed=3).choices[0].message.content
    stop = sampled.split()[2][:4]
    cut = oai.chat.completions.create(model=prod, messages=ask("pick"), max_tokens=12, temperature=1.0, seed=3,
                                      stop=[stop])
    assert cut.choices[0].message.content == sampled[:sampled.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_openai_errors_name_the_parameter(app, oai):
    import openai

    prod = app["refs"]["production"]
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-model", messages=ask("x"))
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert e.value.body["type"] == "invalid_request_error" and "not served" in e.value.body["message"]
    cases = [({"frequency_penalty": 0.5}, "frequency_penalty"), ({"logit_bias": {"50256": -100}}, "logit_bias"),
             ({"audio": {"voice": "alloy"}}, "audio"), ({"n": 2, "stream": True}, "n"),
             ({"logprobs": True, "stream": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
              "messages[0].content"),
             ({"messages": []}, "messages"), ({"temperature": 3}, "temperature"),
             ({"tools": [{"type": "function", "function": {"name": "refund", "parameters": {}}}]},
              "tools[0].function.name"),
             ({"max_tokens": 10_000}, "max_tokens")]
    for extra, param in cases:
        body = {"model": prod, "messages": ask("x"), "max_tokens": 4, **extra}
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(**body) if "stream" not in extra else list(oai.chat.completions.create(**body))
        err = e.value.body
        assert err["param"] == param, (extra, err)
        assert err["type"] == "invalid_request_error" and param.split("[")[0].split(".")[0] in err["message"]
    # a streamed request refused before its first token still gets a JSON 400, not a broken stream
    r = app["client"].post("/v1/chat/completions", json={"model": prod, "stream": True, "max_tokens": 2,
                                                         "messages": ask("parcel " * 40)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_sticky_ids_and_streamed_requests_in_the_log(app):
    from serving.traffic import choose, sticky_key

    # safety_identifier and prompt_cache_key are the same key as user: a client switching keeps its side
    for i in range(50):
        keys = {sticky_key({f: f"person-{i}"}, {}) for f in ("user", "safety_identifier", "prompt_cache_key")}
        assert len(keys) == 1
    c, refs = app["client"], app["refs"]
    assert c.post("/admin/flush", headers=ADMIN).status_code == 200  # drain the mirror: none of these is skipped
    served = {}
    for i in range(12):
        body = {"model": TASK, "messages": ask(f"streamed ask {i}"), "max_tokens": 4, "stream": True,
                "safety_identifier": f"sid-{i}"}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in r.iter_lines() if line.startswith("data: {") and '"choices":[{' in line)
            served[i] = (r.headers["x-crucible-model"], text)
        expected = choose(sticky_key({"user": f"sid-{i}"}, {}), 0.1, has_canary=True, salt=TASK)
        assert served[i][0] == refs[expected]
    assert c.post("/admin/flush", headers=ADMIN).status_code == 200
    from serving.requestlog import read_request_logs

    rows = {r["messages"][0]["content"]: r for r in read_request_logs(app["reg"], TASK)
            if r["messages"][0]["content"].startswith("streamed ask")}
    assert len(rows) == 12
    for i, (model, text) in served.items():
        row = rows[f"streamed ask {i}"]
        assert row["model"] == model and row["status"] == 200 and row["messages"][-1]["content"] == text
        assert row["shadow"]["model"] == refs["shadow"]  # mirrored like any other request


def test_shadow_never_delays_or_changes_answers(app):
    c, refs = app["client"], app["refs"]
    # earlier tests can leave the mirror full (it skips, by design, beyond max_concurrency): drain it
    assert c.post("/admin/flush", headers=ADMIN).status_code == 200
    latencies = []
    for i in range(6):
        t0 = time.perf_counter()
        r = chat(c, user=f"shadow-user-{i}", content=f"question {i} mail me at jo@example.com")
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200 and r.headers["x-crucible-model"] != refs["shadow"]
    # the shadow sleeps 1.5 s per request and fails half the time; the client never waits for it
    assert max(latencies) < 1.0, latencies
    flushed = c.post("/admin/flush", headers=ADMIN)  # waits for the shadow calls in flight
    assert flushed.status_code == 200 and flushed.json()["manifest"]
    from serving.requestlog import read_request_logs

    rows = [r for r in read_request_logs(app["reg"], TASK) if r["user"] and "question" in r["messages"][0]["content"]]
    assert len(rows) == 6
    for row in rows:
        assert row["model"] in (refs["production"], refs["canary"]) and row["status"] == 200
        assert row["messages"][-1]["role"] == "assistant"
        assert "jo@example.com" not in json.dumps(row) and "[EMAIL]" in row["messages"][0]["content"]
        assert row["shadow"]["model"] == refs["shadow"] and row["shadow"]["latency_ms"] >= 1400
        assert row["shadow"]["status"] in (200, 502)
    statuses = {row["shadow"]["status"] for row in rows}
    status = c.get("/admin/status", headers=ADMIN).json()
    assert status["live"]["shadow"]["requests"] >= 6
    print(f"\nshadow statuses {statuses}, mirror {status['shadow_mirror']}")


def test_load_burst_only_declared_overload(app):
    bodies = [{"model": TASK, "user": f"burst-{i}", "max_tokens": 8, "messages": [{"role": "user", "content": "b"}]}
              for i in range(120)]
    rs = many(app, bodies, concurrency=60)
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, set(codes)
    assert codes.count(200) > 0
    for r in rs:
        assert r.headers.get("x-crucible-model")
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
    print(f"\nburst of 120 at concurrency 60: {codes.count(200)} ok, {codes.count(503)} overload (503)")
    assert chat(app["client"]).status_code == 200


def test_broken_canary_rolls_back_automatically(app):
    c, refs, reg = app["client"], app["refs"], app["reg"]
    r = c.post("/admin/deploy", headers=ADMIN, json={"model": refs["broken"], "as": "canary", "weight": 1.0})
    assert r.status_code == 200, r.text
    assert reg.alias(TASK, "canary")["target"] == refs["broken"]
    codes = []
    for i in range(25):  # every other request streamed: a streamed failure counts towards the rollback too
        resp = chat(c, user=f"rb-{i}", stream=bool(i % 2))
        codes.append((resp.status_code, resp.headers["x-crucible-model"]))
        assert resp.status_code in (200, 502)
    # the first failures reach clients until the window is judged; then all traffic is production
    assert (502, refs["broken"]) in codes
    assert codes[-5:] == [(200, refs["production"])] * 5
    status = c.get("/admin/status", headers=ADMIN).json()
    assert status["canary_weight"] == 0 and status["models"]["canary"] is None
    assert status["models"]["production"] == refs["production"]
    assert reg.alias(TASK, "canary")["target"] is None
    assert reg.alias(TASK, "production")["target"] == refs["production"]  # production untouched
    from pipelines.release import latest_events_manifest

    event = latest_events_manifest(reg, TASK).metadata["event"]
    assert event["action"] == "rollback" and event["automatic"] and event["model"] == refs["broken"]
    assert "error rate" in event["reasons"][0]


def test_promote_needs_gate_then_swaps_without_dropping_requests(app):
    c, refs, reg = app["client"], app["refs"], app["reg"]
    r = c.post("/admin/deploy", headers=ADMIN, json={"model": refs["canary"], "as": "canary", "weight": 0.5})
    assert r.status_code == 200, r.text
    for i in range(30):
        assert chat(c, user=f"pr-{i}").status_code == 200
    refused = c.post("/admin/promote", headers=ADMIN, json={})
    assert refused.status_code == 409 and "eval gate" in refused.json()["error"]["message"]
    # the record `crucible gate` writes (pipelines.evaluate.gate): inputs.model + metadata.passed
    reg.create("eval", TASK, inputs={"model": refs["canary"]}, metadata={"verdict": "pass", "passed": True})

    async def traffic_during_promote():
        async with httpx.AsyncClient(base_url=app["url"], timeout=60) as ac:
            body = {"messages": [{"role": "user", "content": "p"}], "max_tokens": 16}
            load = [asyncio.create_task(ac.post("/v1/chat/completions", json={**body, "user": f"x{i}"}))
                    for i in range(12)]
            await asyncio.sleep(0.05)
            promoted = await ac.post("/admin/promote", headers=ADMIN, json={})
            return promoted, await asyncio.gather(*load)

    promoted, load = asyncio.run(traffic_during_promote())
    assert promoted.status_code == 200, promoted.text
    assert [r.status_code for r in load] == [200] * 12
    assert reg.alias(TASK, "production")["target"] == refs["canary"]
    assert chat(c, user="after").headers["x-crucible-model"] == refs["canary"]
    from pipelines.release import latest_events_manifest

    events = latest_events_manifest(reg, TASK).metadata["events"]
    assert [e["action"] for e in events][-2:] == ["deploy", "promote"]


def test_prometheus_metrics_on_rays_metrics_port(app):
    """Per role/model/status/validity counters and latency histograms, as Prometheus scrapes them.

    Ray's workers push metric *deltas* to the node's agent every 10 s, and a push that times out on a
    loaded node is dropped: a series whose only increments fell in that push never appears (once a
    flake here, the broken canary's 502s, sent during the busiest tests of the module). So the rare
    series this test looks for are produced right here, on a quiet node, and a series counts as
    exported when any scrape within the deadline shows it, as Prometheus would record it."""
    import ray

    c, refs = app["client"], app["refs"]
    r = c.post("/admin/deploy", headers=ADMIN, json={"model": refs["broken"], "as": "canary", "weight": 1.0})
    assert r.status_code == 200, r.text
    try:  # fewer failures than rollback_min_requests: the policy does not act on them
        assert [chat(c, user=f"m-{i}").status_code for i in range(3)] == [502] * 3
    finally:
        assert c.post("/admin/rollback", headers=ADMIN, json={}).status_code == 200
    assert c.post("/v1/chat/completions", json={"model": TASK, "messages": []}).status_code == 400
    assert chat(c, user="m-stream", stream=True).status_code == 200

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline, seen = time.time() + 90, {}  # series line (without its value) -> the largest value scraped
    def ok_total():
        return sum(v for line, v in seen.items() if line.startswith("ray_crucible_requests")
                   and 'status="200"' in line and 'role="shadow"' not in line)
    while time.time() < deadline:
        for line in httpx.get(url, timeout=10).text.splitlines():
            if line.startswith("ray_crucible_"):
                series, value = line.rsplit(" ", 1)
                seen[series] = max(seen.get(series, 0.0), float(value))
        if ok_total() >= 60 and any(f'model="{refs["broken"]}"' in s and 'status="502"' in s for s in seen) \
                and any('status="503"' in s for s in seen) and any('status="400"' in s for s in seen):
            break
        time.sleep(2)
    text = "\n".join(f"{s} {v}" for s, v in seen.items())
    lines = [line for line in text.splitlines() if line.startswith("ray_crucible_")]
    requests = [line for line in lines if line.startswith(("ray_crucible_requests{", "ray_crucible_requests_total{"))]
    assert requests, text[-2000:]
    def value(line):
        return float(line.rsplit(" ", 1)[1])
    ok = [line for line in requests if 'status="200"' in line and 'role="shadow"' not in line]
    assert sum(value(line) for line in ok) >= 60  # this module sends more than that
    assert any(f'model="{refs["production"]}"' in line and 'role="production"' in line for line in ok)
    assert any(f'model="{refs["broken"]}"' in line and 'role="canary"' in line and 'status="502"' in line
               for line in requests)
    assert any('role="shadow"' in line for line in requests)
    assert any('valid="false"' in line for line in requests)  # random models break the tool-call contract
    assert any('stream="true"' in line for line in requests)
    assert any('status="503"' in line and 'role="none"' in line for line in requests)  # the burst's overload
    assert any('status="400"' in line for line in requests)
    assert any(line.startswith("ray_crucible_request_latency_seconds_bucket{") and 'le="+Inf"' in line
               for line in lines)
    assert any(line.startswith("ray_crucible_completion_tokens") for line in lines)


def _tcp_listeners() -> dict[int, tuple[str, int]]:
    """Listening TCP sockets of this host: inode -> (address, port), from /proc/net/tcp{,6}."""
    import ipaddress

    out = {}
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(f[9])] = (str(ipaddress.ip_address(raw)), int(hexport, 16))
    return out


def test_http_ingress_is_haproxy_on_loopback_only(app):
    """Local mode serves HTTP through Serve's HAProxy (infra.ray_env.serve_fast_path_env); every
    socket it and Serve's replicas listen on is on 127.0.0.1, its admin socket is its user's alone, and
    it writes no per-request metrics log."""
    import os
    import stat

    port = int(app["url"].rsplit(":", 1)[1])
    listeners = _tcp_listeners()
    ours = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "haproxy":
                continue
            inodes = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        socks = [listeners[int(i[8:-1])] for i in inodes if i.startswith("socket:[") and int(i[8:-1]) in listeners]
        if ("127.0.0.1", port) in socks:
            ours[pid] = (socks, Path(argv[argv.index("-f") + 1]))
    assert ours, f"no haproxy process listens on the app's port {port}"
    for socks, cfg in ours.values():
        assert {addr for addr, _ in socks} == {"127.0.0.1"}, socks  # metrics and stats frontends too
        admin = cfg.parent / "admin.sock"
        assert stat.S_IMODE(admin.stat().st_mode) & 0o077 == 0, oct(admin.stat().st_mode)
        # no per-request log line for Serve's metrics collector to wake up for (the router's own
        # metrics count requests, test_prometheus_metrics_on_rays_metrics_port)
        assert "format rfc5424" not in cfg.read_text()

    # every Serve replica (the router's HTTP port, each replica's gRPC server for calls between
    # deployments, Ray's own worker port) listens on loopback only
    replicas = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ServeReplica"):
                continue
            inodes = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        replicas[pid] = [listeners[int(i[8:-1])] for i in inodes if i.startswith("socket:[") and int(i[8:-1]) in listeners]
    assert len(replicas) >= 4 and all(len(socks) >= 2 for socks in replicas.values()), replicas
    for socks in replicas.values():
        assert all(_on_loopback(addr) for addr, _ in socks), socks


def _on_loopback(addr: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(addr)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_replicas_route_on_their_own_loop_and_the_driver_on_a_separate_one(app):
    """infra.ray_env: a driver's handles keep a loop of their own (it blocks in ``.result()``), Ray's
    workers (every replica) get the throughput settings' choice, the replica's loop."""
    import os

    import ray

    assert os.environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "1"
    worker_env = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP")).remote())
    assert worker_env == "0"
