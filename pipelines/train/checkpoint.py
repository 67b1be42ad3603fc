"""Our checkpoint format: safetensors + JSON, the same for DDP and every ZeRO stage.

    trainable.safetensors   the trained parameters (LoRA weights, or every weight for full)
    optimizer.safetensors   AdamW moments per trainable parameter (plain torch optimizer only)
    state.json              step, loss history, early-stopping state, token counts
    model/                  (final checkpoint only) the folder registered as the model artifact

No pickle anywhere: a checkpoint from an untrusted store cannot run code when loaded.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


@contextlib.contextmanager
def gathered(params, zero_stage: int | None):
    """Under ZeRO-3 each rank holds a slice of every parameter; gather full tensors to read them."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def trainable_state(named_params, zero_stage: int | None) -> dict:
    """CPU copies of the trainable parameters (every rank must call this under ZeRO-3)."""
    named_params = list(named_params)
    with gathered([p for _, p in named_params], zero_stage):
        return {n: p.detach().to("cpu").clone().contiguous() for n, p in named_params}


def save(folder: Path, tensors: dict, optimizer_tensors: dict | None, state: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "trainable.safetensors"))
    if optimizer_tensors:
        save_file(optimizer_tensors, str(folder / "optimizer.safetensors"))
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def load(folder: Path) -> tuple[dict, dict | None, dict]:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "state.json").exists() or not (folder / "trainable.safetensors").exists():
        raise ValueError(f"{folder}: not a complete crucible checkpoint (needs state.json and trainable.safetensors)")
    opt = folder / "optimizer.safetensors"
    return (load_file(str(folder / "trainable.safetensors")), load_file(str(opt)) if opt.exists() else None,
            json.loads((folder / "state.json").read_text()))


def restore_parameters(named_params, tensors: dict) -> None:
    import torch

    named = dict(named_params)
    missing = sorted(set(named) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint does not match the model: {len(missing)} trainable parameter(s) missing, "
                         f"e.g. {missing[0]} (was it trained with another method or LoRA config?)")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[n].to(p.dtype))


def optimizer_tensors(optimizer, params) -> dict:
    """AdamW state as flat tensors keyed by the parameter's position."""
    out = {}
    for i, p in enumerate(params):
        for k, v in optimizer.state.get(p, {}).items():
            out[f"{i}.{k}"] = (v if hasattr(v, "detach") else __import__("torch").tensor(v)).detach().cpu().contiguous()
    return out


def restore_optimizer(optimizer, params, tensors: dict) -> None:
    by_index: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        by_index.setdefault(int(i), {})[name] = v
    for i, p in enumerate(params):
        if i in by_index:
            optimizer.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in by_index[i].items()}


def _zero_inner(ds_optimizer):
    """The torch optimizer inside DeepSpeed's ZeRO wrapper: its params are this rank's fp32
    master partitions (one flat tensor per group), its state the Adam moments for them."""
    return getattr(ds_optimizer, "optimizer", ds_optimizer)


def zero_shard_name(rank: int) -> str:
    return f"zero-optimizer-rank{rank}.safetensors"


def zero_optimizer_tensors(ds_optimizer) -> dict:
    """This rank's ZeRO partition: fp32 master weights and Adam moments, as flat tensors."""
    import torch

    out = {}
    for gi, group in enumerate(_zero_inner(ds_optimizer).param_groups):
        for pi, p in enumerate(group["params"]):
            out[f"{gi}.{pi}.master"] = p.detach().to("cpu").clone().contiguous()
            for k, v in _zero_inner(ds_optimizer).state.get(p, {}).items():
                v = v if torch.is_tensor(v) else torch.tensor(v)
                out[f"{gi}.{pi}.{k}"] = v.detach().to("cpu").clone().contiguous()
    return out


def restore_zero_optimizer(ds_optimizer, tensors: dict, where: str) -> None:
    """Put a rank's saved partition back; the partition layout must match (same world size, model
    and LoRA config), or the error says which tensor differs."""
    import torch

    inner = _zero_inner(ds_optimizer)
    with torch.no_grad():
        for gi, group in enumerate(inner.param_groups):
            for pi, p in enumerate(group["params"]):
                master = tensors.get(f"{gi}.{pi}.master")
                if master is None or master.shape != p.shape:
                    raise ValueError(f"{where}: ZeRO partition {gi}.{pi} is "
                                     f"{None if master is None else tuple(master.shape)}, the model's is "
                                     f"{tuple(p.shape)}: resume with the same workers, model and method")
                p.copy_(master.to(p.device, p.dtype))
                st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{gi}.{pi}.")
                      and not k.endswith(".master")}
                if st:
                    inner.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in st.items()}
