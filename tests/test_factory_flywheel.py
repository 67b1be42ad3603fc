"""The flywheel end to end: a trained model serves real HTTP traffic, the request log is flushed to
the registry, the factory builds a dataset version from it (deduplicated against training, leaks of
the eval set removed), and one logged answer's lineage leads back to the rows that trained it."""

from __future__ import annotations

import json

import pytest

TOKEN = "flywheel-admin-token"


def parity(prompt: str) -> str:
    return "odd" if int(prompt.split()[-1]) % 2 else "even"


def rows_file(path, prompts):
    path.write_text("".join(json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": p},
                                                                      {"role": "assistant", "content": parity(p)}]}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


@pytest.mark.slow
def test_served_answers_become_a_dataset_with_lineage(ray_local, tiny_model, tmp_path, monkeypatch):
    import httpx
    from ray import serve

    from infra.registry import Registry
    from pipelines import train
    from pipelines.factory import build
    from pipelines.factory.requestlogs import answer_lineage
    from pipelines.spec import spec_from_dict
    from serving.app import deploy
    from tests.s3server import free_port

    monkeypatch.setenv("CRUCIBLE_ADMIN_TOKEN", TOKEN)
    uri = f"file://{tmp_path / 'registry'}"
    reg = Registry.open(uri)
    train_file = rows_file(tmp_path / "train.jsonl", [f"please repeat the number {i * 7}" for i in range(16)])
    eval_file = rows_file(tmp_path / "eval.jsonl", ["please repeat the number 999"])
    # A label contract under constrained decoding: even a barely trained model answers a label, so
    # served rows pass the gates and reach the leakage and dedupe checks.
    base = {"task": "fly", "registry": uri, "model": {"base": str(tiny_model), "max_seq_len": 64},
            "contract": {"type": "label", "labels": ["even", "odd"], "constrained_decoding": True},
            "data": {"train": [str(train_file)], "eval": {"held": str(eval_file)}},
            "train": {"workers": 1, "max_steps": 2, "micro_batch_size": 4},
            "deploy": {"num_cpus": 0.25, "max_new_tokens": 8, "log_flush_rows": 1000}}
    spec = spec_from_dict(base)
    first, _ = build(spec, reg, progress=False)
    trained = train.run(spec, reg, first.id)
    model_id = trained["model"].id

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy(spec, {"task": "fly", "models": {"production": model_id, "canary": None, "shadow": None},
                      "canary_weight": 0.0}, uri)
        prompts = ["could you repeat the number 31 for me", "please repeat the number 999",  # the second leaks
                   "mail jo@example.com the number 5 please"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for i, p in enumerate(prompts):
                r = c.post("/v1/chat/completions", json={"model": "fly", "user": f"u{i}", "max_tokens": 8,
                                                         "messages": [{"role": "user", "content": p}]})
                assert r.status_code == 200, r.text
            flushed = c.post("/admin/flush", headers={"Authorization": f"Bearer {TOKEN}"})
        assert flushed.status_code == 200
        log_id = flushed.json()["manifest"]
    finally:
        serve.shutdown()
    assert reg.get(log_id).inputs["models"] == [model_id]

    spec2 = spec_from_dict({**base, "data": {**base["data"], "request_logs": {"since": 0}}})
    second, summary = build(spec2, reg, progress=False)
    assert second.id != first.id and second.inputs["request_logs"] == [log_id]
    assert summary["input_rows"] == 16 + 3 == sum(summary["accepted"].values()) + sum(summary["rejected"].values())
    read = lambda name: [json.loads(l) for l in reg.read_file(second.id, name).decode().splitlines()]
    accepted = sum((read(f"{s}.jsonl") for s in ("train", "dev", "test")), [])
    logged = {r["id"]: r for r in accepted + read("rejected.jsonl") if r["id"].startswith(log_id)}
    assert len(logged) == 3
    leak = logged[f"{log_id}#2"]
    assert leak["reason"] == "leaked:held" and leak["messages"][0]["content"] == prompts[1]
    scrubbed = logged[f"{log_id}#3"]
    assert "[EMAIL]" in scrubbed["messages"][0]["content"] and "jo@example.com" not in json.dumps(scrubbed)
    assert scrubbed["messages"][-1]["content"] in ("even", "odd")
    assert scrubbed["meta"]["model"] == model_id and scrubbed["meta"]["request_log"] == log_id

    # Lineage: the new dataset -> the log -> the model that answered -> its run and its dataset.
    chain = {m.id for _, _, m in reg.lineage(second.id) if m}
    assert {log_id, model_id, first.id} <= chain and any(i.startswith("run-") for i in chain)
    walk = answer_lineage(reg, log_id, 1)
    assert walk["model"] == model_id and walk["dataset"] == first.id and walk["run"].startswith("run-")
    assert walk["training_row_ids"] == [r["id"] for r in map(json.loads, reg.read_file(first.id, "train.jsonl")
                                                              .decode().splitlines())]
    assert walk["training_rows"] > 0


def _logged(reg, task: str, answers: dict[str, str]) -> str:
    """Rows as serving's request log writes them (its own writer, to the real registry)."""
    from serving.requestlog import RequestLog, make_row

    rl = RequestLog(reg.uri, task, flush_rows=1000)
    for prompt, answer in answers.items():
        rl.add(make_row(messages=[{"role": "user", "content": prompt}], answer=answer, model="model-x", role="production",
                        latency_ms=5.0, valid=True, reason=None, status=200, user_hash=None))
    return rl.flush()


def test_request_logs_labelled_by_the_teacher_or_the_judge(ray_local, tiny_model, tmp_path):
    """label: teacher — a local tiny model answers each logged prompt under the label contract, the
    served answer kept beside it; label: judge — the judge scores the served answers and a row it
    does not score high enough is rejected with its reason, nothing lost."""
    from infra.registry import Registry
    from pipelines.factory import build
    from pipelines.spec import spec_from_dict

    reg = Registry.open(f"file://{tmp_path / 'registry'}")
    served = {f"is the number {n} even or odd, tell me": "even" for n in (11, 23, 35, 47)}
    log_id = _logged(reg, "lab", served)
    base = {"task": "lab", "registry": reg.uri, "model": {"base": str(tiny_model), "max_seq_len": 64},
            "contract": {"type": "label", "labels": ["even", "odd"]},
            "data": {"request_logs": {"label": "teacher"},
                     "teacher": {"engine": "hf", "model": str(tiny_model), "max_new_tokens": 4}}}
    dataset, summary = build(spec_from_dict(base), reg, progress=False)
    folder = reg.materialize(dataset.id)
    kept = [json.loads(line) for s in ("train", "dev", "test") for line in (folder / f"{s}.jsonl").read_text().splitlines()]
    assert summary["input_rows"] == 4 and len(kept) + sum(summary["rejected"].values()) == 4
    assert kept and all(r["meta"]["label"] == "teacher" and r["meta"]["served_answer"] == "even" for r in kept)
    assert all(r["messages"][-1]["content"] in ("even", "odd") for r in kept)  # decoded under the contract
    assert {r["meta"]["request_log"] for r in kept} == {log_id} and dataset.inputs["request_logs"] == [log_id]

    judged = {**base, "data": {"request_logs": {"label": "judge", "min_score": 101 - 1}},
              "eval": {"judge": {"engine": "hf", "model": str(tiny_model)}}}
    dataset, summary = build(spec_from_dict(judged), reg, progress=False)
    rejected = [json.loads(line) for line in (reg.materialize(dataset.id) / "rejected.jsonl").read_text().splitlines()]
    # A random tiny model never writes "Score: 100": every row is rejected, each with its score.
    assert summary["input_rows"] == 4 and summary["rejected"] == {"judge:below_min": 4}
    assert all(r["meta"]["judged"]["passed"] is False and r["messages"][-1]["content"] == "even" for r in rejected)

    with pytest.raises(ValueError, match="data.request_logs.label: 'judge' needs eval.judge"):
        build(spec_from_dict({**judged, "eval": {}}), reg, progress=False)
