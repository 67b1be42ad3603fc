"""The HF engine on real tiny models: batching, greedy/sampling, stops, token counts, adapters, refs."""

from __future__ import annotations

import json

import pytest

from pipelines.engines import GenParams, get_engine, pick_engine
from tests.evalkit import chats, lively_model, lora_adapter


@pytest.fixture(scope="module")
def lively(tiny_model, tmp_path_factory):
    return lively_model(tiny_model, tmp_path_factory.mktemp("lively"))


@pytest.fixture(scope="module")
def engine(lively):
    return get_engine("hf", model=str(lively), batch_size=4)


def test_batched_left_padded_equals_one_at_a_time(engine):
    cs = chats(9)  # different lengths, so batches need padding
    batched = engine.generate(cs, GenParams(max_new_tokens=12))
    single = [engine.generate([c], GenParams(max_new_tokens=12))[0] for c in cs]
    assert [b.text for b in batched] == [s.text for s in single]
    assert len({b.text for b in batched}) > 3, "outputs should vary across prompts"
    assert [b.prompt_tokens for b in batched] == [s.prompt_tokens for s in single]


def test_token_counts_and_finish_reason(engine):
    out = engine.generate(chats(3), GenParams(max_new_tokens=5))
    for c, chat in zip(out, chats(3)):
        ids = engine.tokenizer(engine.render(chat), add_special_tokens=False)["input_ids"]
        assert c.prompt_tokens == len(ids)
        assert c.completion_tokens <= 5
        assert c.finish_reason == ("length" if c.completion_tokens == 5 else "stop")


def test_sampling_is_seeded(engine):
    p = GenParams(max_new_tokens=10, temperature=1.0, seed=7)
    a = [c.text for c in engine.generate(chats(4), p)]
    b = [c.text for c in engine.generate(chats(4), p)]
    c = [c.text for c in engine.generate(chats(4), GenParams(max_new_tokens=10, temperature=1.0, seed=8))]
    assert a == b
    assert a != c


def test_stop_strings_cut_the_output(engine):
    full = engine.generate(chats(4), GenParams(max_new_tokens=16))
    # a stop string taken from the middle of each greedy output must end it right there
    for chat, f in zip(chats(4), full):
        if len(f.text) < 6:
            continue
        stop = f.text[3:6]
        got = engine.generate([chat], GenParams(max_new_tokens=16, stop=(stop,)))[0]
        assert got.text == f.text[: f.text.find(stop)]
        assert got.finish_reason == "stop"


def test_template_parity_with_saved_template(engine, lively):
    """Eval renders prompts with exactly the template saved in the model folder (as training does)."""
    from transformers import AutoTokenizer

    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    saved = AutoTokenizer.from_pretrained(str(lively))
    assert engine.render(chat) == saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert engine.render(chat) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_lora_adapter_folder_and_registry_ref(lively, tmp_path, engine):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from infra.registry import Registry

    adapter = lora_adapter(lively, tmp_path / "adapter")
    eng = get_engine("hf", model=str(adapter), batch_size=4)
    got = [c.text for c in eng.generate(chats(5), GenParams(max_new_tokens=10))]
    assert got != [c.text for c in engine.generate(chats(5), GenParams(max_new_tokens=10))], "adapter had no effect"
    # the same adapter applied by hand gives the same greedy tokens
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lively), str(adapter)).eval()
    ids = eng.tokenizer(eng.render(chats(5)[2]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=eng.tokenizer.pad_token_id)
    assert eng.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == got[2]
    # as a registry artifact whose manifest names the base as another artifact
    reg = Registry.open(f"file://{tmp_path}/reg", cache_dir=tmp_path / "cache")
    base = reg.add_directory("model", "t", lively)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/nonexistent/base"  # the manifest's inputs.base_model must win
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    m = reg.add_directory("model", "t", adapter, inputs={"base_model": base.id})
    eng2 = get_engine("hf", model=m.id, registry=reg)
    assert [c.text for c in eng2.generate(chats(5), GenParams(max_new_tokens=10))] == got


def test_pickle_weights_are_refused(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        get_engine("hf", model=str(folder))


def test_factory_errors_and_auto():
    assert pick_engine("auto") in ("hf", "vllm")
    with pytest.raises(ValueError, match="choose one of"):
        get_engine("tgi", model="x")
    with pytest.raises(ValueError, match="url"):
        get_engine("http")
    with pytest.raises(ValueError, match="needs a model"):
        get_engine("hf")


def test_guide_cache_is_bounded_and_keeps_the_recent_ones(engine, monkeypatch):
    import pipelines.engines.hf as hf

    monkeypatch.setattr(hf, "MAX_GUIDES", 3)
    engine._guides.clear()
    guides = [json.dumps({"choice": [f"label{i}", "other"]}) for i in range(5)]
    outs = [engine.generate(chats(1), GenParams(max_new_tokens=4, guide=g))[0].text for g in guides]
    assert all(o in (f"label{i}", "other") for i, o in enumerate(outs))  # each guide still enforced
    assert list(engine._guides) == guides[2:]  # least recently used dropped first
    engine.generate(chats(1), GenParams(max_new_tokens=2, guide=guides[2]))  # a hit moves to the end
    assert list(engine._guides) == [guides[3], guides[4], guides[2]]
