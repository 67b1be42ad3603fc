"""The whole loop: factory -> train -> eval (baselines side by side) -> gate -> canary.

The baselines (``eval.baselines``: the untuned base, the prompted base, production) are scored in
the same eval run as the candidate, on the same rows, so the comparison needs no separate step.

``run_loop(spec, registry)`` resumes from what the registry already has: a dataset built from the
same data, contract and base model is reused (``data_fingerprint``), a model trained on that
dataset with the same model and train sections is not retrained, and an eval of the same model
on the same dataset with the same eval settings is not rerun. Each step says what it did.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

STEPS = ("factory", "train", "eval", "gate", "deploy")  # eval includes loop.repair's rounds


def _sections_hash(spec_dict: dict, *sections: str) -> str:
    return hashlib.sha256(json.dumps({s: spec_dict.get(s) for s in sections}, sort_keys=True).encode()).hexdigest()[:16]


def _saved_spec(registry, manifest) -> dict | None:
    return json.loads(registry.read_file(manifest.id, "spec.json")) if "spec.json" in manifest.files else None


def find_dataset(spec, registry) -> Any | None:
    from pipelines.factory import data_fingerprint

    fingerprint = data_fingerprint(spec)
    found = [m for m in registry.list("dataset", spec.task) if m.inputs.get("data_fingerprint") == fingerprint]
    return found[-1] if found else None


def find_model(spec, registry, dataset_id: str) -> Any | None:
    """The newest model trained on ``dataset_id`` with this spec's model and train sections."""
    want = _sections_hash(spec.to_dict(), "model", "train", "contract")
    for model in reversed(registry.list("model", spec.task)):
        run_id = model.inputs.get("run")
        if model.inputs.get("dataset") != dataset_id or not run_id or model.inputs.get("merged_from"):
            continue  # a merge of the run's adapter (a repair round's `continue`) is not what it trained
        saved = _saved_spec(registry, registry.get(run_id))
        if saved and _sections_hash(saved, "model", "train", "contract") == want:
            return model
    return None


def find_eval(spec, registry, model_ref: str, dataset_id: str) -> Any | None:
    want = _sections_hash(spec.to_dict(), "eval", "contract", "data")
    for m in reversed(registry.list("eval", spec.task)):
        if m.inputs.get("model") == model_ref and m.inputs.get("dataset") == dataset_id and "results.json" in m.files:
            saved = _saved_spec(registry, m)
            if saved and _sections_hash(saved, "eval", "contract", "data") == want:
                return m
    return None


