"""Served traffic as a factory source, and the lineage from one served answer back to its training rows.

Serving writes its request log to the registry (``deployment`` manifests with ``metadata.type =
"request_log"`` and one ``requests.jsonl``; rows carry ``messages`` ending with the served answer,
PII already scrubbed, and ``model``: the id of the model that answered). The factory reads those
manifests through the registry — never through serving's code — and turns the rows into one JSONL
source: every row, with an id naming its log and position, so that the dataset's manifest lists
the logs it was made from (``inputs.request_logs``) and ``registry show --lineage`` walks from the
dataset to the logs, and from each log to the models that answered, their runs and datasets.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

SOURCE_NAME = "request-logs.jsonl"


def since_epoch(since: float | str | None) -> float | None:
    if since is None or isinstance(since, (int, float)):
        return since
    return datetime.fromisoformat(since).timestamp()


def request_logs(registry, task: str, since: float | str | None = None) -> list:
    """The task's request-log manifests holding rows logged at or after ``since``, oldest first."""
    t = since_epoch(since)
    return [m for m in registry.list("deployment", task) if m.metadata.get("type") == "request_log"
            and (t is None or m.metadata.get("last_ts", float("inf")) >= t)]


def log_rows(registry, log_id: str) -> list[dict]:
    return [json.loads(line) for line in registry.read_file(log_id, "requests.jsonl").decode().splitlines() if line]


def write_source(spec, registry) -> tuple[Path, list[str]] | None:
    """``data.request_logs`` as one JSONL file (in the registry's cache, named by its content) and
    the ids of the logs read; None when there are no logs since then. Rows logged before ``since``
    inside a log that straddles it are left out, and counted nowhere (they are not this input)."""
    cfg = spec.data.request_logs
    logs = request_logs(registry, cfg.task or spec.task, cfg.since)
    if not logs:
        return None
    t = since_epoch(cfg.since)
    lines = []
    for m in logs:
        for n, row in enumerate(log_rows(registry, m.id), start=1):
            if t is not None and row.get("ts", 0) < t:
                continue
            meta = {"request_log": m.id, "row": n, "model": row.get("model"), "served_valid": row.get("valid"),
                    "status": row.get("status")}
            lines.append(json.dumps({"id": f"{m.id}#{n}", "messages": row.get("messages", []), "meta": meta},
                                    ensure_ascii=False))
    if cfg.label != "none":
        lines = [json.dumps(r, ensure_ascii=False) for r in relabel(spec, registry, [json.loads(x) for x in lines])]
    data = ("\n".join(lines) + "\n").encode()
    folder = Path(registry.cache_dir) / "request-logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.jsonl"
    if not path.exists():
        path.write_bytes(data)
    return path, [m.id for m in logs]


def relabel(spec, registry, rows: list[dict]) -> list[dict]:
    """``label: teacher``: data.teacher answers each logged prompt (under the contract's guide), the
    served answer kept as ``meta.served_answer``; ``label: judge``: eval.judge scores each served
    answer 0-100 (``meta.judged``), and the gates reject those under ``min_score`` or unscored."""
    cfg = spec.data.request_logs
    todo = [r for r in rows if len(r["messages"]) >= 2 and r["messages"][-1].get("role") == "assistant"]
    new = {id(r): n for r, n in zip(todo, _relabel(spec, registry, cfg, todo))}
    return [new.get(id(r), r) for r in rows]  # a row without a served answer goes on as logged: the gates say why


def _relabel(spec, registry, cfg, rows: list[dict]) -> list[dict]:
    from pipelines.engines import GenParams, get_engine

    prompts = [r["messages"][:-1] for r in rows]
    if cfg.label == "teacher":
        t = spec.data.teacher
        if t is None:
            raise ValueError("data.request_logs.label: 'teacher' needs data.teacher (the engine that answers)")
        from pipelines.guide import guide_for

        engine = get_engine(t.engine, model=t.model, url=t.url, registry=registry, api_key_env=t.api_key_env)
        # the teacher labels under the contract whatever eval/serving do: a label must be a valid answer
        c = spec.contract
        guide = guide_for(c.model_copy(update={"constrained_decoding": True})) if c.type in ("json", "label") else None
        params = GenParams(max_new_tokens=t.max_new_tokens, temperature=0.0, guide=guide)
        outs = engine.generate(prompts, params) if rows else []
        return [{**r, "messages": p + [{"role": "assistant", "content": o.text}],
                 "meta": {**r["meta"], "label": "teacher", "served_answer": r["messages"][-1]["content"]}}
                for r, p, o in zip(rows, prompts, outs)]
    j = spec.eval.judge
    if j is None:
        raise ValueError("data.request_logs.label: 'judge' needs eval.judge (the engine that scores)")
    from pipelines.evaluate.judge import judge

    engine = get_engine(j.engine, model=j.model, url=j.url, registry=registry, api_key_env=j.api_key_env)
    items = [("\n".join(m["content"] for m in p if m["role"] == "user"), "(no reference: judge the response itself)",
              r["messages"][-1]["content"]) for r, p in zip(rows, prompts)]
    verdicts = judge(engine, items, rubric=j.rubric) if rows else []
    return [{**r, "meta": {**r["meta"], "label": "judge",
                           "judged": {"score": v["judge"], "min": cfg.min_score,
                                      "passed": v["judge"] is not None and v["judge"] >= cfg.min_score}}}
            for r, v in zip(rows, verdicts)]


def answer_lineage(registry, log_id: str, row: int) -> dict:
    """From one logged answer (``row``, 1-based, of request log ``log_id``) back to what taught it:
    the model that answered, its run, its dataset, and that dataset's training rows."""
    logged = log_rows(registry, log_id)
    if not 1 <= row <= len(logged):
        raise ValueError(f"{log_id}: has rows 1..{len(logged)}, not {row}")
    entry = logged[row - 1]
    model = registry.get(entry["model"])
    run = registry.get(model.inputs["run"]) if model.inputs.get("run") else None
    dataset_id = model.inputs.get("dataset")
    train = []
    if dataset_id:
        train = [json.loads(line) for line in registry.read_file(dataset_id, "train.jsonl").decode().splitlines() if line]
    return {"request_log": log_id, "row": row, "answer": entry["messages"][-1]["content"] if entry.get("messages") else None,
            "model": model.id, "run": run.id if run else None, "dataset": dataset_id,
            "training_rows": len(train), "training_row_ids": [r["id"] for r in train]}
