"""Supervised fine-tuning on Ray Train (DDP or DeepSpeed ZeRO, LoRA/QLoRA/full through PEFT).

``run(spec, registry, dataset_ref)`` trains on a registered dataset version and registers a
``run`` (final checkpoint, loss curves, figures) and a ``model`` (adapter or full weights,
tokenizer with the training template, generation config). The per-worker code is ``loop.py``;
tokenising, masking and batching are ``data.py`` and ``pipelines/templates.py``.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any


def _ray_storage(registry) -> tuple[str, Any]:
    """Where Ray Train writes checkpoints: beside the registry (its folder, or its bucket)."""
    from infra.store import LocalStore

    store = registry.store
    if isinstance(store, LocalStore):
        return str(store.root / "ray-train"), None
    import os

    from pyarrow import fs

    fs_kw = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        fs_kw.update(endpoint_override=host, scheme=scheme)
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        fs_kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    path = f"{store.bucket}/{store.prefix}/ray-train" if store.prefix else f"{store.bucket}/ray-train"
    return path, fs.S3FileSystem(**fs_kw)


def find_dataset(spec, registry, dataset_ref: str | None) -> str:
    if dataset_ref:
        m = registry.get(dataset_ref)
        if m.kind != "dataset":
            raise ValueError(f"--dataset {dataset_ref}: is a {m.kind}, not a dataset")
        return m.id
    found = registry.list("dataset", spec.task)
    if not found:
        raise ValueError(f"no dataset registered for task '{spec.task}' in {registry.uri}: run `crucible factory` "
                         "first, or pass --dataset REF")
    return found[-1].id


def preflight(spec, registry, dataset_ref: str | None) -> dict:
    """Every check that needs no Ray and no training: method vs hardware, dataset, base model."""
    from pipelines.engines.loading import resolve_model
    from pipelines.train.model import check_method

    check_method(spec.train)
    dataset = find_dataset(spec, registry, dataset_ref)
    folder = registry.materialize(dataset)
    if not (folder / "train.jsonl").exists():
        raise ValueError(f"dataset {dataset}: has no train.jsonl")
    if spec.train.method == "dpo":  # preference pairs; an SFT run as model.base is merged first
        from pipelines.train.dpo import preflight as dpo_preflight

        return {"dataset": dataset, **dpo_preflight(spec, registry, folder)}
    base = resolve_model(spec.model.base, registry, gguf_file=spec.model.gguf_file)
    if base.adapter:
        raise ValueError(f"model.base: {spec.model.base} is a LoRA adapter; merge it first or name its base")
    return {"dataset": dataset, "base": base, "packing": resolve_packing(spec, base)}


def resolve_packing(spec, base) -> bool:
    """``train.packing``: null means on where the architecture honours position-id boundaries;
    true on one that ignores them is refused (its packed examples would attend to each other)."""
    from transformers import AutoConfig

    from pipelines.train.data import packing_supported

    want = spec.train.packing
    if want is False:
        return False
    kw = {"gguf_file": base.gguf_file} if base.gguf_file else {}
    model_type = AutoConfig.from_pretrained(str(base.path), trust_remote_code=spec.model.trust_remote_code,
                                            **kw).model_type
    ok = packing_supported(model_type)
    if want and not ok:
        raise ValueError(f"train.packing: true, but model type '{model_type}' ignores position-id boundaries "
                         "(its attention mask does not come from position_ids), so packed examples would see "
                         "each other; set train.packing: false")
    return ok


def run(spec, registry, dataset_ref: str | None = None, *, resume_run: str | None = None,
        max_failures: int | None = None, fault: dict | None = None) -> dict[str, Any]:
    """Train, register ``run`` and ``model``; returns {"run", "model" (Manifests), "summary" (dict)}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from infra.ray_env import ensure_ray
    from pipelines.train.dpo import dpo_loop
    from pipelines.train.loop import train_loop

    t = spec.train
    pre = preflight(spec, registry, dataset_ref)
    if t.method == "dpo" and resume_run:
        raise ValueError("--resume: DPO runs write only a final checkpoint; start a new run")
    worker_spec = spec.to_dict()
    if isinstance(spec.contract.schema_, str):  # workers on other nodes cannot read the driver's files
        worker_spec["contract"]["schema"] = spec.json_schema_doc()
    if pre.get("base_ref"):  # DPO: the resolved (merged) base, what the adapter will name
        worker_spec["model"] = {**worker_spec["model"], "base": pre["base_ref"]}
    parent = registry.get(resume_run) if resume_run else None
    if parent is not None and (parent.kind != "run" or "checkpoint/state.json" not in parent.files):
        raise ValueError(f"--resume {resume_run}: not a run with a checkpoint")
    ensure_ray()
    from pipelines.train.progress import Progress

    progress = Progress(t.progress)
    storage_path, storage_fs = _ray_storage(registry)
    name = f"{spec.task}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}"
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        dpo_loop if t.method == "dpo" else train_loop,
        train_loop_config={"spec": worker_spec, "registry": registry.uri, "dataset": pre["dataset"],
                           "resume_run": parent.id if parent else None, "fault": fault,
                           "packing": pre.get("packing", False), "progress": progress.target},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=t.max_failures if max_failures is None
                                                          else max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints)))
    started = time.time()
    try:
        result = trainer.fit()
    finally:
        progress.close()
    wall = time.time() - started
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(result.checkpoint.to_directory(tmp))
        return _register(spec, registry, folder, pre, parent, name, wall)


