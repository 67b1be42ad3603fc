"""Taking a model out of crucible: a merged safetensors folder, a GGUF file with an Ollama
``Modelfile``, and a terminal chat.

Every path loads the model the way eval and serving do (``load_for_inference``: a folder, a
registry ref, a LoRA adapter on its base), so an export carries exactly the weights, chat template
and default system prompt that were evaluated. A LoRA adapter is merged into its base first:
llama.cpp, Ollama and plain transformers users get one self-contained model.

GGUF is written with the ``gguf`` package for the llama architecture (SmolLM2 and the tiny test
models) with a byte-level BPE (GPT-2 style) tokenizer, following llama.cpp's
``convert_hf_to_gguf.py``: q/k projections permuted into llama.cpp's rotary layout, 1-D tensors
kept in f32, no ``output.weight`` when the embeddings are tied.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from pipelines.templates import BUILTIN, CHATML_TOKENS, render, with_system_prompt

FORMATS = ("safetensors", "gguf")
GGUF_QUANTS = ("f16", "f32", "q8_0")
SAFETENSORS_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


# -- merge -----------------------------------------------------------------------------------------
def merge_registered(registry, ref: str, *, reuse: bool = False):
    """Merge a registered LoRA model (or a run's model) into its base and register the merged model.

    Returns (merged manifest, adapter model manifest, export info). ``reuse``: an earlier merge of
    the same adapter is returned instead of merging again (DPO starting from an SFT run does this).
    """
    import tempfile

    m = registry.get(ref)
    if m.kind == "run":
        found = [x for x in registry.list("model", m.task) if x.inputs.get("run") == m.id]
        if not found:
            raise ValueError(f"{ref}: run {m.id} registered no model")
        m = found[-1]
    elif m.kind != "model":
        raise ValueError(f"{ref}: is a {m.kind}; give a run or a model")
    if m.metadata.get("method") == "full" or "adapter_config.json" not in m.files:
        raise ValueError(f"{m.id}: has no LoRA adapter to merge (it is a full model already)")
    if reuse:
        done = [x for x in registry.list("model", m.task) if x.inputs.get("merged_from") == m.id]
        if done:
            return done[-1], m, {"parameters": done[-1].metadata.get("parameters"), "reused": True}
    with tempfile.TemporaryDirectory(prefix="crucible-merge-") as tmp:
        info = export(m.id, tmp, fmt="safetensors", registry=registry)
        merged = registry.add_directory("model", m.task, tmp, inputs={"merged_from": m.id, "run": m.inputs.get("run"),
                                                                      "dataset": m.inputs.get("dataset"),
                                                                      "base_model": m.inputs.get("base_model")},
                                        metadata={**{k: v for k, v in m.metadata.items() if k != "method"},
                                                  "method": "merged-lora", "parameters": info["parameters"]})
    return merged, m, info


# -- export ----------------------------------------------------------------------------------------
def export(ref: str, out: str | Path, *, fmt: str, quant: str | None = None, registry=None,
           name: str | None = None, log: Callable[[str], None] = lambda msg: None,
           card: bool = False) -> dict[str, Any]:
    """Write ``ref`` (folder, registry id, TASK@ALIAS; full model or LoRA adapter) to ``out``.

    ``gguf``: ``out/<name>.gguf`` (quant f16 by default, f32 or q8_0) and ``out/Modelfile``.
    ``safetensors``: a transformers folder (weights in the source dtype by default, or f32/f16/bf16),
    tokenizer with its chat template, generation config and ``crucible.json`` (system prompt, decoding guide).
    ``card``: a registry model also gets its ``MODEL_CARD.md`` and ``model_card.json`` beside the weights.
    """
    from pipelines.engines.loading import load_for_inference, resolve_model

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    allowed = GGUF_QUANTS if fmt == "gguf" else tuple(SAFETENSORS_DTYPES)
    if quant is not None and quant not in allowed:
        raise ValueError(f"--quant {quant!r}: {fmt} export takes one of {', '.join(allowed)}")
    resolved = resolve_model(ref, registry)
    if fmt == "gguf":
        _check_gguf_arch(resolved, ref)  # before loading weights: a wrong architecture fails fast
    name = name or _default_name(ref, resolved)
    start = time.perf_counter()
    log(f"loading {ref}" + (" and merging its LoRA adapter" if resolved.adapter else ""))
    # float32 on CPU: merging and quantising from full precision loses nothing extra
    model, tokenizer, resolved = load_for_inference(resolved, registry, dtype="float32", device="cpu",
                                                    merge_adapter=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"source": ref, "registry_id": resolved.ref, "adapter_merged": resolved.adapter,
                            "format": fmt, "out": str(out), "name": name,
                            "model_type": model.config.model_type,
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "system_prompt": resolved.system_prompt}
    if fmt == "gguf":
        quant = quant or "f16"
        path = out / f"{name}.gguf"
        log(f"writing {path} ({quant})")
        info.update(write_gguf(model, tokenizer, path, quant=quant, name=name,
                               pre=_gguf_pre_tokenizer(resolved, tokenizer)))
        mf = modelfile(tokenizer, path.name, system_prompt=resolved.system_prompt,
                       stops=stop_tokens(model, tokenizer))
        (out / "Modelfile").write_text(mf["text"])
        info.update(gguf=str(path), modelfile=str(out / "Modelfile"), quant=quant, size=path.stat().st_size,
                    template=mf["template"], stop=mf["stop"], default_system_prompt=mf["default_system_prompt"])
    else:
        info.update(_write_safetensors(model, tokenizer, resolved, out, quant, ref))
    if card and resolved.ref:  # a folder outside the registry has no manifests to build a card from
        from pipelines.card import write as write_card

        info["card"] = write_card(registry, resolved.ref, out)["files"]
    info["seconds"] = round(time.perf_counter() - start, 2)
    return info


def _default_name(ref: str, resolved) -> str:
    if resolved.ref:
        return resolved.ref
    return Path(str(ref)).expanduser().resolve().name or "model"


def _check_gguf_arch(resolved, ref: str) -> None:
    from transformers import AutoConfig

    src = resolved.weights_path
    kw = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    model_type = AutoConfig.from_pretrained(src, **kw).model_type
    if model_type != "llama":
        raise ValueError(f"{ref}: GGUF export supports the llama architecture only, and this model is "
                         f"{model_type!r} (export it with --format safetensors instead)")


def _write_safetensors(model, tokenizer, resolved, out: Path, quant: str | None, ref: str) -> dict[str, Any]:
    import torch

    if resolved.gguf_file:
        from pipelines.modeling import plain_copy

        model = plain_copy(model)
    if quant:
        model = model.to(getattr(torch, SAFETENSORS_DTYPES[quant]))
    model.save_pretrained(str(out), safe_serialization=True)  # also writes generation_config.json
    tokenizer.save_pretrained(str(out))  # with the chat template (chat_template.jinja)
    (out / "crucible.json").write_text(json.dumps({
        "system_prompt": resolved.system_prompt, "guide": resolved.guide, "exported_from": ref,
        "registry_id": resolved.ref, "adapter_merged": resolved.adapter, "base_model": resolved.base_path}, indent=1))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "size": size,
            "files": sorted(p.name for p in out.iterdir())}


# -- GGUF ------------------------------------------------------------------------------------------
def _permute(w, n_head: int):
    """llama.cpp's rotary layout for q/k rows (``LlamaModel.permute`` in convert_hf_to_gguf.py):
    HF keeps each head's two rotary halves apart, llama.cpp interleaves them."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path: str | Path, *, quant: str = "f16", name: str = "model",
               pre: str = "gpt-2") -> dict[str, Any]:
    """Write a llama model and its tokenizer as one GGUF file; returns counts per tensor type."""
    import gguf
    import numpy as np

    cfg = model.config
    if cfg.model_type != "llama":
        raise ValueError(f"GGUF export supports the llama architecture only, not {cfg.model_type!r}")
    if quant not in GGUF_QUANTS:
        raise ValueError(f"quant {quant!r}: choose one of {', '.join(GGUF_QUANTS)}")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r}: GGUF export handles plain RoPE only")
    n_head = cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    emb = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == emb.data_ptr()
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]

    arch = gguf.MODEL_ARCH.LLAMA
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(emb.shape[0])
    w.add_rope_dimension_count(head_dim)
    if head_dim * n_head != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    _add_tokenizer(w, tokenizer, emb.shape[0], pre)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # no output.weight: llama.cpp and transformers then tie it to token_embd
        stem, _, suffix = hf_name.rpartition(".")
        g = names.get_name(stem)
        if g is None:
            raise ValueError(f"{hf_name}: a weight with no llama GGUF name; this model is not a plain llama")
        data = tensor.detach().float().cpu().numpy()
        if stem.endswith("self_attn.q_proj"):
            data = _permute(data, n_head)
        elif stem.endswith("self_attn.k_proj"):
            data = _permute(data, n_kv)
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim > 1 and quant != "f32":  # norms and biases stay f32, as llama.cpp keeps them
            qtype = gguf.GGMLQuantizationType.F16
            if quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
                qtype = gguf.GGMLQuantizationType.Q8_0  # rows not a multiple of the 32-wide block stay f16
        packed = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        w.add_tensor(f"{g}.{suffix}", packed, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensor_types": counts, "tied_embeddings": tied}


def _add_tokenizer(w, tokenizer, n_vocab: int, pre: str) -> None:
    """A byte-level BPE tokenizer under llama.cpp's keys (``tokenizer.ggml.model = gpt2``)."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(f"GGUF export supports byte-level BPE (GPT-2 style) tokenizers only; this one is "
                         f"{model.get('type')!r} with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')!r}")
    if len(tokenizer) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the embeddings only {n_vocab} rows")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{key}_token_id")
        if token_id is not None:
            add(token_id)
    # whether the tokenizer itself adds BOS/EOS around text (GPT-2 style ones add neither)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    w.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
                        and probe != tokenizer("a", add_special_tokens=False)["input_ids"])
    w.add_add_eos_token(len(probe) > 1 and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def _gguf_pre_tokenizer(resolved, tokenizer) -> str:
    """llama.cpp's name for how text is split before BPE (``tokenizer.ggml.pre``): the source GGUF's
    own when the model came from one, else recognised from the tokenizer's pre-tokenizer."""
    if resolved.gguf_file:
        import gguf

        folder = Path(resolved.weights_path)
        field = gguf.GGUFReader(str(folder / resolved.gguf_file)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"  # SmolLM / StarCoder: single digits, then GPT-2 splitting
    return "default"


# -- Modelfile -------------------------------------------------------------------------------------
# Ollama templates (Go text/template over .Messages) equivalent to the built-in Jinja templates;
# ``EOS`` is replaced by the tokenizer's EOS string.
GO_TEMPLATES = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"),
    "simple": ('{{- range .Messages }}{{ if eq .Role "assistant" }}Assistant: {{ .Content }}EOS\n'
               '{{ else if eq .Role "system" }}System: {{ .Content }}\n'
               '{{ else if eq .Role "tool" }}Tool: {{ .Content }}\n'
               "{{ else }}User: {{ .Content }}\n{{ end }}{{ end }}Assistant: "),
    "alpaca": ('{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
               '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
               '{{ else if eq .Role "tool" }}### Input:\n{{ .Content }}\n\n'
               "{{ else }}### Response:\n{{ .Content }}EOS\n\n{{ end }}{{ end }}### Response:\n"),
}

_PROBES = ([{"role": "user", "content": "Hi"}],
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye\nnow"}])
_MARK = "\x00SYSTEM\x00"


def match_builtin_template(tokenizer) -> tuple[str | None, str | None]:
    """(built-in template name, default system prompt) when the tokenizer's chat template renders
    like one of ours, else (None, None). A template that injects its own system message when a chat
    has none (SmolLM2's) matches, and that message becomes the default system prompt."""
    def r(msgs, tpl=None):
        return tokenizer.apply_chat_template(msgs, chat_template=tpl, tokenize=False, add_generation_prompt=True)

    system = {"role": "system", "content": "Be brief."}
    for name, tpl in BUILTIN.items():
        if any(r([system, *c]) != r([system, *c], tpl) for c in _PROBES):
            continue
        defaults = set()
        for c in _PROBES:
            own = r(c)
            if own == r(c, tpl):
                defaults.add(None)
                continue
            a, _, b = r([{"role": "system", "content": _MARK}, *c], tpl).partition(_MARK)
            if not (own.startswith(a) and own.endswith(b) and len(own) >= len(a) + len(b)):
                break
            defaults.add(own[len(a):len(own) - len(b)])
        else:
            if len(defaults) == 1:
                return name, defaults.pop()
    return None, None


def stop_tokens(model, tokenizer) -> list[str]:
    """The strings generation stops at: the tokenizer's EOS and the generation config's EOS ids
    (the set the HF engine stops on)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen is not None:
        ids |= set(gen if isinstance(gen, list) else [gen])
    return [tokenizer.convert_ids_to_tokens(i) for i in sorted(ids)]


def _quoted(value: str, what: str) -> str:
    if '"""' in value:
        raise ValueError(f'{what} contains """, which a Modelfile cannot quote: {value[:60]!r}')
    return f'"""{value}"""'


def modelfile(tokenizer, gguf_name: str, *, system_prompt: str | None, stops: list[str]) -> dict[str, Any]:
    """An Ollama Modelfile: FROM the GGUF, the chat template in Go syntax, SYSTEM, stop parameters."""
    template, default_system = match_builtin_template(tokenizer)
    system = system_prompt or default_system
    stops = list(stops)
    if template == "chatml" and CHATML_TOKENS[0] not in stops:
        stops.append(CHATML_TOKENS[0])  # a model that opens a new turn has finished its own
    lines = [f"# written by crucible export; chat template: {template or 'not translatable'}",
             f"FROM ./{gguf_name}"]
    if template:
        lines.append(f"TEMPLATE {_quoted(GO_TEMPLATES[template].replace('EOS', tokenizer.eos_token), 'template')}")
    else:  # Ollama falls back to the GGUF's tokenizer.chat_template for templates it knows
        lines.append("# no TEMPLATE: the chat template is none of chatml, simple, alpaca")
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'the system prompt')}")
    for s in stops:
        lines.append('PARAMETER stop "{}"'.format(s.replace("\\", "\\\\").replace('"', '\\"')))
    return {"text": "\n".join(lines) + "\n", "template": template, "default_system_prompt": default_system,
            "stop": stops}


