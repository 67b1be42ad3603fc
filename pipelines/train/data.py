"""Training data: canonical records -> token ids + loss labels -> batches.

Two ways to batch, chosen by ``train.packing``:

* packed: several examples per row, each with position ids starting again at 0. With no 2D
  attention mask, transformers (>= 5) reads the position-id resets as sequence boundaries and
  builds a block-diagonal causal mask, so no example attends to another (the test proves an
  example's logits are identical packed and alone).
* length-grouped: examples of similar length share a batch, padded to that batch's longest row,
  never to a fixed block.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipelines.templates import IGNORE, Encoded, encode_chat, with_system_prompt


def read_records(path: str | Path) -> list[dict]:
    """Canonical dataset records (one JSON object per line, with ``messages``)."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get("messages"), list):
                    raise ValueError(f"{path}:{n}: a dataset record needs a 'messages' list")
                rows.append(row)
    return rows


def mix_repair(records: list[dict], share: float | None, seed: int = 0) -> tuple[list[dict], dict]:
    """Repeat a repair round's rows (``meta.repair``) until they make ``share`` of the examples.

    A repaired dataset holds every original row plus a few hundred repair rows per cluster, so a
    retrain of a few hundred steps sees each cluster's rows rarely; repeating them (not thinning
    the others, which a run of more epochs would still use) moves that share. Whole repeats, then a
    seeded sample of the rows for the fraction left. Unchanged when ``share`` is None, the dataset
    has no repair rows, or they already make that share."""
    repair = [r for r in records if "repair" in (r.get("meta") or {})]
    others = len(records) - len(repair)
    stats = {"repair_rows": len(repair), "repair_repeats": 1.0}
    if share is None or not repair or not others or len(repair) / len(records) >= share:
        return records, stats
    times = share * others / ((1 - share) * len(repair))  # repair rows after mixing = share of all
    whole, frac = int(times), times - int(times)
    extra = random.Random(seed).sample(repair, round(frac * len(repair)))
    stats["repair_repeats"] = round(times, 2)
    return records + repair * (whole - 1) + extra, stats


def encode_records(tokenizer, records: list[dict], max_len: int, system_prompt: str | None = None,
                   answer_form=None) -> tuple[list[Encoded], dict]:
    """Encode every record; drop those with nothing to learn (no assistant token left after truncation).
    ``answer_form`` rewrites each assistant message first (``Checker.as_decoded``: the form the
    constrained decoder will make the model write)."""
    kept, dropped, truncated = [], 0, 0
    for row in records:
        messages = row["messages"]
        if answer_form is not None:
            messages = [{**m, "content": answer_form(m["content"])}
                        if m.get("role") == "assistant" and isinstance(m.get("content"), str) else m for m in messages]
        enc = encode_chat(tokenizer, with_system_prompt(messages, system_prompt), max_len)
        truncated += enc.truncated
        if enc.trained_tokens == 0:
            dropped += 1
            continue
        kept.append(enc)
    return kept, {"examples": len(kept), "dropped_no_target": dropped, "truncated": truncated}


def pack(examples: list[Encoded], max_len: int) -> list[dict]:
    """Best-fit-decreasing packing into rows of at most ``max_len`` tokens, O(n log max_len).

    Longest example first, each into the row whose free space fits it most tightly (a new row if
    none does). A segment tree over free-space values finds that row in O(log max_len). Within a
    row the examples keep their input order, so a shuffled input still gives varied rows.
    """
    size = 1
    while size < max_len + 1:
        size *= 2
    count = [0] * (2 * size)  # leaves: how many rows have exactly that much free space
    free_rows: dict[int, list[int]] = {}
    members: list[list[int]] = []

    def bump(cap: int, delta: int) -> None:
        i = cap + size
        while i:
            count[i] += delta
            i //= 2

    def smallest_at_least(n: int) -> int | None:
        """Smallest free-space value >= n that some row has."""
        if n > max_len:
            return None
        lo, best = n + size, None
        # walk up from the leaf of n: take the leftmost non-empty subtree to its right
        if count[lo]:
            return n
        while lo > 1:
            if lo % 2 == 0 and count[lo + 1]:
                best = lo + 1
                break
            lo //= 2
        if best is None:
            return None
        while best < size:
            best = 2 * best if count[2 * best] else 2 * best + 1
        return best - size

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))  # stable: ties keep order
    for i in order:
        n = len(examples[i].input_ids)
        cap = smallest_at_least(n)
        if cap is None:
            members.append([])
            row, cap = len(members) - 1, max_len
        else:
            row = free_rows[cap].pop()
            bump(cap, -1)
        members[row].append(i)
        left = cap - n
        free_rows.setdefault(left, []).append(row)
        bump(left, 1)
    rows = []
    for idx in members:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(idx):
            ex = examples[i]
            row["input_ids"] += ex.input_ids
            row["labels"] += ex.labels
            row["position_ids"] += list(range(len(ex.input_ids)))
        rows.append(row)
    return rows


