"""The model to train: the base (folder, hub name, registry ref or GGUF), its template, LoRA/full."""

from __future__ import annotations

from typing import Any


def check_method(train) -> None:
    """Refuse what cannot run here before any work starts (no Ray, no model load)."""
    import torch

    if train.method == "qlora":
        if not train.use_gpu:
            raise ValueError("train.method: 'qlora' quantises the base to 4 bits with bitsandbytes, which needs a "
                             "GPU; set train.use_gpu: true, or use method 'lora' on CPU")
        if not torch.cuda.is_available():
            raise ValueError("train.method: 'qlora' needs a CUDA GPU and none is visible on this machine")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("train.method: 'qlora' needs the bitsandbytes package (pip install bitsandbytes)") from None
    if train.deepspeed and train.deepspeed.precision == "fp16" and not train.use_gpu:
        raise ValueError("train.deepspeed.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")


def torch_dtype(name: str, use_gpu: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32  # bf16 matmuls are slow on most CPUs
    return getattr(torch, name)


def load_tokenizer_for(spec, registry=None):
    """(tokenizer with the training template on it, template facts, resolved base) — no weights loaded."""
    from transformers import AutoTokenizer

    from pipelines.engines.loading import _has_tokenizer, resolve_model
    from pipelines.modeling import load_tokenizer
    from pipelines.templates import select_template

    m = spec.model
    resolved = resolve_model(m.base, registry, gguf_file=m.gguf_file)
    if resolved.adapter:
        raise ValueError(f"model.base: {m.base} is a LoRA adapter; merge it first (crucible merge) or name its base")
    if resolved.gguf_file and not _has_tokenizer(resolved.path):
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), gguf_file=resolved.gguf_file)
    else:
        tokenizer = load_tokenizer(str(resolved.path), trust_remote_code=m.trust_remote_code, revision=m.revision)
    return tokenizer, select_template(tokenizer, m.template), resolved


def load_base(spec, registry=None) -> tuple[Any, Any, dict]:
    """(model, tokenizer, facts). The tokenizer carries the training template (saved with the model)."""
    from transformers import AutoModelForCausalLM

    m, t = spec.model, spec.train
    tokenizer, template, resolved = load_tokenizer_for(spec, registry)
    source = str(resolved.path)
    kw: dict[str, Any] = {"dtype": torch_dtype(m.dtype, t.use_gpu), "trust_remote_code": m.trust_remote_code}
    if m.revision:
        kw["revision"] = m.revision
    if resolved.gguf_file:
        kw["gguf_file"] = resolved.gguf_file
    elif not resolved.info.get("hub"):
        kw["use_safetensors"] = True
    if t.method == "qlora":
        import torch
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(source, **kw)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, {"base_path": source, "gguf_file": resolved.gguf_file, "base_ref": resolved.ref,
                              "eos_id": eos_id, **template}


def apply_method(model, train, *, resized_vocab: bool = False):
    """LoRA/QLoRA adapters through PEFT, or the full model; returns the model to train."""
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if train.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
    targets, layers = train.lora.target_modules, None
    if train.lora.last_layers:
        targets, layers = last_layer_targets(model, train.lora)
    cfg = LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
                     target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM",
                     # new chat tokens need trained embeddings, or the model can never emit them
                     modules_to_save=["embed_tokens", "lm_head"] if resized_vocab else None)
    model = get_peft_model(model, cfg)
    if train.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def last_layer_targets(model, lora) -> tuple[list[str], list[int]]:
    """(target module names, layer indices) for ``train.lora.last_layers``. PEFT takes a layer list
    only with named targets, so ``all-linear`` becomes the names of the decoder layers' linears."""
    import torch

    blocks = decoder_layers(model)
    if not blocks:
        raise ValueError(f"train.lora.last_layers: cannot find the decoder layers of {type(model).__name__}")
    n = len(blocks)
    if lora.last_layers > n:
        raise ValueError(f"train.lora.last_layers: {lora.last_layers} is more than the model's {n} layers")
    targets = lora.target_modules
    if targets == "all-linear":
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in blocks[0].named_modules()
                          if isinstance(m, torch.nn.Linear)})
    return targets, list(range(n - lora.last_layers, n))


def decoder_layers(model) -> list:
    """The decoder's blocks (``layers``, or GPT-2's ``h``); empty for a model whose blocks we do not know."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return list(getattr(decoder, "layers", None) or getattr(decoder, "h", None) or [])


def trainable_parameters(model) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
