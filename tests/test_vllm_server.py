"""The ``vllm`` engine as a managed server from the vLLM venv, and the vLLM Serve replica.

Real vLLM (the CPU build in .venv-vllm) on a tiny model it has kernels for (head size 64); skipped,
saying why, where that venv is absent.
"""

from __future__ import annotations

import json

import httpx
import pytest

from pipelines.engines import GenParams, get_engine, pick_engine
from pipelines.engines.vllm_server import cpu_supports, vllm_python
from pipelines.guide import Guide
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
    engine = get_engine("auto", model=str(models["adapter"]))  # a LoRA adapter, served on its base
    try:
        assert engine.name == "vllm" and engine.server.loras == {"adapter": str(models["adapter"])}
        v_free, v_guided = engine.generate(cs, free), engine.generate(cs, guided)
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


def test_vllm_replica_serves_base_and_adapter_in_one_server_and_streams(models, ray_local):
    from ray import serve

    from infra.registry import Registry
    from serving.vllm_replica import VLLMReplica

    uri = f"file://{models['root'] / 'registry'}"
    reg = Registry.open(uri)
    base_ref = reg.add_directory("model", "vllm-test", models["base"]).id
    (models["adapter"] / "adapter_config.json").write_text(json.dumps(
        {**json.loads((models["adapter"] / "adapter_config.json").read_text()), "base_model_name_or_path": base_ref}))
    adapter_ref = reg.add_directory("model", "vllm-test", models["adapter"]).id
    serve.run(VLLMReplica.options(ray_actor_options={"num_cpus": 0.5}).bind(base_ref, uri, [adapter_ref]),
              name="vllm-replica", route_prefix=None)
    try:
        h = serve.get_app_handle("vllm-replica")
        info = h.info.remote().result()
        assert info["engine"] == "vllm" and set(info["models"]) == {base_ref, adapter_ref}
        messages = chats(1)[0]
        params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 0, "guide": None,
                  "max_prompt_tokens": 100}
        base_out = h.generate.remote(messages, dict(params)).result()
        lora_out = h.generate.remote(messages, dict(params), adapter_ref).result()
        hf_base = get_engine("hf", model=str(models["base"])).generate([messages], GenParams(max_new_tokens=8))[0]
        hf_lora = get_engine("hf", model=str(models["adapter"]), registry=reg).generate([messages], GenParams(max_new_tokens=8))[0]
        base_text, lora_text = base_out["choices"][0]["text"], lora_out["choices"][0]["text"]
        assert (base_text, lora_text) == (hf_base.text, hf_lora.text) and hf_base.text != hf_lora.text
        assert base_out["model"] == base_ref and base_out["prompt_tokens"] == hf_base.prompt_tokens
        assert 0 < base_out["engine_s"] < 600  # the engine's share, which the router's Server-Timing reports
        too_long = h.generate.remote(messages, {**params, "max_prompt_tokens": 2}).result()
        assert too_long["status"] == 400 and "at most 2" in too_long["error"]
        items = list(h.options(stream=True).stream.remote(messages, dict(params), adapter_ref))
        assert items[0]["model"] == base_ref and "finish_reason" in items[-1]  # the seam's stream shape
        assert "".join(i.get("delta", "") for i in items[1:-1]) == hf_lora.text
        assert items[-1]["completion_tokens"] > 0
        url = info["url"]
    finally:
        serve.delete("vllm-replica")
    with pytest.raises(httpx.HTTPError):  # the replica's server went with it
        httpx.get(url + "/v1/models", timeout=30)
