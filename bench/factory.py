"""Factory benchmark: 100k rows from ../shared with planted exact and near duplicates.

    python -m bench.factory [--rows 100000] [--out bench/results]

Builds the input (known ground truth: every row belongs to a "family", an original and its
planted copies), then measures in the same run:
- rows/s of the whole factory (Ray Data read + gates on this machine's cores, then leakage,
  dedupe, split, report, registry write), and of a straightforward single-process loop over the
  same read and gate functions plus the same dedupe (the ratio is factory ÷ single-process);
- near-duplicate recall (planted near copies caught) and precision (caught near duplicates whose
  kept row is of the same family), at the spec's default threshold;
- peak memory: the driver's, and the sum over Ray's worker processes (sampled);
- on realistic messy support data (``bench.messy``: 690 rows, planted near duplicates made by
  real edits, leaks of a held-out eval set, bad rows): near-duplicate and leak recall, originals
  wrongly rejected, eval messages left verbatim in the accepted rows, nothing lost (``messy``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def base_rows() -> list[tuple[str, str]]:
    rows = []
    with open(SHARED / "datasets" / "customer-support" / "support.csv", newline="") as f:
        rows += [(r["instruction"], r["response"]) for r in csv.DictReader(f)]
    for r in json.loads((SHARED / "datasets" / "instructions" / "instruction-data.json").read_text()):
        rows.append((r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""), r["output"]))
    return rows


def true_jaccard(a: list[dict], b: list[dict], n: int = 3) -> float:
    """Exact Jaccard of two chats' shingle sets, shingled as the factory shingles them."""
    from pipelines.factory.gates import shingle_hashes, signature_text

    sa, sb = (set(shingle_hashes(signature_text(m), n).tolist()) for m in (a, b))
    return len(sa & sb) / len(sa | sb)


def chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def build_input(path: Path, n: int, seed: int = 0, near_min: float = 0.85) -> dict[str, dict]:
    """Write n rows; returns {row id: {"family", "kind"}} with kind original / exact / near.

    Near copies have two words of the answer replaced; a copy is planted only when its exact
    shingle Jaccard with the original is at least ``near_min`` (short rows are retried with
    another family), so the ground truth is "really a near duplicate at the default threshold"
    and recall measures the MinHash-LSH search, not how the copies were made."""
    rng = random.Random(seed)
    base = base_rows()
    vocab = sorted({w for u, a in base for w in a.split() if w.isalpha() and len(w) > 3})
    n_orig = int(n * 0.8)
    n_exact = (n - n_orig) // 2
    rows, truth = [], {}
    for k in range(n_orig):
        (u1, a1), (u2, a2) = rng.sample(base, 2)
        # Random words on both sides keep two originals that share a source row apart (otherwise
        # such pairs really are near duplicates, and precision against the planted truth would
        # count correct catches as errors).
        user = f"{u1} {u2} ref {' '.join(rng.choices(vocab, k=8))}"
        answer = " ".join(a1.split()[:40] + a2.split()[:40] + rng.choices(vocab, k=8))
        rows.append((f"o{k}", user, answer))
        truth[f"o{k}"] = {"family": k, "kind": "original"}
    jaccards = []
    for c in range(n - n_orig):
        while True:
            fam = rng.randrange(n_orig)
            _, user, answer = rows[fam]
            if c < n_exact:  # exact after normalisation: case and whitespace only
                user, answer, kind = "  " + user.upper(), answer.replace(" ", "  "), "exact"
                break
            words = answer.split()
            for i in rng.sample(range(len(words)), min(2, len(words))):
                words[i] = rng.choice(vocab)
            j = true_jaccard(chat(user, answer), chat(user, " ".join(words)))
            if near_min <= j < 1.0:
                answer, kind = " ".join(words), "near"
                jaccards.append(j)
                break
        rows.append((f"c{c}", user, answer))
        truth[f"c{c}"] = {"family": fam, "kind": kind}
    rng.shuffle(rows)
    with open(path, "w") as f:
        for rid, user, answer in rows:
            f.write(json.dumps({"id": rid, "messages": chat(user, answer)}) + "\n")
    truth["_near_jaccard"] = {"min": round(min(jaccards), 3), "mean": round(sum(jaccards) / len(jaccards), 3)} \
        if jaccards else {}
    return truth


