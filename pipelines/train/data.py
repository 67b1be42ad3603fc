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


def encode_records(tokenizer, records: list[dict], max_len: int, system_prompt: str | None = None
                   ) -> tuple[list[Encoded], dict]:
    """Encode every record; drop those with nothing to learn (no assistant token left after truncation)."""
    kept, dropped, truncated = [], 0, 0
    for row in records:
        enc = encode_chat(tokenizer, with_system_prompt(row["messages"], system_prompt), max_len)
        truncated += enc.truncated
        if enc.trained_tokens == 0:
            dropped += 1
            continue
        kept.append(enc)
    return kept, {"examples": len(kept), "dropped_no_target": dropped, "truncated": truncated}


def pack(examples: list[Encoded], max_len: int) -> list[dict]:
    """Greedy first-fit packing into rows of at most ``max_len`` tokens, in the given order."""
    rows: list[dict] = []
    for ex in examples:
        n = len(ex.input_ids)
        for row in rows:  # first row with room
            if len(row["input_ids"]) + n <= max_len:
                break
        else:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += ex.input_ids
        row["labels"] += ex.labels
        row["position_ids"] += list(range(n))
    return rows


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
    batch = {"input_ids": ids, "labels": labels, "real_tokens": int(real.sum()), "total_tokens": ids.numel()}
    if packed:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = real
    return batch


def shift_labels(labels, position_ids=None):
    """Targets aligned with logits: position t predicts token t+1; the last position predicts
    nothing, and in a packed row the last token of one example never predicts the next example."""
    import torch

    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    if position_ids is not None:
        starts = torch.cat([position_ids[:, 1:] == 0, torch.ones_like(position_ids[:, :1], dtype=torch.bool)], dim=1)
        targets = targets.masked_fill(starts, IGNORE)
    return targets
