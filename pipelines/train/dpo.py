"""Preference tuning (``train.method: dpo``) on Ray Train: the policy learns to give its chosen
answer a higher likelihood than its rejected one, relative to a frozen reference model.

For a pair with prompt x, chosen y+ and rejected y-, and sequence log-probs log p(y|x):

    h = [log pi(y+|x) - log ref(y+|x)] - [log pi(y-|x) - log ref(y-|x)]

    sigmoid (DPO)   -log sigmoid(beta * h)
    ipo             (h - 1 / (2 beta))^2, with log-probs averaged over each answer's tokens
    hinge (SLiC)    max(0, 1 - beta * h)

The implicit rewards are beta * (log pi - log ref) of each answer; their margin (chosen minus
rejected) and the share of pairs where the chosen one wins (accuracy) are what the run reports,
on the training pairs per step and on the held-out dev pairs before and after training.

The reference is the starting model: with LoRA, the same model with its adapters switched off
(no second copy in memory); with full fine-tuning, a frozen copy. Its log-probs are computed once
per micro-batch, in the same forward layout as the policy's. Pairs come from a dataset built with
``data.format: preference``: each record's messages end with the chosen answer and
``meta.rejected_response`` holds the rejected one. An SFT run (or its LoRA model) as
``model.base`` is merged into its base first and registered, so the adapter DPO trains names a
real base and the reference is exactly the SFT model.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.templates import IGNORE, Encoded, encode_chat, with_system_prompt


# -- pairs -------------------------------------------------------------------------------------------
def read_pairs(path: str | Path) -> list[dict]:
    """Dataset records that carry a rejected answer; a record without one is an error naming it."""
    from pipelines.train.data import read_records

    rows = read_records(path)
    for n, r in enumerate(rows, 1):
        rejected = (r.get("meta") or {}).get("rejected_response")
        if not isinstance(rejected, str) or r["messages"][-1]["role"] != "assistant":
            raise ValueError(f"{path}:{n} (id {r.get('id')}): not a preference pair (needs messages ending with "
                             "the chosen answer and meta.rejected_response); build the dataset with "
                             "data.format: preference")
    return rows


def encode_pairs(tokenizer, records: list[dict], max_len: int, system_prompt: str | None = None
                 ) -> tuple[list[tuple[Encoded, Encoded]], dict]:
    """(chosen, rejected) encodings of every pair; pairs where truncation leaves either answer no
    token are dropped (and counted). Both share the prompt, so any earlier assistant turns in it add
    the same terms to policy and reference and cancel in h."""
    kept, dropped, truncated = [], 0, 0
    for r in records:
        msgs = with_system_prompt(r["messages"], system_prompt)
        chosen = encode_chat(tokenizer, msgs, max_len)
        other = {"role": "assistant", "content": r["meta"]["rejected_response"]}
        rejected = encode_chat(tokenizer, [*msgs[:-1], other], max_len)
        truncated += chosen.truncated or rejected.truncated
        if chosen.trained_tokens == 0 or rejected.trained_tokens == 0:
            dropped += 1
            continue
        kept.append((chosen, rejected))
    return kept, {"pairs": len(kept), "dropped_no_target": dropped, "truncated": truncated}


def pair_batches(pairs: list, batch_size: int, seed: int, epoch: int) -> list[list]:
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(pairs)
    rng.shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate_pairs(pairs: list[tuple[Encoded, Encoded]], pad_id: int):
    """One padded batch: the chosen answers in rows [0, n), the rejected ones in [n, 2n)."""
    from pipelines.train.data import as_rows, collate

    return collate(as_rows([c for c, _ in pairs] + [r for _, r in pairs]), pad_id)


# -- the math (pure torch; the tests call it directly) -------------------------------------------
def sequence_logps(model, batch, *, average: bool = False):
    """Per row, the sum (or mean) of the log-probs of its trained tokens."""
    import torch

    from pipelines.train.data import shift_labels
    from pipelines.train.loop import label_logits

    # the LM head and log-softmax only at answer positions (most positions are prompt): the same
    # label-only head as SFT, so a vocab-wide logits tensor is never built
    logits, targets = label_logits(model, batch)
    mask = shift_labels(batch["labels"]) != IGNORE
    picked = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rows = mask.nonzero()[:, 0].to(picked.device)
    total = torch.zeros(mask.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    return total / mask.sum(-1).clamp(min=1) if average else total


def preference_loss(policy, reference, *, beta: float, loss: str):
    """Per-pair losses and implicit rewards from (2n,) policy and reference log-probs (chosen first)."""
    import torch.nn.functional as F

    n = policy.shape[0] // 2
    chosen_reward = beta * (policy[:n] - reference[:n]).detach()
    rejected_reward = beta * (policy[n:] - reference[n:]).detach()
    h = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss == "hinge":
        losses = F.relu(1.0 - beta * h)
    else:
        raise ValueError(f"train.dpo.loss: {loss!r} is not sigmoid, ipo or hinge")
    return losses, chosen_reward, rejected_reward


class Reference:
    """The reference model's log-probs: the policy with its LoRA adapters disabled, or a frozen copy."""

    def __init__(self, model, weights: str):
        import copy

        self.model, self.frozen = model, None
        if weights == "full":
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def logps(self, batch, *, average: bool):
        import torch

        with torch.no_grad():
            if self.frozen is not None:
                return sequence_logps(self.frozen, batch, average=average)
            was_training = self.model.training
            self.model.eval()  # no adapter dropout in the reference
            try:
                with self.model.disable_adapter():
                    return sequence_logps(self.model, batch, average=average)
            finally:
                self.model.train(was_training)


