"""Loading tokenizers and models, and building tiny random models for tests.

Nothing here downloads by itself when given a local folder; a hub name goes through the normal
transformers loading path (for users with a network). ``trust_remote_code`` stays off unless the
spec turns it on, and weights are written as safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.templates import CHATML, CHATML_TOKENS

ARCHS = ("llama", "qwen2", "mistral")


def load_tokenizer(source: str | Path, *, trust_remote_code: bool = False, revision: str | None = None):
    """A fast tokenizer from a folder or hub name; a bare ``vocab.json`` + ``merges.txt`` folder
    (GPT-2 style, no tokenizer_config) is read as a GPT-2 BPE tokenizer."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    folder = Path(source)
    if folder.is_dir() and not (folder / "tokenizer_config.json").exists() and (folder / "vocab.json").exists():
        return GPT2TokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code, revision=revision)


def ensure_chat_tokens(tokenizer) -> None:
    """Give a template-less tokenizer ChatML: its two special tokens, the template, EOS and pad."""
    if tokenizer.chat_template:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = CHATML_TOKENS[1]
    tokenizer.pad_token = CHATML_TOKENS[1]  # pad == eos: the loss mask, not the pad id, decides what is learned


def init_model(out: str | Path, *, tokenizer: str | Path, arch: str = "llama", layers: int = 2,
               hidden: int = 64, heads: int = 4, kv_heads: int | None = None, intermediate: int | None = None,
               max_positions: int = 2048, seed: int = 0) -> dict[str, Any]:
    """Write a randomly initialised causal LM, its tokenizer and a chat template to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    tok = load_tokenizer(tokenizer)
    ensure_chat_tokens(tok)
    eos_id = tok.convert_tokens_to_ids(tok.eos_token)
    config = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else eos_id,
        eos_token_id=eos_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=config.bos_token_id, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"path": str(out), "arch": arch, "parameters": params, "vocab_size": len(tok),
            "layers": layers, "hidden": hidden, "files": sorted(p.name for p in out.iterdir())}


def safetensors_parameter_count(folder: str | Path) -> int:
    """Parameters in a folder's safetensors files, read from their headers (no weights loaded)."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
    return total


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def describe_model_folder(folder: str | Path) -> dict[str, Any]:
    """Facts about a model folder, refusing anything that is not safetensors-only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    pickles = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder}: pickle-format file(s) {', '.join(pickles)}; only safetensors weights are "
                         "accepted (convert with `safetensors.torch.save_file`)")
    adapter = (folder / "adapter_config.json").exists()
    if not adapter and not (folder / "config.json").exists():
        raise ValueError(f"{folder}: no config.json (nor adapter_config.json): not a transformers model folder")
    if not list(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no *.safetensors weights")
    config = json.loads((folder / ("adapter_config.json" if adapter else "config.json")).read_text())
    tok_cfg = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").exists() or (
        tok_cfg.exists() and bool(json.loads(tok_cfg.read_text()).get("chat_template")))
    return {
        "model_type": "lora-adapter" if adapter else config.get("model_type", "unknown"),
        "architectures": config.get("architectures", []),
        "parameters": safetensors_parameter_count(folder),
        "adapter": adapter,
        "base_model": config.get("base_model_name_or_path") if adapter else None,
        "has_tokenizer": (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists(),
        "has_chat_template": has_template,
    }


def plain_copy(model):
    """The same weights in a fresh fp32 model: transformers refuses ``save_pretrained`` on a model
    loaded from GGUF (its config carries the GGUF quantization marker)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain


def convert_gguf(folder: str | Path, gguf_file: str, out: str | Path) -> dict[str, Any]:
    """Dequantise a GGUF checkpoint once into a safetensors model folder (fp32) with its tokenizer.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF, so the weights are
    copied into a fresh model built from the same config, which saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, out = Path(folder), Path(out)
    if not (folder / gguf_file).is_file():
        raise FileNotFoundError(f"{folder / gguf_file}: no such GGUF file")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    model = plain_copy(loaded)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"path": str(out), "model_type": model.config.model_type, "gguf_file": gguf_file,
            "parameters": sum(p.numel() for p in model.parameters())}
