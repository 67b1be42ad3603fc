"""Finding and loading a model for inference: a folder, a LoRA adapter folder, or a registry ref.

A model artifact from training is either a full model folder (config.json + safetensors) or a
PEFT adapter folder (adapter_config.json + adapter_model.safetensors) whose base is named by the
adapter config's ``base_model_name_or_path`` or by the manifest's ``inputs.base_model`` (a path, a
hub name, or another registry ref). Either way the folder carries the tokenizer and chat template
it was trained with, and eval and serving use exactly that template.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ResolvedModel:
    """Where a model's files are, locally, and what it is."""

    path: Path  # the folder named (adapter or full model)
    base_path: str | None = None  # the base folder / hub name, for adapters only
    adapter: bool = False
    ref: str | None = None  # the registry id, when it came from the registry
    system_prompt: str | None = None  # the model's saved default system prompt, if any
    guide: str | None = None  # the contract it was trained for, when its spec constrains decoding
    gguf_file: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_path(self) -> str:
        """The full model's weights: the base's folder / hub name for an adapter, else the folder named."""
        return str(self.base_path) if self.adapter else str(self.path)

    @property
    def lora_rank(self) -> int | None:
        """An adapter's LoRA rank (``r`` in its adapter_config.json); None for a full model."""
        if not self.adapter:
            return None
        return int(json.loads((self.path / "adapter_config.json").read_text()).get("r", 16))

    @property
    def tokenizer_path(self) -> str:
        """The adapter folder's own tokenizer (its saved template) when it has one, else the base's."""
        if not self.adapter or _has_tokenizer(self.path):
            return str(self.path)
        return str(self.base_path)


def is_registry_ref(ref: str) -> bool:
    from infra.registry import parse_id

    ref = str(ref)
    if Path(ref).expanduser().exists():
        return False
    return bool(parse_id(ref)) or ("@" in ref and "/" not in ref and "://" not in ref)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()


def _saved(folder: Path, key: str, manifest=None) -> str | None:
    """A default saved with a model (``system_prompt``, ``guide``): ``crucible.json`` in the folder,
    or the manifest's metadata/inputs, in that order."""
    meta = folder / "crucible.json"
    if meta.exists():
        value = json.loads(meta.read_text()).get(key)
        if value:
            return value
    if manifest is not None:
        for section in (manifest.metadata, manifest.inputs):
            if section.get(key):
                return section[key]
    return None


def resolve_model(ref: str | os.PathLike, registry=None, *, gguf_file: str | None = None) -> ResolvedModel:
    """A local folder for ``ref`` (a path, a hub name, or a registry id / TASK@ALIAS), with its base."""
    ref = str(ref)
    manifest = None
    if is_registry_ref(ref):
        if registry is None:
            from infra.registry import Registry

            registry = Registry.open()
        manifest = registry.get(ref)
        folder = registry.materialize(manifest.id)
    else:
        folder = Path(ref).expanduser()
        if not folder.exists():  # a hub name: transformers resolves it (needs a network)
            return ResolvedModel(path=Path(ref), gguf_file=gguf_file, info={"hub": True})
    if not folder.is_dir():
        raise FileNotFoundError(f"{ref}: not a model folder")
    adapter = (folder / "adapter_config.json").exists()
    base = None
    if adapter:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        named = (manifest.inputs.get("base_model") if manifest else None) or cfg.get("base_model_name_or_path")
        if not named:
            raise ValueError(f"{folder}: a LoRA adapter that names no base model "
                             "(adapter_config.json base_model_name_or_path, or the manifest's inputs.base_model)")
        base_resolved = resolve_model(named, registry, gguf_file=gguf_file)
        if base_resolved.adapter:
            raise ValueError(f"{ref}: its base {named} is itself an adapter; merge it first")
        base = str(base_resolved.path)
        gguf_file = gguf_file or base_resolved.gguf_file
    elif not (folder / "config.json").exists() and not gguf_file:
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
        else:
            raise ValueError(f"{folder}: no config.json, adapter_config.json or single .gguf file: not a model folder")
    if not gguf_file:  # refuse pickle weights before anything loads them
        from pipelines.modeling import PICKLE_SUFFIXES

        bad = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if bad:
            raise ValueError(f"{folder}: pickle-format weights {', '.join(sorted(bad))}; only safetensors are loaded")
    return ResolvedModel(path=folder, base_path=base, adapter=adapter, ref=manifest.id if manifest else None,
                         system_prompt=_saved(folder, "system_prompt", manifest), guide=_saved(folder, "guide"),
                         gguf_file=gguf_file)


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_for_inference(ref: str | os.PathLike | ResolvedModel, registry=None, *, dtype: str = "auto",
                       device: str | None = None, gguf_file: str | None = None, trust_remote_code: bool = False,
                       merge_adapter: bool = False):
    """(model, tokenizer, resolved): a causal LM in eval mode with its saved tokenizer and template.

    Handles a plain model folder, a PEFT adapter folder (base loaded, then ``PeftModel``), a
    registry ref (materialized and verified first), and a GGUF base (``gguf_file``). On CPU,
    ``dtype: auto`` means float32 (bf16 matmuls are slow on most CPUs).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.modeling import load_tokenizer

    resolved = ref if isinstance(ref, ResolvedModel) else resolve_model(ref, registry, gguf_file=gguf_file)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif dtype in _DTYPES:
        torch_dtype = getattr(torch, _DTYPES[dtype])
    else:
        raise ValueError(f"dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    base = resolved.weights_path
    kw: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kw["gguf_file"] = resolved.gguf_file
    else:
        kw["use_safetensors"] = True
    model = AutoModelForCausalLM.from_pretrained(base, **kw)
    tok_source = resolved.tokenizer_path
    if resolved.gguf_file and tok_source == base and not _has_tokenizer(Path(base)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base, gguf_file=resolved.gguf_file)
    else:
        tokenizer = load_tokenizer(tok_source, trust_remote_code=trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # the adapter's tokenizer added chat tokens
    if resolved.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resolved.path))
        if merge_adapter:
            model = model.merge_and_unload()
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, resolved