def packing_supported(model_type: str) -> bool:
    """Whether transformers' causal LM for ``model_type`` reads position-id resets as sequence
    boundaries: its decoder builds the mask with ``masking_utils.create_causal_mask`` (or the
    sliding-window variant) from ``position_ids``, which, with no 2D mask, turns resets into a
    block-diagonal mask. Architectures with mask code of their own would let packed examples see
    each other. A static check (no weights); the worker also checks the loaded model
    (``leaks_across_packed_examples``)."""
    import inspect

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    try:
        src = inspect.getsource(inspect.getmodule(getattr(transformers, name)))
    except (AttributeError, ImportError, OSError, TypeError):
        return False
    return ("create_causal_mask" in src or "create_sliding_window_causal_mask" in src) \
        and "position_ids=position_ids" in src


def leaks_across_packed_examples(model, examples: list[Encoded], atol: float = 1e-4) -> bool:
    """True when a packed row's second example gets other logits than alone (the model ignores
    position-id boundaries). Two short examples, two forwards, no gradients."""
    import torch

    a, b = (e.input_ids[:32] for e in examples[:2])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        dev = next(model.parameters()).device
        ids = torch.tensor([a + b], device=dev)
        pos = torch.tensor([list(range(len(a))) + list(range(len(b)))], device=dev)
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, len(a):].float()
        alone = model(input_ids=torch.tensor([b], device=dev), use_cache=False).logits[0].float()
    model.train(was_training)
    return not torch.allclose(packed, alone, atol=atol, rtol=1e-3)


def as_rows(examples: list[Encoded]) -> list[dict]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def plan_batches(examples: list[Encoded], *, batch_size: int, packing: bool, max_len: int, seed: int,
                 epoch: int, group_factor: int = 32) -> list[list[dict]]:
    """One epoch's batches (lists of rows), shuffled reproducibly from ``seed`` and ``epoch``."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(examples)
    rng.shuffle(order)
    if packing:
        rows = pack(order, max_len)
    else:
        # Sort within large shuffled windows: batches hold similar lengths, epochs still differ.
        rows = []
        window = batch_size * group_factor
        for i in range(0, len(order), window):
            rows += sorted(as_rows(order[i:i + window]), key=lambda r: len(r["input_ids"]))
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: list[dict], pad_id: int):
    """Tensors for one micro-batch, right-padded to its longest row.

    Packed rows carry ``position_ids`` and no attention mask (the resets mark the boundaries; the
    padding tail is one more "sequence" with its own positions and no labels). Unpacked rows get
    a 2D attention mask.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    packed = "position_ids" in rows[0]
    pos = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        real[i, :n] = 1
        if packed:
            pos[i, :n] = torch.tensor(r["position_ids"])
            pos[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "real_tokens": int(real.sum()), "total_tokens": ids.numel(),
             "attn_pairs": sum(n * (n + 1) // 2 for r in rows for n in _segments(r))}  # for MFU
    if packed:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = real
    return batch


def _segments(row: dict) -> list[int]:
    """Lengths of the examples in a row (one unless packed)."""
    pos = row.get("position_ids")
    if pos is None:
        return [len(row["input_ids"])]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [b - a for a, b in zip(starts, starts[1:])]


def shift_labels(labels, position_ids=None):
    """Targets aligned with logits: position t predicts token t+1; the last position predicts
    nothing, and in a packed row the last token of one example never predicts the next example."""
    import torch

    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    if position_ids is not None:
        starts = torch.cat([position_ids[:, 1:] == 0, torch.ones_like(position_ids[:, :1], dtype=torch.bool)], dim=1)
        targets = targets.masked_fill(starts, IGNORE)
    return targets
