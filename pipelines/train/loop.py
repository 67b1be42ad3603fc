"""The per-worker training function Ray Train runs, and the step math it is built from.

Loss normalisation: the loss of an optimizer step is the sum of token cross-entropies over every
trained token of every micro-batch on every worker, divided by that global token count. Each
micro-batch's backward gets ``sum_ce * world / n_global``; DDP and DeepSpeed average gradients
over ``world``, so the gradient is the same whatever the split into workers and micro-batches.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import time
from pathlib import Path

from pipelines.templates import IGNORE
from pipelines.train import checkpoint as ckpt
from pipelines.train.data import collate, shift_labels


# -- step math (pure torch, used by the tests directly) -----------------------------------------
def _unwrap(model):
    """The PEFT/transformers model under DDP or a DeepSpeed engine."""
    while type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine"):
        model = model.module
    return model


def _decoder_and_head(model):
    """(decoder body, LM head) when the causal LM can skip its head (``logits_to_keep``), else None."""
    import inspect

    inner = _unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    cached = getattr(base, "_crucible_parts", None)
    if cached is None:
        ok = "logits_to_keep" in inspect.signature(base.forward).parameters
        decoder = base.get_decoder() if ok and hasattr(base, "get_decoder") else None
        cached = (decoder, base.get_output_embeddings()) if decoder is not None else False
        object.__setattr__(base, "_crucible_parts", cached)  # not a submodule: kept out of state dicts
    return cached or None


def label_logits(model, batch, precision: str = "fp32"):
    """(fp32 logits at the positions that have a label, their target ids).

    Most SFT tokens are prompt: the LM head (vocab × hidden, the largest matmul of a small model)
    runs only on the hidden states of labelled positions. The model runs with ``logits_to_keep=1``
    (its own head on one position per row, unused) and a hook takes the decoder's final hidden
    states; going through ``model(...)`` keeps DDP's and DeepSpeed's forward bookkeeping intact.
    """
    from pipelines.train.perf import autocast

    kw = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        kw["position_ids"] = batch["position_ids"]  # packed: resets mark example boundaries, no 2D mask
    else:
        kw["attention_mask"] = batch["attention_mask"]
    device = batch["input_ids"].device
    targets = shift_labels(batch["labels"], batch.get("position_ids")).to(device)
    keep = targets != IGNORE
    parts = _decoder_and_head(model)
    with autocast(precision, device):
        if parts is None:  # a model without logits_to_keep: full logits, then select
            return model(**kw).logits[keep].float(), targets[keep]
        decoder, head = parts
        seen = {}
        hook = decoder.register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out.last_hidden_state))
        try:
            model(**kw, logits_to_keep=1)
        finally:
            hook.remove()
        logits = head(seen["h"][keep])
    return logits.float(), targets[keep]


def forward_sum(model, batch, precision: str = "fp32"):
    """(sum of token cross-entropies, number of trained tokens) for one micro-batch."""
    import torch.nn.functional as F

    logits, targets = label_logits(model, batch, precision)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def target_count(batch) -> int:
    return int((shift_labels(batch["labels"], batch.get("position_ids")) != IGNORE).sum())


def summed_over_ranks(x: float) -> float:
    """``x`` summed over every rank of the process group (float64, so token counts stay exact)."""
    import torch
    import torch.distributed as dist

    v = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(v)
    return float(v.item())


def accumulate(model, micro_batches, backward, *, world: int = 1, all_reduce=None, precision: str = "fp32"
               ) -> tuple[float, int]:
    """Forward + backward every micro-batch of one optimizer step; returns (global loss, global tokens)."""
    n_local = sum(target_count(b) for b in micro_batches)
    n_global = all_reduce(float(n_local)) if all_reduce else float(n_local)
    total = 0.0
    for b in micro_batches:
        loss_sum, _ = forward_sum(model, b, precision)
        backward(loss_sum * world / max(n_global, 1.0))
        total += float(loss_sum.detach())
    total = all_reduce(total) if all_reduce else total
    return total / max(n_global, 1.0), int(n_global)


def lr_at(step: int, total: int, train) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine/linear/constant."""
    warmup = math.ceil(train.warmup_ratio * total)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    if train.scheduler == "constant":
        return train.lr
    progress = (step - warmup) / max(1, total - warmup)
    if train.scheduler == "linear":
        return train.lr * max(0.0, 1.0 - progress)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(train, world: int, *, builds_optimizer: bool) -> dict:
    ds = train.deepspeed
    zero: dict = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    if builds_optimizer:  # optimizer offload needs DeepSpeed's own CPU Adam
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay,
                                                       "betas": [0.9, 0.999], "eps": 1e-8}}
    return cfg


