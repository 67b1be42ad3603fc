"""`crucible export` (merged safetensors; GGUF + Modelfile read back by transformers) and `crucible chat`.

The model under test is a LoRA adapter registered the way training registers one (adapter folder
with tokenizer and crucible.json, manifest naming its base), on a tiny llama with grouped-query
attention (4 heads, 2 KV heads) so the q/k permutation for llama.cpp is exercised both ways.
"""

from __future__ import annotations

import json

import pytest


SYSTEM = "Answer in one word."
PROMPTS = ("Hello there", "What is 2+2?", "Tell me a story about a cat.")


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory, gpt2_tokenizer):
    """(registry dir, model id, base folder): a registered LoRA adapter whose merge changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from infra.registry import Registry
    from pipelines.modeling import init_model, load_tokenizer

    root = tmp_path_factory.mktemp("export")
    base = root / "base"
    init_model(base, tokenizer=gpt2_tokenizer, arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, seed=0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "up_proj", "down_proj"],
                                      task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero (a no-op adapter); random B makes the merge matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapter = root / "adapter"
    model.save_pretrained(adapter, safe_serialization=True)
    load_tokenizer(base).save_pretrained(adapter)
    (adapter / "crucible.json").write_text(json.dumps({"system_prompt": SYSTEM, "base_model": str(base)}))
    reg = root / "registry"
    m = Registry.open(f"file://{reg}").add_directory("model", "demo", adapter, inputs={"base_model": str(base)},
                                                      metadata={"system_prompt": SYSTEM, "method": "lora"})
    return reg, m.id, base


def _registry(reg):
    from infra.registry import Registry

    return Registry.open(f"file://{reg}")


def _prompt_ids(tokenizer, text: str) -> list[int]:
    from pipelines.templates import render, with_system_prompt

    chat = with_system_prompt([{"role": "user", "content": text}], SYSTEM)
    return tokenizer(render(tokenizer, chat, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def _greedy(model, ids: list[int], n: int = 16):
    """(greedy continuation ids, next-token logits after the prompt)."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0, -1]
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist(), logits


@pytest.fixture(scope="module")
def source(lora_model):
    """The registered LoRA model as eval and serving load it (PEFT on its base, not merged)."""
    from pipelines.engines.loading import load_for_inference

    reg, ref, _ = lora_model
    model, tok, resolved = load_for_inference(ref, _registry(reg), dtype="float32", device="cpu")
    return model, tok, resolved


def test_gguf_export_of_a_lora_model_loads_back_with_the_same_greedy_outputs(tmp_path, lora_model, source):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg, ref, base = lora_model
    src, tok, _ = source
    from typer.testing import CliRunner

    from jobs.cli import app

    result = CliRunner().invoke(app, ["export", ref, "--format", "gguf", "--out", str(tmp_path / "out"), "--json",
                                      "--registry", f"file://{reg}"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["adapter_merged"] and info["quant"] == "f16" and info["template"] == "chatml"
    gguf_path = tmp_path / "out" / f"{ref}.gguf"
    assert info["gguf"] == str(tmp_path / "out" / f"{ref}.gguf") and gguf_path.stat().st_size == info["size"]

    fields = gguf.GGUFReader(str(gguf_path)).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert len(fields["tokenizer.ggml.tokens"].data) == len(tok)

    mf = (tmp_path / "out" / "Modelfile").read_text()
    assert f"FROM ./{ref}.gguf" in mf and f'SYSTEM """{SYSTEM}"""' in mf
    assert 'PARAMETER stop "<|im_end|>"' in mf
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in mf

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file=gguf_path.name,
                                                    dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(str(tmp_path / "out"), gguf_file=gguf_path.name)
    assert exported.config.num_key_value_heads == 2 and exported.config.tie_word_embeddings
    plain_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for text in PROMPTS:
        ids = _prompt_ids(tok, text)
        assert _prompt_ids(gtok, text) == ids  # the GGUF's tokenizer and template agree with the source
        want, want_logits = _greedy(src, ids)
        got, got_logits = _greedy(exported, ids)
        assert got == want, text
        assert torch.allclose(got_logits, want_logits, atol=2e-2)  # f16 weights
        _, base_logits = _greedy(plain_base, ids)
        assert not torch.allclose(base_logits, want_logits, atol=0.1)  # the merge mattered


def test_gguf_f32_is_exact_and_q8_0_is_close(tmp_path, lora_model, source):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.export import export

    reg, ref, _ = lora_model
    src, tok, _ = source
    sizes = {}
    for quant in ("f32", "q8_0"):
        info = export(ref, tmp_path / quant, fmt="gguf", quant=quant, registry=_registry(reg), name="m")
        sizes[quant] = info["size"]
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / quant), gguf_file="m.gguf",
                                                     dtype=torch.float32).eval()
        for text in PROMPTS:
            ids = _prompt_ids(tok, text)
            want, want_logits = _greedy(src, ids)
            got, got_logits = _greedy(model, ids)
            # f32: only the merge's rounding; q8_0: 8-bit weights, still the same greedy tokens here
            assert torch.allclose(got_logits, want_logits, atol=1e-4 if quant == "f32" else 2e-2), quant
            assert got == want, (quant, text)
    # not a quarter: the tokenizer metadata (~1.5 MB) is the same in both
    assert info["tensor_types"]["Q8_0"] > 0 and sizes["q8_0"] < sizes["f32"] / 2.5