# -- chat ------------------------------------------------------------------------------------------
class ChatSession:
    """A conversation with one model: the saved template and system prompt, streamed replies, and
    the KV cache kept across turns.

    Each turn renders the whole chat with the template (so the prompt is exactly what eval and
    serving would send), then reuses the cache for the longest token prefix it shares with what
    the cache holds: normally everything up to the new user message. Where re-tokenising the
    last reply differs from the generated tokens, the cache is cut back to the shared prefix.
    """

    def __init__(self, model, tokenizer, *, system_prompt: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.eos_ids = sorted(tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(model, tokenizer))
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.cache = None
        self.cached_ids: list[int] = []  # the tokens whose keys/values the cache holds
        self.reused_tokens = 0  # prompt tokens the last turn took from the cache

    def send(self, text: str, on_text: Callable[[str], None] = lambda s: None) -> str:
        """Add a user message, generate the reply (streamed to ``on_text``), keep it; return it."""
        import torch
        from transformers import DynamicCache

        self.messages.append({"role": "user", "content": text})
        prompt = render(self.tokenizer, with_system_prompt(self.messages, self.system_prompt),
                        add_generation_prompt=True)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep = 0
        while keep < min(len(ids) - 1, len(self.cached_ids)) and ids[keep] == self.cached_ids[keep]:
            keep += 1  # at least the last prompt token is always fed, to get its logits
        if self.cache is not None and 0 < keep < self.cache.get_seq_length():
            try:
                self.cache.crop(keep - self.cache.get_seq_length())  # a negative count: tokens to drop
            except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window
                keep = 0
        if self.cache is None or keep == 0:
            self.cache = DynamicCache(config=self.model.config)
        self.reused_tokens = keep
        kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_ids or None,
                                  pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      past_key_values=self.cache, streamer=_TextStream(self.tokenizer, on_text,
                                                                                       set(self.eos_ids)), **kw)
        new = out[0, len(ids):].tolist()
        n = next((j for j, t in enumerate(new) if t in self.eos_ids), len(new))
        reply = self.tokenizer.decode(new[:n], skip_special_tokens=True)
        self.cached_ids = (ids + new)[: self.cache.get_seq_length()]
        self.messages.append({"role": "assistant", "content": reply})
        return reply


class _TextStream:
    """A transformers streamer that hands out the reply's text as tokens arrive.

    It decodes the whole reply so far each step and emits what is new, holding back a trailing
    partial UTF-8 character (decoded as U+FFFD), so the pieces add up to the final decoded text.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], eos_ids: set[int]):
        self.tokenizer, self.on_text, self.eos_ids = tokenizer, on_text, eos_ids
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False
        self.done = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            if self.done or t in self.eos_ids:
                self.done = True
                return
            self.ids.append(t)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text
