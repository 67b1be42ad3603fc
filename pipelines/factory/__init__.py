"""The dataset factory: raw files -> gated, deduplicated, leak-free, split dataset versions.

``run(spec, registry)`` reads ``data.train`` on Ray Data (sharded reads, then the quality gates
and signatures as a plain-function ``map_batches``), removes training rows that leak any
``data.eval`` set (the same or a near row, or a prompt that repeats or embeds an eval prompt),
clusters exact and near duplicates (MinHash-LSH over records and prompts, driver side over signatures),
caps classes, splits by cluster and registers a ``dataset`` artifact: ``train/dev/test.jsonl``,
``rejected.jsonl`` (every rejected row with its ``reason``), ``eval/<name>.jsonl``, ``stats.json``,
and ``report.md``. Nothing is lost: ``input_rows == sum(accepted) + sum(rejected)``.

A rerun on the same input and spec makes byte-identical files; the registry already holding that
content (``inputs.content_hash``) is reused instead of registering a second version.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from pipelines.factory.split import SPLITS

GATE_BLOCK_ROWS = 2048


def file_sha256(path: str) -> str:
    from infra.registry import file_sha256 as sha

    return sha(path)[0]


def data_fingerprint(spec, registry=None) -> str:
    """What a dataset is made from: the data section, contract, length settings and file contents
    (and, given the registry, the request logs ``data.request_logs`` reads: new traffic, new data)."""
    from pipelines.factory.read import expand_sources

    try:
        files = expand_sources(spec.data.train)
    except FileNotFoundError:
        files = []
    doc = {"data": spec.to_dict()["data"], "contract": spec.to_dict()["contract"], "schema": spec.json_schema_doc(),
           "model": {k: spec.to_dict()["model"][k] for k in ("base", "max_seq_len", "system_prompt", "gguf_file")},
           "train_files": [file_sha256(f) for f in files],
           "eval_files": {k: file_sha256(v) for k, v in sorted(spec.data.eval.items()) if Path(v).is_file()}}
    if spec.data.request_logs is not None and registry is not None:
        from pipelines.factory.requestlogs import request_logs

        rl = spec.data.request_logs
        doc["request_logs"] = [m.id for m in request_logs(registry, rl.task or spec.task, rl.since)]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_json(spec, registry) -> tuple[str | None, str]:
    """(the base model's fast tokenizer as JSON, what was used) — or (None, why) to estimate lengths."""
    try:
        from pipelines.train.model import load_tokenizer_for

        tok, _, resolved = load_tokenizer_for(spec, registry)
        return tok.backend_tokenizer.to_str(), f"{spec.model.base} tokenizer"
    except Exception as e:  # a hub name offline, a missing folder: lengths are estimated, and the report says so
        why = f"{type(e).__name__}: {str(e)[:160]}"
    if Path(spec.model.base).is_dir():  # a tokenizer-only folder is enough to count tokens
        try:
            from pipelines.modeling import load_tokenizer

            return load_tokenizer(spec.model.base).backend_tokenizer.to_str(), f"{spec.model.base} tokenizer"
        except Exception as e:
            why = f"{type(e).__name__}: {str(e)[:160]}"
    return None, f"estimated at 3 characters per token ({why})"


def gate_config(spec, tok_json: str | None) -> dict:
    contract = spec.contract.model_dump(mode="json", by_alias=True)
    contract["schema"] = spec.json_schema_doc()  # inline, so workers on other nodes need no file
    cfg = {"contract": contract, "tokenizer_json": tok_json, "min_chars": spec.data.min_chars, "pii": spec.data.pii,
           "max_tokens": spec.model.max_seq_len, "system_prompt": spec.model.system_prompt,
           "balance_field": spec.data.balance_field, "leak_phrases": spec.data.leak_phrases,
           "num_perm": spec.data.dedupe.num_perm, "shingle": spec.data.dedupe.shingle}
    cfg["key"] = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    return cfg


def read_and_gate(files: list[str], names: dict[str, str], spec, cfg: dict, *, address: str | None = None,
                  progress: bool = True) -> list[dict]:
    """Stages 1-2 on Ray Data: every input row, parsed and gated, in input order."""
    from infra.ray_env import ensure_ray
    from pipelines.factory.gates import gate_batch
    from pipelines.factory.read import plan_shards, read_shard

    ray = ensure_ray(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    if not progress:  # quiet mode (--json): Ray Data's per-run INFO lines would mix into the output
        import logging

        logging.getLogger("ray.data").setLevel(logging.ERROR)
    shards = plan_shards(files, names)
    # Fractional CPUs: on 2 cores whole-CPU tasks starve each other (STACK-NOTES).
    ds = ray.data.from_items(shards, override_num_blocks=len(shards))
    ds = ds.flat_map(read_shard, fn_kwargs={"fmt": spec.data.format, "columns": spec.data.columns}, num_cpus=0.5)
    # One CSV or JSON file is one shard: cut its rows into blocks so both cores gate it.
    ds = ds.repartition(target_num_rows_per_block=GATE_BLOCK_ROWS)
    ds = ds.map_batches(gate_batch, fn_kwargs={"cfg": cfg}, batch_size=GATE_BLOCK_ROWS, batch_format="numpy", num_cpus=0.5)
    rows = ds.take_all()
    rows.sort(key=lambda r: r["order"])
    return rows


def read_eval_sets(spec, cfg: dict, names: dict[str, str]) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Each data.eval set as canonical records (with signatures); malformed eval rows are counted, not kept."""
    from pipelines.factory.gates import exact_key, prompt_features, prompt_key, scrub, signature_text, signatures
    from pipelines.factory.read import kind_of, read_shard

    sets, bad = {}, {}
    for name, path in sorted(spec.data.eval.items()):
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.eval.{name}: no such file {path}")
        shard = {"file_idx": 0, "path": path, "name": names.get(path, Path(path).name), "kind": kind_of(path),
                 "start": 0, "end": Path(path).stat().st_size, "first_line": 1}
        rows = read_shard(shard, fmt="auto", columns=spec.data.columns)
        records = [json.loads(r["record"]) for r in rows if r["record"]]
        bad[name] = len(rows) - len(records)
        # Signatures over the eval rows as the gates would leave them: training rows are compared
        # after PII scrubbing, so an eval row must be too, or a scrubbed copy would hide a leak.
        views = [[{**m, "content": scrub(m["content"])[0]} for m in r["messages"]] if cfg["pii"] != "keep"
                 else r["messages"] for r in records]
        sigs, shingle_sets = signatures([signature_text(v) for v in views], cfg["num_perm"], cfg["shingle"])
        feats = prompt_features(views, cfg["num_perm"])
        for j, (rec, view, sig, sh) in enumerate(zip(records, views, sigs, shingle_sets)):
            rec["_sig"] = {"exact": exact_key(view), "prompt": prompt_key(view), "minhash": sig, "shingles": sh,
                           **{k: v[j] for k, v in feats.items()}}
        sets[name] = records
    return sets, bad


def reason_key(reason: str) -> str:
    """The per-reason count a rejected row adds to: ``duplicate_of:<id>`` counts as ``duplicate``."""
    return "duplicate" if reason.startswith("duplicate_of:") else reason


def build(spec, registry, *, address: str | None = None, extra_sources: list[str] | None = None,
          progress: bool = True, log: Callable[[str], None] | None = None, augment: list[str] | None = None,
          extra_inputs: dict | None = None, extra_files: dict[str, bytes] | None = None) -> tuple[Any, dict]:
    """Run the factory; returns (dataset manifest, summary dict with the ``crucible factory --json`` keys).

    ``augment``: files of deliberate surface variants of training rows (``pipelines.factory.repair``):
    every gate and the eval leakage check apply, but not near-dedupe; they are kept out of the
    clustering (the other rows keep their clusters and splits), go to train, and are rejected when
    character-identical to another row or a near copy of a dev/test row. ``extra_inputs`` /
    ``extra_files`` are added to the manifest (a repair's lineage and rows)."""
    from pipelines.factory.dedupe import EvalIndex, find_duplicates
    from pipelines.factory.read import expand_sources, short_names
    from pipelines.factory.report import render_report
    from pipelines.factory.split import assign, cap_per_class

    log = log or (lambda msg: None)
    started = time.time()
    files = expand_sources(list(spec.data.train) + list(extra_sources or []))
    names = short_names(files + list(spec.data.eval.values()))
    log_ids: list[str] = []
    if spec.data.request_logs is not None:  # served traffic, read through the registry (the flywheel)
        from pipelines.factory.requestlogs import SOURCE_NAME, write_source

        if (found := write_source(spec, registry)) is not None:
            files.append(str(found[0]))
            names[str(found[0])], log_ids = SOURCE_NAME, found[1]
        log(f"request logs: {len(log_ids)} log(s) of {spec.data.request_logs.task or spec.task}")
    if not files:
        raise ValueError("data.train: no training files (give paths or globs, or data.request_logs with logged rows)")
    n_base = len(files)
    files += [str(Path(a).resolve()) for a in augment or []]
    names.update({f: f"augment:{Path(f).name}" for f in files[n_base:]})
    tok_json, tok_note = tokenizer_json(spec, registry)
    cfg = gate_config(spec, tok_json)
    log(f"reading {len(files)} file(s) on Ray Data; lengths: {tok_note}")
    rows = read_and_gate(files, names, spec, cfg, address=address, progress=progress)
    read_s = time.time() - started

    # Unique ids: a duplicated id (two files, or a careless source) gets its source appended.
    seen_ids: Counter = Counter()
    for r in rows:
        if r["record"]:
            rec = json.loads(r["record"])
            r["id"] = rec["id"] if seen_ids[rec["id"]] == 0 else f"{rec['id']}@{r['source']}"
            seen_ids[rec["id"]] += 1
        else:
            r["id"] = f"{Path(r['source'].rsplit(':', 1)[0]).stem}-{r['source'].rsplit(':', 1)[1]}"

    d = spec.data.dedupe
    evals, eval_bad = read_eval_sets(spec, cfg, names)
    live = [r for r in rows if not r["reason"]]
    leaked_by_set: Counter = Counter()
    if evals:
        index = EvalIndex(d.threshold, d.num_perm)
        for name, recs in evals.items():
            for rec in recs:
                index.add(name, rec["id"], **rec["_sig"])
        for r in live:
            if (hit := index.match(r)) is not None:
                r["reason"], r["detail"] = f"leaked:{hit[0]}", f"repeats eval row {hit[1]} of {hit[0]} ({hit[2]})"
                leaked_by_set[hit[0]] += 1
        live = [r for r in live if not r["reason"]]
    log(f"leakage: {sum(leaked_by_set.values())} training row(s) repeat an eval row")

    augmented = [r for r in live if r["order"] // 10**10 >= n_base]
    live = [r for r in live if r["order"] // 10**10 < n_base]
    # Clusters are always found (a split must keep near-duplicates together even when the spec
    # keeps them); data.dedupe.exact / .near decide only whether the non-representatives are rejected.
    dups = find_duplicates(live, exact=True, near=True, threshold=d.threshold, num_perm=d.num_perm)
    cluster_sizes: Counter = Counter()
    for i, r in enumerate(live):
        r["cluster"] = live[dups[i].of]["exact"] if i in dups else r["exact"]
    for i, dup in dups.items():
        rep = live[dup.of]
        cluster_sizes[rep["id"]] += 1
        if not (d.exact if dup.kind == "exact" else d.near):
            continue
        live[i]["reason"] = f"duplicate_of:{rep['id']}"
        live[i]["detail"] = f"{dup.kind} duplicate of {live[dup.via]['source']}" + \
                            (f" ({dup.why})" if dup.why else f" (Jaccard {dup.similarity:.2f})" if dup.kind == "near"
                             else "") + \
                            (f", in the cluster of {rep['source']}" if dup.via != dup.of else "")
    live = [r for r in live if not r["reason"]]
    log(f"dedupe: {len(dups)} duplicate(s) in {len(cluster_sizes)} cluster(s)")

    if spec.data.cap_per_class:
        over = cap_per_class([(i, r["label"], r["exact"]) for i, r in enumerate(live) if r["label"]],
                             spec.data.cap_per_class, spec.data.split.seed)
        for i in over:
            live[i]["reason"] = f"cap:{live[i]['label']}"
            live[i]["detail"] = f"class {live[i]['label']!r} is over data.cap_per_class={spec.data.cap_per_class}"
        live = [r for r in live if not r["reason"]]

    ratios = {s: getattr(spec.data.split, s) for s in SPLITS}
    for r in live:  # by cluster key: every member of a cluster lands in its representative's split
        r["split"] = assign(r["cluster"], ratios, spec.data.split.seed)

    if augmented:
        place_augmented(augmented, live, leaked_by_set, d)
        log(f"augment: {sum(1 for r in augmented if not r['reason'])} of {len(augmented)} variant row(s) kept")

    summary = summarize(rows, files, names, evals, eval_bad, leaked_by_set, cluster_sizes, tok_note, spec)
    with tempfile.TemporaryDirectory(prefix="crucible-factory-") as tmp:
        out = Path(tmp)
        write_files(out, rows, evals, summary, spec)
        for rel, data in (extra_files or {}).items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        (out / "report.md").write_text(render_report(summary, rows, spec))
        content_hash = _folder_hash(out)
        wall = time.time() - started
        figures = {**{k: summary[k] for k in ("input_rows", "accepted", "rejected", "duplicate_clusters", "leaked")},
                   "rows_per_s": round(summary["input_rows"] / wall, 1), "wall_s": round(wall, 2),
                   "read_and_gate_s": round(read_s, 2), "content_hash": content_hash}
        existing = [m for m in registry.list("dataset", spec.task) if m.inputs.get("content_hash") == content_hash]
        if existing:
            manifest, reused = existing[-1], True
        else:
            inputs = {"spec_hash": spec.spec_hash(), "data_fingerprint": data_fingerprint(spec, registry),
                      "content_hash": content_hash, "base_model": spec.model.base, "tokenizer": tok_note,
                      "sources": summary["sources"], "eval_sets": summary["eval_sets"],
                      **({"request_logs": log_ids} if log_ids else {}), **(extra_inputs or {})}
            manifest, reused = registry.add_directory("dataset", spec.task, out, inputs=inputs, metadata=figures), False
    return manifest, {"dataset": manifest.id, "reused": reused, **figures, "leaked_by_set": summary["leaked_by_set"],
                      "per_class": summary["per_class"]}


def place_augmented(augmented: list[dict], live: list[dict], leaked_by_set: Counter, d) -> None:
    """Variant rows (``build(augment=…)``) into train, or rejected: character-identical to a kept
    row or an earlier variant (``duplicate_of``), or a near copy of a dev/test row (``leaked:split:<s>``)."""
    from pipelines.factory.dedupe import EvalIndex

    held = EvalIndex(d.threshold, d.num_perm)
    for r in live:
        if r["split"] != "train":
            held.add(r["split"], r["id"], exact=r["exact"], prompt=r["prompt"], minhash=r["minhash"],
                     shingles=r.get("shingles"), pnorm=r.get("pnorm", ""), pgrams=r.get("pgrams", b""),
                     pminhash=r.get("pminhash", b""), answer=r.get("answer", ""))
    seen = {_text_key(r): r["id"] for r in live}
    for r in augmented:
        if (first := seen.get(key := _text_key(r))) is not None:
            r["reason"], r["detail"] = f"duplicate_of:{first}", "the same text as a kept row (character for character)"
            continue
        if (hit := held.match(r)) is not None:
            r["reason"], r["detail"] = f"leaked:split:{hit[0]}", f"repeats {hit[0]} row {hit[1]} ({hit[2]})"
            leaked_by_set[f"split:{hit[0]}"] += 1
            continue
        seen[key] = r["id"]
        r["split"], r["cluster"] = "train", r["exact"]


def _text_key(r: dict) -> str:
    msgs = json.loads(r["record"])["messages"]
    return hashlib.sha256(json.dumps([[m["role"], m["content"]] for m in msgs if m["role"] != "system"]).encode()).hexdigest()


def run(spec, registry, **kw):
    """The factory as a pipeline stage: returns the dataset ``Manifest``."""
    return build(spec, registry, **kw)[0]


def summarize(rows, files, names, evals, eval_bad, leaked_by_set, cluster_sizes, tok_note, spec) -> dict:
    accepted = Counter(r["split"] for r in rows if not r["reason"])
    rejected = Counter(reason_key(r["reason"]) for r in rows if r["reason"])
    per_file = Counter(r["order"] // 10**10 for r in rows)
    per_class: dict[str, Counter] = {s: Counter() for s in SPLITS}
    tokens: dict[str, list[int]] = {s: [] for s in SPLITS}
    for r in rows:
        if not r["reason"]:
            per_class[r["split"]][r["label"] or "(none)"] += 1
            tokens[r["split"]].append(int(r["tokens"]))
    return {
        "input_rows": len(rows),
        "accepted": {s: accepted.get(s, 0) for s in SPLITS},
        "rejected": dict(sorted(rejected.items())),
        "duplicate_clusters": len(cluster_sizes),
        "duplicates": sum(cluster_sizes.values()),
        "largest_clusters": cluster_sizes.most_common(5),
        "leaked": sum(leaked_by_set.values()),
        "leaked_by_set": dict(sorted(leaked_by_set.items())),
        "per_class": {s: dict(sorted(c.items())) for s, c in per_class.items()},
        "tokens": tokens,
        "sources": [{"path": names[f], "sha256": file_sha256(f), "rows": per_file.get(i, 0)} for i, f in enumerate(files)],
        "eval_sets": {k: {"rows": len(v), "malformed": eval_bad[k], "sha256": file_sha256(spec.data.eval[k])}
                      for k, v in evals.items()},
        "length_measure": tok_note if "estimated" in tok_note else f"tokens ({tok_note})",
        "split": {s: getattr(spec.data.split, s) for s in SPLITS} | {"seed": spec.data.split.seed},
        "dedupe": spec.data.dedupe.model_dump(),
        "pii": spec.data.pii,
    }


def _rejected_row(r: dict) -> dict:
    if r["record"]:
        return {**json.loads(r["record"]), "source": r["source"], "reason": r["reason"], "detail": r["detail"]}
    return {"id": r["id"], "source": r["source"], "reason": r["reason"], "detail": r["detail"], "raw": r["raw"]}


def write_files(out: Path, rows: list[dict], evals: dict, summary: dict, spec) -> None:
    handles = {s: open(out / f"{s}.jsonl", "w") for s in (*SPLITS, "rejected")}
    try:
        for r in rows:
            if r["reason"]:
                handles["rejected"].write(json.dumps(_rejected_row(r), ensure_ascii=False) + "\n")
            else:
                rec = json.loads(r["record"])
                rec["id"] = r["id"]
                handles[r["split"]].write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        for h in handles.values():
            h.close()
    if evals:
        (out / "eval").mkdir()
        for name, recs in evals.items():
            with open(out / "eval" / f"{name}.jsonl", "w") as f:
                for rec in recs:
                    f.write(json.dumps({k: v for k, v in rec.items() if k != "_sig"}, ensure_ascii=False) + "\n")
    stats = {k: v for k, v in summary.items() if k != "tokens"}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))


def _folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:32]
