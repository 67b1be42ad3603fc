"""The ``vllm`` engine as a managed server from the vLLM venv, and the vLLM Serve replica.

Real vLLM (the CPU build in .venv-vllm) on a tiny model it has kernels for (head size 64); skipped,
saying why, where that venv is absent.
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from bench.serve_vllm import server_timing, tree_cpu_s
from pipelines.contract import Checker
from pipelines.engines import GenParams, get_engine, pick_engine
from pipelines.engines.vllm_server import cpu_supports, vllm_python
from pipelines.evaluate.rows import Example
from pipelines.evaluate.runner import generate_rows
from pipelines.guide import Guide
from pipelines.spec import Contract
from tests.evalkit import chats, lively_model, lora_adapter

pytestmark = pytest.mark.slow
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "n"],
          "properties": {"kind": {"enum": ["alpha", "bravo", "charlie delta"]}, "n": {"type": "integer"},
                         "note": {"type": "string"}}}


@pytest.fixture(scope="module")
def models(tmp_path_factory, gpt2_tokenizer):
    if vllm_python() is None:
        pytest.skip("no vLLM venv (.venv-vllm, or CRUCIBLE_VLLM_PYTHON): run `make setup-vllm`")
    from pipelines.modeling import init_model

    root = tmp_path_factory.mktemp("vllm-server")
    init_model(root / "tiny", tokenizer=gpt2_tokenizer, hidden=64, heads=1)
    base = lively_model(root / "tiny", root / "base")
    return {"base": base, "adapter": lora_adapter(base, root / "adapter"), "root": root}


def test_auto_picks_vllm_only_where_it_runs_the_model(models, tiny_model, monkeypatch):
    assert pick_engine("auto", str(models["adapter"])) == "vllm"
    assert "head size 16" in cpu_supports(tiny_model) and pick_engine("auto", str(tiny_model)) == "hf"
    monkeypatch.setenv("CRUCIBLE_VLLM_PYTHON", "off")
    assert pick_engine("auto", str(models["adapter"])) == "hf"
    with pytest.raises(ImportError, match="make setup-vllm"):
        get_engine("vllm", model=str(models["adapter"]))


def test_server_engine_matches_hf_greedy_free_and_under_a_json_schema(models):
    cs = chats(8)
    guide = json.dumps({"json_schema": SCHEMA})
    free, guided = GenParams(max_new_tokens=10), GenParams(max_new_tokens=24, guide=guide)
    from infra.registry import Registry

    # a registered LoRA adapter on its own is served merged (LoRA decodes ~4x slower on vLLM's CPU
    # build); the merge is registered once. (Adapters sharing a base: the multi-LoRA test below.)
    reg = Registry.open(f"file://{models['root'] / 'engine-registry'}")
    ref = reg.add_directory("model", "vllmengine", shutil.copytree(models["adapter"], models["root"] / "copy")).id
    engine = get_engine("auto", model=ref, registry=reg)
    examples = [Example(id=str(i), chat=c) for i, c in enumerate(cs)]
    checker = Checker(Contract(type="json", schema=SCHEMA))
    try:
        assert engine.name == "vllm" and not engine.server.loras and engine.http.stream_interval > 1
        assert reg.get(engine.resolved.ref).inputs["merged_from"] == ref
        v_free, v_guided = engine.generate(cs, free), engine.generate(cs, guided)
        v_rows, _ = generate_rows(engine, examples, cs, checker, guided)
        # a free decode streamed and cut where it leaves the grammar: eval's free-first pass
        longer = GenParams(max_new_tokens=24)
        whole, cut = engine.generate(cs, longer), engine.generate(cs, GenParams(max_new_tokens=24, stop_outside=guide))
    finally:
        engine.close()
    assert engine.server.proc.poll() is not None, "close() stops the server"
    hf = get_engine("hf", model=str(models["adapter"]), batch_size=4)
    h_free, h_guided = hf.generate(cs, free), hf.generate(cs, guided)
    assert [v.text for v in v_free] == [h.text for h in h_free]
    assert [v.prompt_tokens for v in v_free] == [h.prompt_tokens for h in h_free]
    # one grammar: vLLM's structured outputs and our guide pick the same greedy tokens
    assert [v.text for v in v_guided] == [h.text for h in h_guided]
    g = Guide.json_schema(SCHEMA)
    assert all(g.advance(g.start, v.text) is not None for v in v_guided)  # cut at max tokens: still completable
    assert all(g.accepts(v.text) for v in v_guided if v.finish_reason == "stop")
    assert any(v.text != f.text for v, f in zip(v_guided, v_free)), "the schema must change the outputs"
    # the model's own validity on both engines: vLLM does not say where its grammar overrode the model,
    # so eval decodes freely first and under the grammar where the free output leaves it; the verdicts
    # match the HF guide's own
    h_rows, _ = generate_rows(hf, examples, cs, checker, guided)
    assert [r["output"] for r in v_rows] == [r["output"] for r in h_rows]
    assert [r["guide_interventions"] > 0 for r in v_rows] == [r["guide_interventions"] > 0 for r in h_rows]
    assert any(r["guide_interventions"] for r in v_rows)
    left = [g.advance(g.start, w.text) is None for w in whole]
    assert any(left)
    for w, c, out in zip(whole, cut, left):
        assert w.text.startswith(c.text)
        if out:  # cut at the token that left the grammar, the request aborted
            assert c.extra["left_guide"] and g.advance(g.start, c.text) is None
            assert c.completion_tokens < w.completion_tokens or len(c.text) == len(w.text)
            # chunks of several tokens (stream_interval) carry usage: a cut row's tokens are counted
            assert c.prompt_tokens == w.prompt_tokens > 0 and c.completion_tokens >= 1
        else:
            assert c.text == w.text and c.completion_tokens == w.completion_tokens and "left_guide" not in c.extra
    assert sum(c.completion_tokens for c in cut) < sum(w.completion_tokens for w in whole)


def test_canary_adapters_share_productions_vllm_replica(models, ray_local, monkeypatch):
    """Production (the base) and a canary that is a LoRA adapter of it: one model app, one vLLM server,
    over real HTTP through the router. A second adapter deployed at run time is loaded into that same
    server (no new app), with its own saved system prompt; rollback and promotion retire no app that
    still serves a routed model. Each answer equals the HF engine's greedy answer for that model."""
    from ray import serve

    from infra.registry import Registry
    from pipelines.spec import spec_from_dict
    from serving.app import deploy
    from tests.evalkit import lora_adapter
    from tests.s3server import free_port

    monkeypatch.setenv("CRUCIBLE_ADMIN_TOKEN", "share-token")
    admin = {"Authorization": "Bearer share-token"}
    root = models["root"]
    uri = f"file://{root / 'registry'}"
    reg = Registry.open(uri)
    base_ref = reg.add_directory("model", "vllmshare", models["base"]).id

    def register_adapter(folder, system_prompt=None):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base_ref}))
        if system_prompt:
            (folder / "crucible.json").write_text(json.dumps({"system_prompt": system_prompt}))
        return reg.add_directory("model", "vllmshare", folder).id

    canary = register_adapter(models["adapter"])
    saved = "Answer in one word."
    second_dir = lora_adapter(models["base"], root / "second", seed=5)
    second = register_adapter(second_dir, saved)
    spec = spec_from_dict({"task": "vllmshare", "model": {"base": str(models["base"])}, "registry": uri,
                           "deploy": {"engine": "vllm", "num_cpus": 0.5, "max_prompt_tokens": 60, "max_new_tokens": 1000,
                                      "canary_weight": 0.5}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    plan = deploy(spec, {"task": "vllmshare", "models": {"production": base_ref, "canary": canary, "shadow": None},
                         "canary_weight": 0.5}, uri)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    messages = chats(3)[2]
    hf = {ref: get_engine("hf", model=ref, registry=reg) for ref in (base_ref, canary, second)}

    def expected(ref, msgs=messages):
        return hf[ref].generate([msgs], GenParams(max_new_tokens=8))[0]

    def ask(ref, **kw):
        r = client.post("/v1/chat/completions", json={"model": ref, "messages": messages, "max_tokens": 8,
                                                      "temperature": 0, **kw})
        assert r.status_code == 200, r.text
        assert r.headers["x-crucible-model"] == ref
        return r

    try:
        assert plan["hosts"] == {canary: base_ref}
        model_apps = sorted(a for a in serve.status().applications if a.startswith("vllmshare--"))
        assert model_apps == ["vllmshare--" + base_ref.rsplit("-", 1)[-1]], "one app serves both"
        status = client.get("/admin/status", headers=admin).json()
        assert status["apps"] == {base_ref: model_apps[0], canary: model_apps[0]}
        info = serve.get_app_handle(model_apps[0]).info.remote().result()
        assert info["engine"] == "vllm" and info["models"] == sorted([base_ref, canary])

        base_ans, lora_ans = expected(base_ref), expected(canary)
        assert base_ans.text != lora_ans.text, "the adapter must change the answer"
        r = ask(base_ref)
        assert r.json()["choices"][0]["message"]["content"] == base_ans.text
        assert r.json()["usage"]["prompt_tokens"] == base_ans.prompt_tokens
        # each layer times itself, and each holds the next: router > its wait on the replica > the replica > vLLM
        timing = server_timing(r.headers["server-timing"])
        assert timing["router"] > timing["upstream"] > timing["replica"] > timing["engine"] > 0, timing
        assert 'upstream;' in r.headers["server-timing"] and 'desc="http"' in r.headers["server-timing"]
        assert ask(canary).json()["choices"][0]["message"]["content"] == lora_ans.text
        with client.stream("POST", "/v1/chat/completions", json={"model": canary, "messages": messages,
                                                                "max_tokens": 8, "stream": True}) as s:
            deltas = [json.loads(line[5:])["choices"] for line in s.iter_lines()
                      if line.startswith("data:") and "[DONE]" not in line]
        assert "".join(c[0]["delta"].get("content") or "" for c in deltas if c) == lora_ans.text
        # a client that goes away mid-stream stops the generation in vLLM, three hops down (router ->
        # replica -> vLLM server, each closing its connection): the engine is busy while the stream is
        # open and idle soon after it closes; left alone, the same request runs its 1000 tokens
        assert ask(base_ref, max_tokens=1000).json()["usage"]["completion_tokens"] == 1000
        engine = info["server_pid"]
        with client.stream("POST", "/v1/chat/completions", json={"model": base_ref, "messages": messages,
                                                                "max_tokens": 1000, "stream": True}) as s:
            lines = s.iter_lines()
            assert [next(lines) for _ in range(6)]  # the role chunk and the first tokens
            t = tree_cpu_s(engine)
            time.sleep(1)
            busy = tree_cpu_s(engine) - t
        time.sleep(1)  # the cancellation's way down
        t = tree_cpu_s(engine)
        time.sleep(2)
        idle = (tree_cpu_s(engine) - t) / 2
        assert busy > 0.3 and idle < busy / 4, (busy, idle)
        too_long = client.post("/v1/chat/completions", json={"model": canary, "max_tokens": 4,
                                                             "messages": [{"role": "user", "content": "x " * 100}]})
        assert too_long.status_code == 400 and "at most 60" in too_long.json()["error"]["message"]

        # a second adapter, deployed at run time: loaded into the running server, no new app
        d = client.post("/admin/deploy", headers=admin, json={"model": second, "as": "canary", "weight": 0.5})
        assert d.status_code == 200, d.text
        assert d.json()["served_beside"] == base_ref and d.json()["app"] == model_apps[0]
        assert sorted(a for a in serve.status().applications if a.startswith("vllmshare--")) == model_apps
        with_saved = [{"role": "system", "content": saved}, *messages]  # its own saved system prompt
        assert ask(second).json()["choices"][0]["message"]["content"] == expected(second, with_saved).text
        rolled = client.post("/admin/rollback", headers=admin)
        assert rolled.status_code == 200 and rolled.json()["retired_app"] is None  # its app serves production

        # promote an adapter served beside the base: the base's app stays, it now serves production
        assert client.post("/admin/deploy", headers=admin, json={"model": canary, "as": "canary"}).status_code == 200
        promoted = client.post("/admin/promote", headers=admin, json={"force": True})
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["retired_app"] is None
        r = client.post("/v1/chat/completions", json={"model": "vllmshare", "messages": messages, "max_tokens": 8,
                                                      "temperature": 0})
        assert r.headers["x-crucible-model"] == canary
        assert r.json()["choices"][0]["message"]["content"] == lora_ans.text
        url = info["url"]
    finally:
        client.close()
        serve.shutdown()
    with pytest.raises(httpx.HTTPError):  # the replica's server went with it
        httpx.get(url + "/v1/models", timeout=30)
