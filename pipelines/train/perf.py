"""What the node can do and how much of it training uses: a matmul probe, precision choice, MFU.

The probe times square matmuls for a fraction of a second per dtype and caches the result under
``$CRUCIBLE_CACHE/peak-flops.json``, keyed by device, CPU model, thread count and torch version,
so a node measures once. ``train.precision: auto`` picks bf16 when the probe says bf16 matmuls are
clearly faster than fp32 (CPUs with AVX512-BF16/AMX, GPUs) and fp32 where bf16 is emulated and slow
(AVX2-only CPUs run bf16 matmuls tens of times slower than fp32).

MFU follows nanoGPT/PaLM: model FLOPs per token ÷ measured peak. We count the FLOPs the step
really needs: forward 2·N per token through the body, backward 2·N_bp for the activation gradients
(N_bp: the body from the lowest layer with a trainable parameter up; all of it but under
``lora.last_layers``) plus 2·N_trainable for the weight gradients, attention scores 4·L·d·T
forward and 8·L_bp·d·T backward, and the LM head only at the positions that have a label (that is
all we compute it for).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

BF16_MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this much to be worth its rounding


def _cache_file() -> Path:
    return Path(os.environ.get("CRUCIBLE_CACHE") or ".cache/crucible").resolve() / "peak-flops.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe_key(device: str, dtype: str) -> str:
    import torch

    where = torch.cuda.get_device_name() if device == "cuda" else f"{_cpu_name()} x{torch.get_num_threads()}"
    return f"{device}|{where}|{dtype}|torch {torch.__version__}"


def measure_matmul_flops(dtype: str, device: str = "cpu", *, seconds: float = 0.25) -> float:
    """Sustained FLOP/s of square matmuls in ``dtype`` on ``device`` (best timed round). The size
    grows from 256 until one matmul takes ~20 ms, so an emulated (slow) dtype stays quick to probe."""
    import torch

    dt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = 1024 if device == "cuda" else 256
    while True:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        a @ b  # warm-up: kernels chosen, pages touched
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        if time.perf_counter() - start > 0.02 or n >= (8192 if device == "cuda" else 2048):
            break
        n *= 2
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            return best


def peak_flops(dtype: str, device: str = "cpu", *, cache: bool = True) -> float:
    """The node's measured peak for ``dtype`` matmuls, probed once and cached per node.

    ``cache=False`` probes now (a benchmark's own run) and returns that; it still raises the cached
    figure when the new probe is higher, so a first probe taken while the node was busy (which would
    understate every later MFU) is mended by the next fresh one."""
    key = _probe_key(device, dtype)
    path = _cache_file()
    table: dict = {}
    if path.exists():
        try:
            table = json.loads(path.read_text())
        except ValueError:
            table = {}  # a torn write from a concurrent probe: measure again
    if cache and key in table:
        return float(table[key])
    value = measure_matmul_flops(dtype, device)
    if value > float(table.get(key, 0.0)):
        table[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    return value


def choose_precision(setting: str, use_gpu: bool) -> tuple[str, dict]:
    """(``bf16`` or ``fp32``, the probe figures behind the choice) for ``train.precision``."""
    device = "cuda" if use_gpu else "cpu"
    if setting != "auto":
        return setting, {"peak_flops": peak_flops(setting, device)}
    if use_gpu:
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16", {"peak_flops": peak_flops("bf16", device)}
        return "fp32", {"peak_flops": peak_flops("fp32", device)}
    fp32, bf16 = peak_flops("fp32", device), peak_flops("bf16", device)
    chosen = "bf16" if bf16 >= BF16_MIN_SPEEDUP * fp32 else "fp32"
    return chosen, {"peak_flops": bf16 if chosen == "bf16" else fp32, "peak_flops_fp32": fp32,
                    "peak_flops_bf16": bf16}


def autocast(precision: str, device):
    """The context a forward runs under: bf16 autocast (fp32 weights stay the master copy) or nothing."""
    import contextlib

    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def model_shape(model) -> dict:
    """Parameter counts and sizes MFU needs: body (without embeddings and LM head), trainable, head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    emb = base.get_input_embeddings()
    skip = {id(p) for m in (head, emb) if m is not None for p in m.parameters()}
    body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip)
    cfg = base.config
    cfg = getattr(cfg, "text_config", None) or cfg
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    head_trainable = head is not None and any(p.requires_grad for p in head.parameters())
    # backward runs down to the lowest layer that trains (autograd records nothing below it)
    from pipelines.train.model import decoder_layers

    blocks = decoder_layers(base)
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    emb_trainable = emb is not None and any(p.requires_grad for p in emb.parameters())
    first = 0 if emb_trainable or not any(trains) else trains.index(True)
    below = sum(p.numel() for b in blocks[:first] for p in b.parameters())
    return {"body_params": body, "trainable_body_params": trainable, "layers": layers, "hidden": hidden,
            "vocab": head.weight.shape[0] if head is not None else 0, "head_trainable": head_trainable,
            "backprop_body_params": body - below, "backprop_layers": layers - first}


def step_flops(shape: dict, *, tokens: int, label_tokens: int, attn_pairs: int) -> float:
    """Model FLOPs of one training step: ``tokens`` real positions through the body,
    ``label_tokens`` of them through the LM head, ``attn_pairs`` (query, key) pairs a causal
    mask allows (sum over examples of n(n+1)/2)."""
    n, nt = shape["body_params"], shape["trainable_body_params"]
    n_bp, layers_bp = shape.get("backprop_body_params", n), shape.get("backprop_layers", shape["layers"])
    body = (2 * n + 2 * n_bp + 2 * nt) * tokens
    attention = (4 * shape["layers"] + 8 * layers_bp) * shape["hidden"] * attn_pairs
    head = (6 if shape["head_trainable"] else 4) * shape["vocab"] * shape["hidden"] * label_tokens
    return float(body + attention + head)