def test_safetensors_export_is_a_merged_model_predict_can_load(tmp_path, lora_model, source):
    from pipelines.engines import GenParams
    from pipelines.engines.hf import HFEngine
    from pipelines.export import export

    reg, ref, _ = lora_model
    src, tok, resolved = source
    out = tmp_path / "merged"
    info = export(ref, out, fmt="safetensors", registry=_registry(reg))
    assert info["adapter_merged"] and info["dtype"] == "float32"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    assert json.loads((out / "crucible.json").read_text())["system_prompt"] == SYSTEM

    chats = [[{"role": "user", "content": t}] for t in PROMPTS]
    params = GenParams(max_new_tokens=16)
    exported = HFEngine.load(str(out))
    assert exported.default_system_prompt == SYSTEM
    original = HFEngine(src, tok, resolved=resolved)
    from pipelines.templates import with_system_prompt

    chats = [with_system_prompt(c, SYSTEM) for c in chats]
    assert [c.text for c in exported.generate(chats, params)] == [c.text for c in original.generate(chats, params)]


def test_export_refuses_bad_input_naming_it(tmp_path, gpt2_tokenizer, lora_model):
    from typer.testing import CliRunner

    from jobs.cli import app
    from pipelines.modeling import init_model

    reg, ref, base = lora_model
    qwen = tmp_path / "qwen"
    init_model(qwen, tokenizer=gpt2_tokenizer, arch="qwen2", layers=1, hidden=32, heads=2)
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, ["export", *args, "--registry", f"file://{reg}", "--out",
                                     str(tmp_path / "o"), "--json"])
        return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1])["error"]

    code, msg = run(str(qwen), "--format", "gguf")
    assert code == 2 and "'qwen2'" in msg and "llama" in msg
    code, msg = run(str(base), "--format", "onnx")
    assert code == 2 and "'onnx'" in msg
    code, msg = run(str(base), "--format", "safetensors", "--quant", "q8_0")
    assert code == 2 and "'q8_0'" in msg
    code, msg = run("demo@nope", "--format", "gguf")
    assert code == 2 and "demo@nope" in msg
    assert not (tmp_path / "o").exists()


def test_modelfile_translates_the_builtin_templates_and_a_default_system_prompt(tiny_model):
    from pipelines.export import GO_TEMPLATES, match_builtin_template, modelfile
    from pipelines.modeling import load_tokenizer
    from pipelines.templates import BUILTIN, CHATML

    tok = load_tokenizer(tiny_model)
    for name, tpl in BUILTIN.items():
        tok.chat_template = tpl
        assert match_builtin_template(tok) == (name, None)
    # SmolLM2-style: ChatML that writes its own system message when a chat has none
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}"
                         "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}" + CHATML)
    assert match_builtin_template(tok) == ("chatml", "You are SmolLM.")
    mf = modelfile(tok, "m.gguf", system_prompt=None, stops=["<|im_end|>"])
    assert 'SYSTEM """You are SmolLM."""' in mf["text"] and mf["stop"] == ["<|im_end|>", "<|im_start|>"]
    tok.chat_template = BUILTIN["simple"]
    simple = modelfile(tok, "m.gguf", system_prompt="Be kind.", stops=[tok.eos_token])["text"]
    assert GO_TEMPLATES["simple"].replace("EOS", tok.eos_token) in simple and 'SYSTEM """Be kind."""' in simple
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert match_builtin_template(tok) == (None, None)
    assert "TEMPLATE" not in modelfile(tok, "m.gguf", system_prompt=None, stops=[])["text"].replace("# no TEMPLATE", "")


