"""report.md: what a person reads to trust (or distrust) a dataset version."""

from __future__ import annotations

import json

from pipelines.factory.split import SPLITS

EXAMPLES_PER_REASON = 2


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def histogram(values: list[int], bins: int = 8, width: int = 30) -> str:
    """A text histogram (fixed-width bars), fenced, for token lengths."""
    if not values:
        return "_(no rows)_"
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for v in values:
        counts[min((v - lo) // step, bins - 1)] += 1
    top = max(counts)
    lines = [f"{lo + i * step:>6}-{lo + (i + 1) * step - 1:<6} {'█' * round(width * c / top):<{width}} {c}"
             for i, c in enumerate(counts) if c or i < bins]
    return "```\n" + "\n".join(lines) + "\n```"


def _clip(text: str, n: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def render_report(s: dict, rows: list[dict], spec) -> str:
    total_acc, total_rej = sum(s["accepted"].values()), sum(s["rejected"].values())
    out = [f"# Dataset report: {spec.task}", "",
           f"{s['input_rows']} input rows → **{total_acc} accepted**, {total_rej} rejected "
           f"({total_rej / max(1, s['input_rows']):.1%}). Every input row is in exactly one file.", "",
           "## Sources", "", _table(["file", "rows", "sha256"], [[x["path"], x["rows"], x["sha256"][:16]] for x in s["sources"]]),
           "", "## Accepted per split", "",
           _table(["split", "rows", "ratio asked"], [[k, s["accepted"][k], s["split"][k]] for k in SPLITS]),
           f"\nSplit by near-duplicate cluster with seed {s['split']['seed']}: a cluster never straddles splits.", "",
           "## Rejected per reason", ""]
    if s["rejected"]:
        out.append(_table(["reason", "rows"], [[k, v] for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1])]))
        out += ["", "Examples:", ""]
        shown: dict[str, int] = {}
        ex_rows = []
        for r in rows:
            key = "duplicate" if r["reason"].startswith("duplicate_of:") else r["reason"]
            if r["reason"] and shown.get(key, 0) < EXAMPLES_PER_REASON:
                shown[key] = shown.get(key, 0) + 1
                text = _first_user(r) if r["record"] else r["raw"]
                ex_rows.append([key, r["source"], _clip(r["detail"], 80), _clip(text, 80)])
        out.append(_table(["reason", "source", "detail", "row"], ex_rows))
    else:
        out.append("None.")
    d = s["dedupe"]
    out += ["", "## Duplicates", "",
            f"{s['duplicates']} duplicate row(s) in {s['duplicate_clusters']} cluster(s) (exact: normalised text hash; "
            f"near: MinHash-LSH, {d['num_perm']} permutations, {d['shingle']}-word shingles, Jaccard ≥ {d['threshold']}). "
            + ("The first row of each cluster is kept; the others are rejected as `duplicate_of:<id>`."
             if d["exact"] and d["near"] else
             f"Rejected as duplicates: {'exact' if d['exact'] else 'none'}{' and near' if d['near'] else ''}; "
             "kept duplicates stay in their cluster's split.")]
    if s["largest_clusters"]:  # the cluster's first row (kept unless a later gate removed it)
        out += ["", _table(["kept row", "other rows in cluster"], [[k, v] for k, v in s["largest_clusters"]])]
    out += ["", "## Eval sets and leakage", ""]
    if s["eval_sets"]:
        out.append(_table(["eval set", "rows", "malformed (dropped)", "training rows removed as leaks"],
                          [[k, v["rows"], v["malformed"], s["leaked_by_set"].get(k, 0)] for k, v in s["eval_sets"].items()]))
        out.append("\nEval sets are never trained on; training rows repeating an eval row (exactly, with the same "
                   "prompt, or nearly) are rejected as `leaked:<set>`.")
    else:
        out.append("No eval sets in data.eval: nothing to check for leakage.")
    field = spec.data.balance_field or ("label" if spec.contract.type == "label" else None)
    out += ["", f"## Balance{f' by {field}' if field else ''}", ""]
    classes = sorted({c for split in s["per_class"].values() for c in split})
    if field and classes:
        out.append(_table(["class", *SPLITS], [[c, *(s["per_class"][sp].get(c, 0) for sp in SPLITS)] for c in classes]))
        if spec.data.cap_per_class:
            out.append(f"\nCapped at {spec.data.cap_per_class} rows per class (rows over it: `cap:<class>`).")
    else:
        out.append("No balance field (set data.balance_field to count rows per intent or category).")
    out += ["", f"## Length ({s['length_measure']})", ""]
    for split in SPLITS:
        vals = s["tokens"][split]
        if vals:
            vals_sorted = sorted(vals)
            out += [f"**{split}**: median {vals_sorted[len(vals) // 2]}, max {vals_sorted[-1]} "
                    f"(limit {spec.model.max_seq_len})", "", histogram(vals), ""]
    out += ["## Settings", "", "```json",
            json.dumps({"pii": s["pii"], "min_chars": spec.data.min_chars, "dedupe": d, "split": s["split"]}, indent=2),
            "```", ""]
    return "\n".join(out)


def _first_user(r: dict) -> str:
    rec = json.loads(r["record"])
    return next((m["content"] for m in rec["messages"] if m["role"] == "user"), "")
