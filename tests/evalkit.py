"""Builders shared by the engine and eval tests: a model with varied outputs, a LoRA adapter."""

from __future__ import annotations

import shutil
from pathlib import Path


def lively_model(tiny_model: Path, out: Path, std: float = 0.6, seed: int = 1) -> Path:
    """The tiny model with larger random weights, so greedy outputs vary from prompt to prompt
    (the default init mostly repeats one token, which would make equality tests too easy)."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    model.save_pretrained(out)
    return out


def lora_adapter(base: Path, out: Path, seed: int = 2) -> Path:
    """A PEFT LoRA adapter with random (non-zero) weights on ``base``, saved with base's tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipelines.modeling import load_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return out


def chats(n: int) -> list[list[dict]]:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]
    return [[{"role": "user", "content": " ".join(words[(i + k) % len(words)] for k in range(1 + i % 7))}]
            for i in range(n)]