def test_chat_session_reuses_the_kv_cache_and_matches_the_engine(lora_model, source):
    from pipelines.engines import GenParams
    from pipelines.engines.hf import HFEngine
    from pipelines.export import ChatSession

    src, tok, resolved = source
    engine = HFEngine(src, tok, resolved=resolved)
    session = ChatSession(src, tok, system_prompt=SYSTEM, max_new_tokens=12)
    streamed: list[str] = []
    chat = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(("Hello there", "What is 2+2?", "And 3+3?")):
        reply = session.send(text, streamed.append)
        chat.append({"role": "user", "content": text})
        assert reply == engine.generate([chat], GenParams(max_new_tokens=12))[0].text
        assert "".join(streamed) == reply
        streamed.clear()
        chat.append({"role": "assistant", "content": reply})
        if i:  # later turns compute only what the cache does not hold
            assert session.reused_tokens > 20
    session.reset()
    assert session.messages == [] and session.send("Hello there") == chat[2]["content"]


def test_chat_command_streams_replies_from_piped_input(tmp_path, lora_model, source):
    from pipelines.engines import GenParams
    from pipelines.engines.hf import HFEngine

    reg, ref, _ = lora_model
    src, tok, resolved = source
    engine = HFEngine(src, tok, resolved=resolved)
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    first = engine.generate([chat], GenParams(max_new_tokens=12))[0].text
    chat += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is 2+2?"}]
    second = engine.generate([chat], GenParams(max_new_tokens=12))[0].text

    import os
    import subprocess

    from tests.test_cli import CRUCIBLE

    proc = subprocess.run([str(CRUCIBLE), "chat", ref, "--max-new-tokens", "12", "--temperature", "0"],
                          input="Hello there\nWhat is 2+2?\n/reset\nHello there\n", cwd=tmp_path,
                          env={**os.environ, "CRUCIBLE_REGISTRY": f"file://{reg}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{first}\n{second}\n{first}\n"
    assert "conversation cleared" in proc.stderr


@pytest.mark.slow
def test_smollm2_exports_to_q8_0_gguf_with_the_same_greedy_answer(tmp_path, smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.engines.loading import load_for_inference
    from pipelines.export import export

    folder, _ = smollm2_gguf
    info = export(str(folder), tmp_path, fmt="gguf", quant="q8_0", name="smollm2")
    assert info["template"] == "chatml" and "SmolLM" in (info["default_system_prompt"] or "")
    assert 130e6 < info["size"] < 200e6  # 135M parameters at ~8.5 bits
    src, tok, _ = load_for_inference(str(folder), dtype="float32", device="cpu")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="smollm2.gguf",
                                                    dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    want, _ = _greedy(src, list(ids), n=8)
    got, _ = _greedy(exported, list(ids), n=8)
    assert "Paris" in tok.decode(got) and got == want


def test_merge_registers_a_merged_model_with_lineage_and_the_same_outputs(lora_model, source):
    from typer.testing import CliRunner

    from jobs.cli import app
    from pipelines.engines import GenParams
    from pipelines.engines.hf import HFEngine
    from pipelines.engines.loading import load_for_inference
    from pipelines.templates import with_system_prompt

    reg, ref, _ = lora_model
    result = CliRunner().invoke(app, ["merge", ref, "--json", "--registry", f"file://{reg}"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    merged = _registry(reg).get(info["model"])
    assert merged.inputs["merged_from"] == ref and merged.metadata["method"] == "merged-lora"
    assert "adapter_config.json" not in merged.files and "model.safetensors" in merged.files
    src, tok, resolved = source
    model, mtok, mres = load_for_inference(merged.id, _registry(reg), dtype="float32", device="cpu")
    chats = [with_system_prompt([{"role": "user", "content": t}], SYSTEM) for t in PROMPTS]
    params = GenParams(max_new_tokens=12)
    assert [c.text for c in HFEngine(model, mtok, resolved=mres).generate(chats, params)] == \
        [c.text for c in HFEngine(src, tok, resolved=resolved).generate(chats, params)]
    # merging a merged (full) model is refused, naming it
    again = CliRunner().invoke(app, ["merge", merged.id, "--json", "--registry", f"file://{reg}"])
    assert again.exit_code == 2 and merged.id in again.output