class MemorySampler(threading.Thread):
    """Peak summed RSS of this process and Ray's processes (raylet, workers, GCS), sampled every 0.5 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb, self.stop = 0.0, threading.Event()

    def run(self):
        import psutil

        while not self.stop.is_set():
            total = 0
            for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if p.info["pid"] == os.getpid() or "ray::" in cmd or "/ray/" in cmd or "raylet" in cmd:
                    total += p.info["memory_info"].rss if p.info["memory_info"] else 0
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self.stop.wait(0.5)


def single_process(spec, path: str, cfg: dict) -> tuple[float, dict]:
    """The same read, gates and dedupe in one plain Python loop: the baseline."""
    import numpy as np

    from pipelines.factory.dedupe import find_duplicates
    from pipelines.factory.gates import gate_batch
    from pipelines.factory.read import plan_shards, read_shard

    t = time.time()
    rows = []
    for shard in plan_shards([path], {path: Path(path).name}):
        rows += read_shard(shard, fmt="auto", columns={})
    out = []
    for i in range(0, len(rows), 2048):
        chunk = rows[i:i + 2048]
        batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        res = gate_batch(batch, cfg)
        out += [dict(zip(res, vals)) for vals in zip(*res.values())]
    live = [r for r in out if not r["reason"]]
    d = spec.data.dedupe
    dups = find_duplicates(live, exact=d.exact, near=d.near, threshold=d.threshold, num_perm=d.num_perm)
    return time.time() - t, {"rows": len(out), "duplicates": len(dups)}


def score(rejected: list[dict], truth: dict) -> dict:
    caught = {}
    for r in rejected:
        if r["reason"].startswith("duplicate_of:"):
            caught[r["id"]] = (r["reason"].split(":", 1)[1], "near" if "near" in r["detail"] else "exact")
    fam = lambda rid: truth[rid]["family"]
    planted_near = [rid for rid, t in truth.items() if t["kind"] == "near"]
    planted_exact = [rid for rid, t in truth.items() if t["kind"] == "exact"]
    # A planted copy may be kept and its original rejected instead (input order decides): a family
    # counts as caught when all but one of its members are rejected as duplicates of the family.
    families: dict[int, list[str]] = {}
    for rid, t in truth.items():
        families.setdefault(t["family"], []).append(rid)
    def family_caught(rid):
        members = families[fam(rid)]
        return sum(1 for m in members if m in caught and fam(caught[m][0]) == fam(rid)) == len(members) - 1
    near_pairs = [(rid, of) for rid, (of, kind) in caught.items() if kind == "near"]
    return {"near_recall": round(sum(map(family_caught, planted_near)) / max(1, len(planted_near)), 4),
            "exact_recall": round(sum(map(family_caught, planted_exact)) / max(1, len(planted_exact)), 4),
            "near_precision": round(sum(fam(a) == fam(b) for a, b in near_pairs) / max(1, len(near_pairs)), 4),
            "all_duplicate_precision": round(sum(fam(a) == fam(of) for a, (of, _) in caught.items()) / max(1, len(caught)), 4),
            "planted": {"near": len(planted_near), "exact": len(planted_exact)}, "caught": len(caught)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    from bench.run import local_env

    local_env()
    from infra.ray_env import ensure_ray
    from infra.registry import Registry
    from pipelines.factory import build, gate_config, tokenizer_json
    from pipelines.spec import spec_from_dict

    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp:
        data = Path(tmp) / "input.jsonl"
        truth = build_input(data, args.rows)
        near_jaccard = truth.pop("_near_jaccard")
        spec = spec_from_dict({"task": "bench", "model": {"base": str(SHARED / "tokenizers" / "smollm2-135m-instruct"),
                                                          "max_seq_len": 1024}, "data": {"train": [str(data)]}})
        reg = Registry.open(f"file://{tmp}/registry")
        ensure_ray()  # started before the clock: Ray's start-up is not the factory's throughput
        sampler = MemorySampler()
        sampler.start()
        t = time.time()
        manifest, summary = build(spec, reg, progress=False)
        factory_s = time.time() - t
        sampler.stop.set()
        rejected = [json.loads(l) for l in reg.read_file(manifest.id, "rejected.jsonl").splitlines()]
        quality = score(rejected, truth)
        cfg = gate_config(spec, tokenizer_json(spec, reg)[0])
        base_s, base = single_process(spec, str(data), cfg)
    result = {"name": "factory", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
              "rows": args.rows, "factory_s": round(factory_s, 1), "factory_rows_per_s": round(args.rows / factory_s),
              "single_process_s": round(base_s, 1), "single_process_rows_per_s": round(args.rows / base_s),
              "speedup_vs_single_process": round(base_s / factory_s, 2), "threshold": spec.data.dedupe.threshold,
              **quality, "planted_near_true_jaccard": near_jaccard, "rejected": summary["rejected"], "accepted": summary["accepted"],
              "duplicate_clusters": summary["duplicate_clusters"],
              "peak_driver_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "peak_ray_total_rss_mb": round(sampler.peak_mb), "baseline_check": base}
    result["messy"] = messy()
    from bench.run import save

    save("factory", result, args.out)


def messy(seed: int = 0) -> dict:
    """The factory on ``bench.messy``'s planted faults: recall, precision, nothing lost."""
    from bench.messy import build_messy, score_messy
    from infra.registry import Registry
    from pipelines.factory import build
    from pipelines.spec import spec_from_dict

    with tempfile.TemporaryDirectory(prefix="crucible-bench-messy-") as tmp:
        truth = build_messy(SHARED / "datasets" / "customer-support" / "support.csv", tmp, seed=seed)
        spec = spec_from_dict({"task": "messy", "contract": {"type": "json",
                                                             "schema": str(ROOT / "examples" / "support-triage" / "schema.json")},
                               "model": {"base": str(SHARED / "tokenizers" / "smollm2-135m-instruct"), "max_seq_len": 256},
                               "data": {"train": [f"{tmp}/train.jsonl"], "eval": {"held": f"{tmp}/eval.jsonl"}}})
        reg = Registry.open(f"file://{tmp}/registry")
        manifest, _ = build(spec, reg, progress=False)
        read = lambda name: [json.loads(l) for l in reg.read_file(manifest.id, name).decode().splitlines()]
        accepted = sum((read(f"{s}.jsonl") for s in ("train", "dev", "test")), [])
        evals = [json.loads(l) for l in Path(f"{tmp}/eval.jsonl").read_text().splitlines()]
        s = score_messy(truth, accepted, read("rejected.jsonl"), evals)
    return {**s, "near_recall": round(s["near_caught"] / s["near_planted"], 4),
            "leak_recall": round(s["leaks_caught"] / s["leaks_planted"], 4),
            "originals_kept_share": round(1 - s["originals_rejected"] / s["originals"], 4), "seed": seed}


if __name__ == "__main__":
    main()