def _register(spec, registry, folder: Path, pre: dict, parent, name: str, wall: float) -> dict[str, Any]:
    from pipelines.modeling import describe_model_folder
    from pipelines.train.plot import loss_curves_png

    state = json.loads((folder / "state.json").read_text())
    hist, dev = state["history"], state["dev_history"]
    summary = {
        "first_loss": hist[0]["loss"] if hist else None,
        "final_loss": hist[-1]["loss"] if hist else None,
        "dev_loss": dev[-1]["loss"] if dev else None,
        "best_dev_loss": state.get("best_dev"),
        "steps": state["step"], "total_steps": state.get("total_steps"),
        "stopped_early": state["stopped_early"], "restored_best_step": state.get("restored_best_step"),
        "resumed_at_steps": state.get("resumed_at_steps", []),
        "final_dev_loss": state.get("final_dev_loss", dev[-1]["loss"] if dev else None),
        "tokens_per_s": state["real_tokens"] / max(state["train_seconds"], 1e-9),
        "real_token_share": state["real_tokens"] / max(state["total_tokens"], 1),
        "real_tokens": state["real_tokens"], "train_seconds": state["train_seconds"],
        "wall_seconds": wall, "peak_rss_mb": state.get("peak_rss_mb"),
        "workers": spec.train.workers, "method": spec.train.method, "packing": pre.get("packing", False),
        "precision": state.get("precision"), "peak_flops": state.get("peak_flops"),
        "mfu": state["model_flops"] / max(state["train_seconds"], 1e-9) / (state["peak_flops"] * spec.train.workers)
        if state.get("peak_flops") and state.get("model_flops") else None,
        "model_flops_per_s": state.get("model_flops", 0) / max(state["train_seconds"], 1e-9),
        "deepspeed_stage": spec.train.deepspeed.stage if spec.train.deepspeed else None,
        "template": state.get("template"), "data": state.get("data"), "ray_run": name,
        **({"dpo": state["dpo"]} if state.get("dpo") else {}),
    }
    curves = {"train": [[h["step"], h["loss"]] for h in hist], "dev": [[d["step"], d["loss"]] for d in dev]}
    png = loss_curves_png([tuple(p) for p in curves["train"]], [tuple(p) for p in curves["dev"]])
    ckpt_files = {f"checkpoint/{p.name}": p for p in folder.iterdir() if p.is_file()}
    inputs = {"spec_hash": spec.spec_hash(), "dataset": pre["dataset"],
              "base_model": pre.get("base_ref") or spec.model.base,  # DPO: the merged SFT model
              **({"parent_run": parent.id} if parent else {}),
              **({"merged_from": pre["merged_from"]} if pre.get("merged_from") else {})}
    run_m = registry.create("run", spec.task, files={**ckpt_files, "loss.png": png,
                                                     "metrics.json": json.dumps({**summary, "curves": curves,
                                                                                 "history": hist}).encode(),
                                                     "spec.json": json.dumps(spec.to_dict(), indent=1).encode()},
                            inputs=inputs, metadata={**summary, "curves": curves})
    model_dir = folder / "model"
    facts = describe_model_folder(model_dir)
    model_m = registry.add_directory("model", spec.task, model_dir,
                                     inputs={**inputs, "run": run_m.id},
                                     metadata={**facts, "method": spec.train.method, "template": summary["template"],
                                               "system_prompt": spec.model.system_prompt,
                                               "gguf_file": spec.model.gguf_file, "final_loss": summary["final_loss"],
                                               "dev_loss": summary["final_dev_loss"]})
    return {"run": run_m, "model": model_m, "summary": summary}