def pair_figures(losses, chosen_reward, rejected_reward) -> dict[str, float]:
    """Sums over pairs (the caller divides by the global pair count)."""
    return {"loss": float(losses.detach().sum()), "chosen_reward": float(chosen_reward.sum()),
            "rejected_reward": float(rejected_reward.sum()),
            "margin": float((chosen_reward - rejected_reward).sum()),
            "accuracy": float((chosen_reward > rejected_reward).float().sum())}


# -- before Ray ------------------------------------------------------------------------------------
UNSUPPORTED = {"deepspeed": "DPO runs on DDP (remove train.deepspeed)",
               "early_stopping_patience": "DPO has no early stopping yet (remove it; eval_every still "
                                          "reports dev pairs)",
               "save_every": "DPO writes only its final checkpoint (remove it)"}


def preflight(spec, registry, dataset_folder: Path) -> dict[str, Any]:
    """Refuse what DPO does not do, check the pairs, and resolve ``model.base`` to a full model:
    an SFT run or LoRA model is merged into its base (registered once, reused after)."""
    from pipelines.engines.loading import is_registry_ref, resolve_model

    t = spec.train
    for key, why in UNSUPPORTED.items():
        if getattr(t, key):
            raise ValueError(f"train.{key}: {why}")
    pairs = read_pairs(dataset_folder / "train.jsonl")
    if not pairs:
        raise ValueError(f"{dataset_folder / 'train.jsonl'}: no preference pairs")
    base_ref, merged_from = spec.model.base, None
    if is_registry_ref(base_ref):
        m = registry.get(base_ref)
        if m.kind == "run" or "adapter_config.json" in m.files:
            from pipelines.export import merge_registered

            merged, adapter, _ = merge_registered(registry, base_ref, reuse=True)
            base_ref, merged_from = merged.id, adapter.id
    base = resolve_model(base_ref, registry, gguf_file=spec.model.gguf_file)
    if base.adapter:
        raise ValueError(f"model.base: {spec.model.base} is a LoRA adapter folder outside the registry; merge it first")
    return {"base_ref": base_ref, "merged_from": merged_from, "base": base, "pairs": len(pairs)}


# -- the worker ------------------------------------------------------------------------------------
def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[crucible dpo] {msg}", flush=True)


