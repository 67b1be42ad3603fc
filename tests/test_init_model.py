"""Tiny models for tests: safetensors, a tokenizer with a chat template, deterministic per seed."""

from __future__ import annotations

import pytest
import torch

from pipelines.modeling import describe_model_folder, init_model, safetensors_parameter_count


def test_tiny_model_loads_chats_and_generates(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in tiny_model.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or out[0, -1] == tok.eos_token_id
    facts = describe_model_folder(tiny_model)
    assert facts["parameters"] == sum(p.numel() for p in model.parameters()) == safetensors_parameter_count(tiny_model)


def test_same_seed_same_weights_other_seed_differs(tmp_path, gpt2_tokenizer):
    from safetensors.torch import load_file

    kw = dict(tokenizer=gpt2_tokenizer, layers=1, hidden=32, heads=2)
    init_model(tmp_path / "a", seed=1, **kw)
    init_model(tmp_path / "b", seed=1, **kw)
    init_model(tmp_path / "c", seed=2, **kw)
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_shapes_are_refused(tmp_path, gpt2_tokenizer):
    with pytest.raises(ValueError, match="multiple of heads"):
        init_model(tmp_path / "x", tokenizer=gpt2_tokenizer, hidden=30, heads=4)
    with pytest.raises(ValueError, match="choose one of"):
        init_model(tmp_path / "x", tokenizer=gpt2_tokenizer, arch="rnn")