def run_loop(spec, registry, *, until: str = "deploy", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the loop up to and including step ``until``; returns refs and figures."""
    from pipelines import evaluate, factory, train

    if until not in STEPS:
        raise ValueError(f"--until {until!r}: choose one of {', '.join(STEPS)}")
    last = STEPS.index(until)
    out: dict[str, Any] = {"task": spec.task, "steps": {}}

    def step(name: str, ref: str, reused: bool, **figures) -> None:
        out["steps"][name] = {"ref": ref, "reused": reused, **figures}
        log(f"[{name}] {'reused' if reused else 'made'} {ref}"
            + "".join(f"  {k}={v}" for k, v in figures.items() if v is not None))

    dataset = find_dataset(spec, registry)
    reused = dataset is not None
    if dataset is None:
        dataset = factory.run(spec, registry)
    step("factory", dataset.id, reused, accepted=dataset.metadata.get("accepted"))
    if last == 0:
        return out

    model = find_model(spec, registry, dataset.id)
    reused = model is not None
    if model is None:
        model = train.run(spec, registry, dataset.id)["model"]
    step("train", model.id, reused)
    registry.set_alias(spec.task, "candidate", model.id, note="crucible run")
    if last == 1:
        return out

    rounds = spec.loop.repair.rounds
    # With repair rounds, the evals before the last skip the baselines (they do not change; the
    # gate reads them from the last eval): one repair round costs a model-only eval, not three systems.
    first = _without_baselines(spec) if rounds else spec
    ev = find_eval(first, registry, model.id, dataset.id)
    reused = ev is not None
    if ev is None:
        ev = evaluate.run(first, registry, model.id, dataset=dataset.id, log=log)
    step("eval", ev.id, reused, **_headline(ev))
    for n in range(1, rounds + 1):
        dataset, model, ev = repair_round(spec, registry, ev, model, n, last_round=n == rounds, step=step, out=out,
                                          log=log)
    if last == 2:
        return out

    verdict, record = evaluate.gate(registry, ev.id, spec)
    step("gate", record.id, False, passed=verdict["passed"],
         failed=[f"{c['metric']}@{c['eval_set']}" for c in verdict["failed"]] or None)
    out["passed"] = verdict["passed"]
    if last == 3 or not verdict["passed"]:
        if not verdict["passed"]:
            log("[deploy] skipped: the gate failed, production is untouched")
        return out

    from pipelines.release import deploy

    # The registry is the source of truth for who serves what: `crucible serve` (or a running
    # router's reload) picks the new canary up from here.
    event = deploy(registry, spec.task, model.id, "canary", spec.deploy.canary_weight)
    step("deploy", event["event"], False, canary=model.id, weight=spec.deploy.canary_weight)
    return out


def _without_baselines(spec):
    s = spec.model_copy(deep=True)
    s.eval.baselines = []
    return s


def retrain_spec(spec, registry, model) -> Any:
    """The spec a repair round retrains with: ``loop.repair.max_steps``, and for ``retrain: continue``
    the repaired model (its LoRA merged into its base) as the base."""
    cfg = spec.loop.repair
    s = spec.model_copy(deep=True)
    if cfg.max_steps:
        s.train.max_steps = cfg.max_steps
    if cfg.retrain == "continue":
        from pipelines.export import merge_registered

        s.model.base = merge_registered(registry, model.id, reuse=True)[0].id
    return s


def repair_round(spec, registry, ev, model, n: int, *, last_round: bool, step, out: dict, log) -> tuple:
    """One round: repair rows for ``ev``'s top failure clusters -> a new dataset version -> retrain
    -> eval on the same sets; ``out["repair"]`` gets each cluster's before/after."""
    from pipelines import evaluate, train
    from pipelines.factory import repair as R

    sfx = "" if n == 1 else str(n)
    dataset, report = R.repair(spec, registry, ev.id, log=log)
    step(f"repair{sfx}", dataset.id, report["reused"], clusters=[c["cluster"] for c in report["clusters"]
                                                                  if c["repaired"]],
         rows=report["rows_accepted"])
    rspec = retrain_spec(spec, registry, model)
    new_model = find_model(rspec, registry, dataset.id)
    reused = new_model is not None
    if new_model is None:
        new_model = train.run(rspec, registry, dataset.id)["model"]
    step(f"retrain{sfx}", new_model.id, reused)
    registry.set_alias(spec.task, "candidate", new_model.id, note=f"crucible run: repair round {n}")
    espec = spec if last_round else _without_baselines(spec)
    new_ev = find_eval(espec, registry, new_model.id, dataset.id)
    reused = new_ev is not None
    if new_ev is None:
        new_ev = evaluate.run(espec, registry, new_model.id, dataset=dataset.id, log=log)
    step(f"reeval{sfx}", new_ev.id, reused, **_headline(new_ev))
    report = R.compare(registry, report, new_ev.id)
    record = R.register_report(registry, spec.task, report)
    out.setdefault("repair", []).append({**{k: report[k] for k in ("eval", "after_eval", "parent_dataset", "dataset",
                                                                    "rows_made", "rows_accepted")},
                                         "report": record.id, "clusters": [R.brief(c) for c in report["clusters"]]})
    for c in report["clusters"]:
        if c["repaired"]:
            log(f"[repair{sfx}] {c['cluster']}: {c['failed']} failed, {c['rows']} rows, "
                + ", ".join(f"{k} {c['before'][k]:.3f} -> {c['after'].get(k, float('nan')):.3f}"
                            for k in c["before"] if k in ("accuracy", R.focus_metric(report))))
    return dataset, new_model, new_ev


def _headline(eval_manifest) -> dict[str, Any]:
    md = eval_manifest.metadata
    metric = md.get("primary_metric")
    return {"set": md.get("primary_set"), metric: (md.get("metrics") or {}).get(metric)} if metric else {}
