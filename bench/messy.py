"""A messy support-triage input with planted faults and known ground truth, like real data.

    build_messy(rows_csv, out_dir, seed=0) -> truth

From the customer-support CSV (templated variations of real support messages, 3-15 words): an eval
set of held-out messages, and a training file of distinct originals plus planted faults:

- near duplicates of training originals made by the edits real users make: a courtesy word
  appended ("… please", "… thanks"), a capital letter and "!!", a typo (letters swapped, one
  dropped or doubled), a greeting in front, "??" for "?", several of these at once;
- leaks: eval messages in the training file verbatim, re-cased, with an appended word, with a typo,
  or embedded in a longer message ("Hi, … My order came yesterday.");
- rows every factory must reject with a reason: bad JSON, an empty answer, a contract-invalid answer.

``truth`` maps every training row id to its kind (original / near / leak / bad) and, for near
copies and leaks, the row they copy. Originals are distinct after normalisation, but the CSV's own
rows include real near-duplicates of each other ("need help …" / "i need help …"): a rejected
original is reported with the row that caught it, so a reader can judge it.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

COURTESY_TAILS = (" please", " thanks", " thank you", " pls", " thanks!!", " please help", " asap")
GREETINGS = ("hi, ", "Hello! ", "hey ", "Hi team, ")
EMBED = ("Hi, {m}. My order came yesterday and I am not happy about it.",
         "Quick question before I call you: {m}",
         "{m} - sent from my phone, sorry for the short message",
         "Hello support team, I have been a customer for years. {m}? Thanks in advance")


def triage(row: dict, rid: str, message: str) -> dict:
    entity = {"type": row["entity_type"], "value": row["entity_value"]} if row.get("entity_type") else None
    answer = {"intent": row["intent"], "category": row["category"], "entity": entity}
    return {"id": rid, "messages": [{"role": "user", "content": message},
                                    {"role": "assistant", "content": json.dumps(answer, separators=(", ", ": "))}],
            "meta": {"intent": row["intent"], "category": row["category"]}}


def typo(message: str, rng: random.Random) -> str:
    """One realistic typo in a word of 4+ letters (never in a number): swap, drop or double a letter."""
    words = message.split(" ")
    choices = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not choices:
        return message + "!"
    i = rng.choice(choices)
    w = words[i]
    k = rng.randrange(1, len(w) - 1)
    kind = rng.choice(("swap", "drop", "double"))
    if kind == "swap" and w[k] != w[k + 1]:
        w = w[:k] + w[k + 1] + w[k] + w[k + 2:]
    elif kind == "drop":
        w = w[:k] + w[k + 1:]
    else:
        w = w[:k] + w[k] + w[k:]
    words[i] = w
    return " ".join(words)


def edit(message: str, rng: random.Random) -> tuple[str, str]:
    """One or two realistic edits of a message, and their names."""
    kinds = rng.sample(("courtesy", "shout", "typo", "greeting", "punct"), rng.choice((1, 1, 2)))
    for kind in kinds:
        if kind == "courtesy":
            message = message.rstrip("?.!") + rng.choice(COURTESY_TAILS)
        elif kind == "shout":
            message = message[:1].upper() + message[1:].rstrip("?.!") + "!!"
        elif kind == "typo":
            message = typo(message, rng)
        elif kind == "greeting":
            message = rng.choice(GREETINGS) + message
        else:
            message = message.rstrip("?.!") + rng.choice(("??", "?!", "...", " ?"))
    return message, "+".join(kinds)


def leak(message: str, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("verbatim", "case", "courtesy", "typo", "embedded", "embedded"))
    if kind == "verbatim":
        return message, kind
    if kind == "case":
        return message.upper() if rng.random() < 0.5 else message.capitalize(), kind
    if kind == "courtesy":
        return message.rstrip("?.!") + rng.choice(COURTESY_TAILS), kind
    if kind == "typo":
        return typo(message, rng), kind
    return rng.choice(EMBED).format(m=message.rstrip("?.!")), kind


def norm(text: str) -> str:
    from pipelines.factory.similar import norm_message

    return norm_message(text)


def build_messy(rows_csv: str | Path, out_dir: str | Path, *, seed: int = 0, originals: int = 620, n_eval: int = 80,
                n_near: int = 20, n_leak: int = 15, n_bad: int = 35) -> dict:
    """Writes ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; returns the ground truth."""
    rng = random.Random(seed)
    with open(rows_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng.shuffle(rows)
    picked, seen = [], set()
    for r in rows:  # distinct after normalisation (the CSV repeats some messages)
        key = norm(r["instruction"])
        if key not in seen and len(key.split()) >= 2:
            seen.add(key)
            picked.append(r)
    evals, pool = picked[:n_eval], picked[n_eval:n_eval + originals]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth: dict[str, dict] = {}
    train: list[dict | str] = []
    for i, r in enumerate(pool):
        train.append(triage(r, f"o{i}", r["instruction"]))
        truth[f"o{i}"] = {"kind": "original", "text": r["instruction"]}
    for i in range(n_near):
        j = rng.randrange(len(pool))
        message, how = edit(pool[j]["instruction"], rng)
        train.append(triage(pool[j], f"n{i}", message))
        truth[f"n{i}"] = {"kind": "near", "of": f"o{j}", "edit": how, "text": message}
    for i, j in enumerate(rng.sample(range(len(evals)), n_leak)):
        message, how = leak(evals[j]["instruction"], rng)
        train.append(triage(evals[j], f"l{i}", message))
        truth[f"l{i}"] = {"kind": "leak", "of": f"e{j}", "edit": how, "text": message}
    for i in range(n_bad):
        r = rng.choice(pool)
        kind = ("bad_json", "empty_answer", "contract")[i % 3]
        rec = triage(r, f"b{i}", r["instruction"] + f" (case {i})")
        if kind == "bad_json":
            train.append(json.dumps(rec)[:-7])
        else:
            rec["messages"][1]["content"] = "" if kind == "empty_answer" else "I think this is about an order."
            train.append(rec)
        truth[f"b{i}"] = {"kind": "bad", "why": kind}
    rng.shuffle(train)
    with open(out / "train.jsonl", "w") as f:
        for rec in train:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    with open(out / "eval.jsonl", "w") as f:
        for j, r in enumerate(evals):
            f.write(json.dumps(triage(r, f"e{j}", r["instruction"])) + "\n")
    return truth


def score_messy(truth: dict, accepted: list[dict], rejected: list[dict], eval_rows: list[dict]) -> dict:
    """Recall on planted near duplicates and leaks, wrongly rejected originals, verbatim eval
    messages left in the accepted rows, and the nothing-lost count."""
    rej = {r.get("id", ""): r for r in rejected}
    acc = {r["id"]: r for r in accepted}
    near = [k for k, t in truth.items() if t["kind"] == "near"]
    leaks = [k for k, t in truth.items() if t["kind"] == "leak"]

    def near_caught(k: str) -> bool:  # this copy or its original rejected as a duplicate of the other
        of = truth[k]["of"]
        return any(a in rej and rej[a]["reason"].startswith("duplicate_of:") and rej[a]["reason"].split(":", 1)[1] in (b, k, of)
                   for a, b in ((k, of), (of, k)))

    # A copy of an original that itself leaks an eval row is rejected as that leak, with it: caught too.
    leaked = lambda k: k in rej and rej[k]["reason"].startswith("leaked:")
    near_hit = [k for k in near if near_caught(k) or (leaked(k) and leaked(truth[k]["of"]))]
    leak_hit = [k for k in leaks if k in rej and rej[k]["reason"].startswith("leaked:")]
    wrong = [{"id": k, "text": truth[k]["text"], "reason": rej[k]["reason"], "detail": rej[k]["detail"]}
             for k, t in truth.items() if t["kind"] == "original" and k in rej]
    wrong_distinct = [w for w in wrong if not any(w["id"] == truth[n]["of"] for n in near)]
    eval_norm = [norm(e["messages"][0]["content"]) for e in eval_rows]
    verbatim = [(r["id"], e) for r in accepted for e in eval_norm
                if f" {e} " in f" {norm(' '.join(m['content'] for m in r['messages'] if m['role'] == 'user'))} "]
    bad_rejected = sum(1 for k, t in truth.items() if t["kind"] == "bad" and (k in rej or k not in acc))
    return {"near_planted": len(near), "near_caught": len(near_hit),
            "near_missed": [{"id": k, **truth[k], "original": truth[truth[k]["of"]]["text"]}
                            for k in near if k not in near_hit],
            "leaks_planted": len(leaks), "leaks_caught": len(leak_hit),
            "leaks_missed": [{"id": k, **truth[k]} for k in leaks if k not in leak_hit],
            "originals": sum(1 for t in truth.values() if t["kind"] == "original"),
            "originals_rejected": len(wrong_distinct), "originals_rejected_examples": wrong_distinct[:10],
            "eval_verbatim_in_accepted": len(verbatim),
            "bad_planted": sum(1 for t in truth.values() if t["kind"] == "bad"), "bad_rejected": bad_rejected,
            "rows_in": len(truth), "rows_out": len(accepted) + len(rejected)}