# -- the worker -----------------------------------------------------------------------------------
def _log(rank: int, msg: str, target=None) -> None:
    if rank == 0:
        from pipelines.train.progress import send

        send(target, {"kind": "log", "msg": msg})


def _agree_precision(t, rank: int, local_rank: int, distributed: bool, device) -> tuple[str, dict]:
    """Every rank trains in rank 0's precision. The first worker on a node probes (and caches) the
    node's matmul peak; the others wait, then read the cache, so probes never compete for cores.
    Under DeepSpeed the precision is its config's (it converts the weights itself): no autocast."""
    import torch
    import torch.distributed as dist

    from pipelines.train.perf import choose_precision, peak_flops

    def choose():
        if t.deepspeed:
            name = "bf16" if t.deepspeed.precision == "bf16" else "fp32"
            return f"deepspeed-{name}", {"peak_flops": peak_flops(name, "cuda" if t.use_gpu else "cpu")}
        return choose_precision(t.precision, t.use_gpu)

    if local_rank == 0:
        chosen, probe = choose()
    if distributed:
        dist.barrier()
    if local_rank != 0:
        chosen, probe = choose()
    if distributed and not t.deepspeed:
        flag = torch.tensor([1.0 if chosen == "bf16" else 0.0], device=device)
        dist.broadcast(flag, src=0)
        if (flag.item() == 1.0) != (chosen == "bf16"):  # another node measured otherwise: rank 0 decides
            chosen = "bf16" if flag.item() == 1.0 else "fp32"
            probe = choose_precision(chosen, t.use_gpu)[1]
    return chosen, probe


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. ``config``: spec (dict), registry, dataset, resume_run, fault."""
    import random

    import ray.train
    import torch
    import torch.distributed as dist

    from infra.registry import Registry
    from pipelines.contract import Checker
    from pipelines.spec import Spec
    from pipelines.train import perf
    from pipelines.train.data import (encode_records, leaks_across_packed_examples, mix_repair, plan_batches,
                                      read_records)
    from pipelines.train.model import apply_method, load_base, trainable_parameters
    from pipelines.train.progress import send

    spec = Spec.model_validate(config["spec"])
    t = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = dist.is_available() and dist.is_initialized()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    if not t.use_gpu:
        # Ray sets OMP_NUM_THREADS from the (fractional) CPUs a worker asked for, i.e. 1: a lone
        # worker on a 2-core laptop would train on one core. Share the node's cores instead.
        torch.set_num_threads(t.threads_per_worker or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    registry = Registry.open(config["registry"])
    t0 = time.time()
    packing = config.get("packing", bool(t.packing))
    target = config.get("progress")
    log = lambda msg: _log(rank, msg, target)  # noqa: E731

    all_reduce = summed_over_ranks if distributed and world > 1 else float

    # Data: every worker reads the same dataset version and takes its own share of the batches.
    folder = registry.materialize(config["dataset"])
    torch.manual_seed(t.seed)
    model, tokenizer, facts = load_base(spec, registry)
    records, mix = mix_repair(read_records(folder / "train.jsonl"), t.repair_share, t.seed)
    form = Checker(spec.contract).as_decoded
    train_ex, data_stats = encode_records(tokenizer, records, spec.model.max_seq_len, spec.model.system_prompt, form)
    data_stats.update(mix)
    dev_path = folder / "dev.jsonl"
    dev_ex = encode_records(tokenizer, read_records(dev_path), spec.model.max_seq_len,
                            spec.model.system_prompt, form)[0] if dev_path.exists() else []
    if not train_ex:
        raise ValueError(f"dataset {config['dataset']}: no training example has an assistant token to learn")
    plans: dict[int, list] = {}

    def plan(epoch: int) -> list:
        """One epoch's batches, planned once per epoch (not per step)."""
        if epoch not in plans:
            plans.clear()
            plans[epoch] = plan_batches(train_ex, batch_size=t.micro_batch_size, packing=packing,
                                        max_len=spec.model.max_seq_len, seed=t.seed, epoch=epoch)
        return plans[epoch]
    per_step = world * t.grad_accum
    steps_per_epoch = len(plan(0)) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"train.micro_batch_size × grad_accum × workers = {t.micro_batch_size}×{t.grad_accum}×"
                         f"{world} needs more batches than the dataset has ({len(plan(0))}); lower them")
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)

    # Model: LoRA/full, then restore a checkpoint (Ray's after a worker failure, or --resume RUN).
    torch.manual_seed(t.seed)
    model = apply_method(model, t, resized_vocab=facts["added_tokens"] > 0).to(device)
    if packing and len(train_ex) > 1 and leaks_across_packed_examples(model, train_ex):
        raise ValueError(f"train.packing: the model ({type(_unwrap(model)).__name__}) ignores position-id "
                         "boundaries: a packed example's logits changed with its neighbour; set train.packing: false")
    model.train()
    named = trainable_parameters(model)
    precision, probe = _agree_precision(t, rank, ctx.get_local_rank(), distributed and world > 1, device)
    shape = perf.model_shape(model)
    params = [p for _, p in named]
    state = {"step": 0, "history": [], "dev_history": [], "best_dev": None, "bad_evals": 0,
             "real_tokens": 0, "total_tokens": 0, "train_seconds": 0.0, "stopped_early": False, "model_flops": 0.0}
    opt_state = None
    resume_dir, ray_ckpt = None, ray.train.get_checkpoint()
    if ray_ckpt is not None:
        resume_dir = Path(ray_ckpt.to_directory())
    elif config.get("resume_run"):
        resume_dir = registry.materialize(config["resume_run"]) / "checkpoint"
    if resume_dir is not None:
        tensors, opt_state, state = ckpt.load(resume_dir)
        ckpt.restore_parameters(named, tensors)
        state.setdefault("model_flops", 0.0)
        # kept in the state (and so in every later checkpoint): the run's manifest says where it
        # restarted, once per restart or --resume
        state["resumed_at_steps"] = [*state.get("resumed_at_steps", []), state["step"]]
        log(f"resumed from step {state['step']} ({resume_dir})")
    state.update(precision=precision, **probe)

    zero_stage = t.deepspeed.stage if t.deepspeed else None
    if t.deepspeed:
        import deepspeed

        builds = t.deepspeed.offload_optimizer
        optimizer = None if builds else torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, dist_init_required=False,
            config=deepspeed_config(t, world, builds_optimizer=builds))
        run_model = engine

        def backward(loss):
            engine.backward(loss, scale_wrt_gas=False)  # we normalise by tokens ourselves

        def optimizer_step(lr):
            for g in optimizer.param_groups:
                g["lr"] = lr
            # DeepSpeed steps at its accumulation boundary: it counts micro-steps itself.
            for _ in range(t.grad_accum):
                engine.step()
            return float(engine.get_global_grad_norm() or 0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        run_model = model
        if distributed and world > 1:
            run_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if t.use_gpu else None)

        def backward(loss):
            loss.backward()

        def optimizer_step(lr):
            for g in optimizer.param_groups:
                g["lr"] = lr
            norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(norm)
    if opt_state and not t.deepspeed:
        ckpt.restore_optimizer(optimizer, params, opt_state)
    if t.deepspeed and resume_dir is not None:
        shard = resume_dir / ckpt.zero_shard_name(rank)
        if shard.exists():
            from safetensors.torch import load_file

            ckpt.restore_zero_optimizer(optimizer, load_file(str(shard)), str(shard))
        elif state.get("zero_world"):
            raise ValueError(f"{resume_dir}: has no ZeRO optimizer shard for rank {rank} (saved with "
                             f"{state['zero_world']} workers, resuming with {world}): resume with the same workers")
        else:
            log("the checkpoint has no optimizer state: Adam moments start again")

    def to_device(b):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}

    def dev_loss() -> float | None:
        if not dev_ex:
            return None
        batches = plan_batches(dev_ex, batch_size=t.micro_batch_size, packing=False,
                               max_len=spec.model.max_seq_len, seed=0, epoch=0)
        share = math.ceil(len(batches) / world)  # every rank runs the same number of forwards (ZeRO-3 gathers)
        mine = batches[rank::world]
        run_model.eval()
        s = n = 0.0
        with torch.no_grad():
            for i in range(share):
                b = to_device(collate(mine[i % len(mine)] if mine else batches[0], tokenizer.pad_token_id))
                loss_sum, count = forward_sum(run_model, b, precision)
                if i < len(mine):
                    s, n = s + float(loss_sum), n + count
        run_model.train()
        s, n = all_reduce(s), all_reduce(n)
        return s / max(n, 1.0)

    def save_checkpoint(final: bool) -> None:
        tensors = ckpt.trainable_state(named, zero_stage)
        opt = ckpt.optimizer_tensors(optimizer, params) if not t.deepspeed else None
        metrics = {"step": state["step"], "loss": state["history"][-1]["loss"] if state["history"] else None}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            if t.deepspeed:  # every rank saves its own partition; Ray merges the ranks' folders
                from safetensors.torch import save_file

                state["zero_world"] = world
                save_file(ckpt.zero_optimizer_tensors(optimizer), str(folder / ckpt.zero_shard_name(rank)))
            if final:
                with ckpt.gathered(model.parameters() if t.method == "full" else params, zero_stage):
                    if rank == 0:
                        save_model_folder(model, tokenizer, spec, facts, folder / "model")
            if rank == 0:
                state["peak_rss_mb"] = max(state.get("peak_rss_mb", 0), _peak_rss_mb())
                ckpt.save(folder, tensors, opt, state)
                ray.train.report({**metrics, "final": final}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report({**metrics, "final": final},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp) if t.deepspeed else None)

    repeats = (f" ({data_stats['repair_rows']} repair rows x{data_stats['repair_repeats']:g})"
               if data_stats["repair_repeats"] != 1 else "")
    log(f"{data_stats['examples']} examples{repeats}, {steps_per_epoch} steps/epoch, {total_steps} steps, "
               f"{world} worker(s), method {t.method}, "
               f"{'deepspeed zero-' + str(zero_stage) if t.deepspeed else 'ddp' if world > 1 else 'single process'}, "
               f"packing {'on' if packing else 'off'}, {precision} (peak {probe['peak_flops'] / 1e9:,.0f} GFLOP/s "
               f"per worker); setup {time.time() - t0:.1f}s")
    if rank == 0:
        send(target, {"kind": "start", "total": total_steps})
    every = max(1, total_steps // 20)
    best_weights = None
    while state["step"] < total_steps and not state["stopped_early"]:
        step = state["step"]
        epoch, k = divmod(step, steps_per_epoch)
        batches = plan(epoch)[k * per_step:(k + 1) * per_step]
        micro = [to_device(collate(b, tokenizer.pad_token_id)) for b in batches[rank::world]]
        if config.get("fault") and config["fault"].get("step") == step and rank == world - 1:
            marker = Path(config["fault"]["marker"])
            if not marker.exists():  # test hook: this worker dies once, like a lost node
                marker.write_text("killed")
                os._exit(1)
        torch.manual_seed(t.seed * 100_003 + step * world + rank)  # dropout reproducible across resumes
        random.seed(step)
        started = time.time()
        loss, n_tok = accumulate(run_model, micro, backward, world=world, all_reduce=all_reduce, precision=precision)
        lr = lr_at(step, total_steps, t)
        grad_norm = optimizer_step(lr)
        state["train_seconds"] += time.time() - started
        state["real_tokens"] += int(all_reduce(sum(b["real_tokens"] for b in micro)))
        state["total_tokens"] += int(all_reduce(sum(b["total_tokens"] for b in micro)))
        state["model_flops"] += all_reduce(sum(perf.step_flops(shape, tokens=b["real_tokens"], label_tokens=0,
                                                               attn_pairs=b["attn_pairs"]) for b in micro)) \
            + perf.step_flops(shape, tokens=0, label_tokens=n_tok, attn_pairs=0)  # n_tok is global already
        state["step"] = step + 1
        state["history"].append({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tok})
        if rank == 0:
            tps = state["real_tokens"] / max(state["train_seconds"], 1e-9)
            send(target, {"kind": "step", "step": step + 1, "total": total_steps, "loss": loss, "tokens_per_s": tps,
                          "print": step % every == 0 or step + 1 == total_steps})
        if t.eval_every and (step + 1) % t.eval_every == 0 and dev_ex:
            d = dev_loss()
            state["dev_history"].append({"step": step + 1, "loss": d})
            log(f"step {step + 1}: dev loss {d:.4f}")
            if state["best_dev"] is None or d < state["best_dev"] - 1e-6:
                state["best_dev"], state["best_step"], state["bad_evals"] = d, step + 1, 0
                if t.early_stopping_patience and zero_stage != 3:  # what an early stop goes back to
                    best_weights = ckpt.trainable_state(named, zero_stage)
            else:
                state["bad_evals"] += 1
                if t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience:
                    state["stopped_early"] = True
                    log(f"early stop at step {step + 1}: dev loss has not improved for "
                               f"{state['bad_evals']} evals (best {state['best_dev']:.4f})")
        if t.save_every and state["step"] % t.save_every == 0 and state["step"] < total_steps \
                and not state["stopped_early"]:
            save_checkpoint(final=False)
    if state["stopped_early"] and best_weights is not None:
        # Early stopping means the model of the best dev loss, not the last (worse) one. Under
        # ZeRO-3 parameters are partitioned across ranks, so there the last weights are kept.
        ckpt.restore_parameters(named, best_weights)
        state["restored_best_step"] = state["best_step"]
        state["final_dev_loss"] = dev_loss()
        log(f"restored the weights of step {state['best_step']} (dev loss {state['final_dev_loss']:.4f})")
    elif dev_ex and (not state["dev_history"] or state["dev_history"][-1]["step"] != state["step"]):
        state["dev_history"].append({"step": state["step"], "loss": dev_loss()})
    state["total_steps"] = total_steps
    state["data"] = data_stats
    state["template"] = facts["template"]
    save_checkpoint(final=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_model_folder(model, tokenizer, spec, facts: dict, out: Path) -> None:
    """The registered model: adapter (LoRA) or weights (full), tokenizer with the training
    template unchanged, generation config, and crucible.json (system prompt, base, template, and the
    contract's decoding guide when the spec constrains decoding)."""
    import json

    from pipelines.guide import guide_for

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None) or getattr(getattr(model, "base_model", None), "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    (out / "crucible.json").write_text(json.dumps({
        "system_prompt": spec.model.system_prompt, "base_model": spec.model.base, "gguf_file": facts["gguf_file"],
        "template": facts["template"], "method": spec.train.method, "max_seq_len": spec.model.max_seq_len,
        "guide": guide_for(spec.contract)}, indent=1))