def dpo_loop(config: dict) -> None:
    """Runs on every Ray Train worker. ``config``: spec (dict, model.base already resolved), registry, dataset."""
    import ray.train
    import torch
    import torch.distributed as dist

    from infra.registry import Registry
    from pipelines.spec import Spec
    from pipelines.train import checkpoint as ckpt
    from pipelines.train.loop import _peak_rss_mb, lr_at, save_model_folder, summed_over_ranks
    from pipelines.train.model import apply_method, load_base, trainable_parameters

    spec = Spec.model_validate(config["spec"])
    t, d = spec.train, spec.train.dpo
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    if not t.use_gpu:  # as in SFT: Ray's OMP_NUM_THREADS=1 would leave cores idle
        torch.set_num_threads(t.threads_per_worker or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    registry = Registry.open(config["registry"])
    t0 = time.time()

    all_reduce = summed_over_ranks if distributed else float

    folder = registry.materialize(config["dataset"])
    torch.manual_seed(t.seed)
    model, tokenizer, facts = load_base(spec, registry)
    train_pairs, data_stats = encode_pairs(tokenizer, read_pairs(folder / "train.jsonl"), spec.model.max_seq_len,
                                           spec.model.system_prompt)
    dev_path = folder / "dev.jsonl"
    dev_pairs = encode_pairs(tokenizer, read_pairs(dev_path), spec.model.max_seq_len,
                             spec.model.system_prompt)[0] if dev_path.exists() else []
    if not train_pairs:
        raise ValueError(f"dataset {config['dataset']}: no preference pair has an answer token left to learn")
    per_step = world * t.grad_accum
    steps_per_epoch = len(pair_batches(train_pairs, t.micro_batch_size, t.seed, 0)) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"train.micro_batch_size × grad_accum × workers = {t.micro_batch_size}×{t.grad_accum}×"
                         f"{world} needs more pair batches than the dataset has; lower them")
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)

    weights = t.model_copy(update={"method": d.weights})  # apply_method speaks lora/full
    torch.manual_seed(t.seed)
    model = apply_method(model, weights, resized_vocab=facts["added_tokens"] > 0).to(device)
    model.train()
    reference = Reference(model, d.weights)
    named = trainable_parameters(model)
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    run_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if t.use_gpu else None) \
        if distributed else model
    average = d.loss == "ipo"

    def to_device(b):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}

    def figures(sums: dict, n: float) -> dict:
        return {k: all_reduce(v) / max(n, 1.0) for k, v in sums.items()}

    def evaluate_pairs(pairs) -> dict | None:
        """Mean loss, rewards, margin and accuracy over held-out pairs (every rank the same number of forwards)."""
        if not pairs:
            return None
        batches = pair_batches(pairs, t.micro_batch_size, 0, 0)
        mine, share = batches[rank::world], math.ceil(len(batches) / world)
        sums = dict.fromkeys(("loss", "chosen_reward", "rejected_reward", "margin", "accuracy"), 0.0)
        n = 0
        run_model.eval()
        with torch.no_grad():
            for i in range(share):
                b = to_device(collate_pairs(mine[i % len(mine)] if mine else batches[0], tokenizer.pad_token_id))
                losses, cr, rr = preference_loss(sequence_logps(model, b, average=average),
                                                 reference.logps(b, average=average), beta=d.beta, loss=d.loss)
                if i < len(mine):
                    sums = {k: sums[k] + v for k, v in pair_figures(losses, cr, rr).items()}
                    n += len(mine[i])
        run_model.train()
        return {**figures(sums, all_reduce(float(n))), "pairs": len(pairs)}

    state: dict[str, Any] = {"step": 0, "history": [], "dev_history": [], "best_dev": None, "bad_evals": 0,
                             "real_tokens": 0, "total_tokens": 0, "train_seconds": 0.0, "stopped_early": False}
    _log(rank, f"{data_stats['pairs']} pairs, {steps_per_epoch} steps/epoch, {total_steps} steps, {world} worker(s), "
               f"dpo {d.loss} beta {d.beta} on {d.weights} weights (packing does not apply: pairs are padded); "
               f"setup {time.time() - t0:.1f}s")
    before = evaluate_pairs(dev_pairs)
    if before:
        state["dev_history"].append({"step": 0, **before})
        _log(rank, f"dev pairs before: margin {before['margin']:.4f}, accuracy {before['accuracy']:.3f}")
    every = max(1, total_steps // 20)
    while state["step"] < total_steps:
        step = state["step"]
        epoch, k = divmod(step, steps_per_epoch)
        batches = pair_batches(train_pairs, t.micro_batch_size, t.seed, epoch)[k * per_step:(k + 1) * per_step]
        micro = [to_device(collate_pairs(b, tokenizer.pad_token_id)) for b in batches[rank::world]]
        n_global = all_reduce(float(sum(b["input_ids"].shape[0] // 2 for b in micro)))
        torch.manual_seed(t.seed * 100_003 + step * world + rank)
        started = time.time()
        sums = dict.fromkeys(("loss", "chosen_reward", "rejected_reward", "margin", "accuracy"), 0.0)
        for b in micro:
            ref = reference.logps(b, average=average)
            losses, cr, rr = preference_loss(sequence_logps(run_model, b, average=average), ref, beta=d.beta,
                                             loss=d.loss)
            (losses.sum() * world / max(n_global, 1.0)).backward()  # DDP averages over world: a global mean
            sums = {key: sums[key] + v for key, v in pair_figures(losses, cr, rr).items()}
        lr = lr_at(step, total_steps, t)
        for g in optimizer.param_groups:
            g["lr"] = lr
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["train_seconds"] += time.time() - started
        state["real_tokens"] += int(all_reduce(sum(b["real_tokens"] for b in micro)))
        state["total_tokens"] += int(all_reduce(sum(b["total_tokens"] for b in micro)))
        state["step"] = step + 1
        row = {"step": step + 1, **figures(sums, n_global), "lr": lr, "grad_norm": grad_norm, "pairs": int(n_global)}
        state["history"].append(row)
        if rank == 0 and (step % every == 0 or step + 1 == total_steps):
            _log(rank, f"step {step + 1}/{total_steps}  loss {row['loss']:.4f}  margin {row['margin']:.4f}  "
                       f"accuracy {row['accuracy']:.2f}  lr {lr:.2e}")
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < total_steps and dev_pairs:
            ev = evaluate_pairs(dev_pairs)
            state["dev_history"].append({"step": step + 1, **ev})
            _log(rank, f"step {step + 1}: dev margin {ev['margin']:.4f}, accuracy {ev['accuracy']:.3f}")
    after = evaluate_pairs(dev_pairs)
    if after:
        state["dev_history"].append({"step": state["step"], **after})
        _log(rank, f"dev pairs after: margin {after['margin']:.4f}, accuracy {after['accuracy']:.3f}")
    state["best_dev"] = min((e["loss"] for e in state["dev_history"][1:]), default=None)
    state["total_steps"] = total_steps
    state["data"] = data_stats
    state["template"] = facts["template"]
    state["dpo"] = {"beta": d.beta, "loss": d.loss, "weights": d.weights,
                    "reference": "base with adapters disabled" if d.weights == "lora" else "frozen copy",
                    "dev_before": before, "dev_after": after,
                    "train_last": {k: state["history"][-1][k] for k in ("loss", "margin", "accuracy")}}
    tensors = ckpt.trainable_state(named, None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if rank == 0:
            save_model_folder(model, tokenizer, spec, facts, out / "model")
            state["peak_rss_mb"] = _peak_rss_mb()
            ckpt.save(out, tensors, ckpt.optimizer_tensors(optimizer, params), state)
            ray.train.report({"step": state["step"], "loss": state["history"][-1]["loss"], "final": True},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report({"step": state["step"], "final": True}, checkpoint=None)
