"""Evaluation: generate on every eval set, score by contract, compare with baselines, register.

``run(spec, registry, model_ref, baselines)`` is the stage; ``score_files`` scores given outputs
without a model; ``predict`` runs batch inference; ``gate`` applies the spec's gates to an eval.
Modules: ``metrics`` (per-contract metrics, intervals), ``judge`` (LLM-as-judge), ``rows``
(reading rows), ``sources`` (eval sets, baselines), ``runner`` (generate + summarise), ``report``
(md/html), ``gates``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

PRIMARY_SET_ORDER = ("test", "golden")


def _loss_curve(registry, model_manifest) -> bytes | None:
    """The training run's loss PNG, when the model came from a run in this registry."""
    from infra.registry import RefError

    run_id = model_manifest.inputs.get("run") if model_manifest else None
    if not run_id:
        return None
    try:
        return registry.read_file(run_id, "loss.png")
    except RefError:  # the run is in another registry, or has no curve
        return None


def run(spec, registry, model_ref: str, baselines: list[str] | None = None, *, dataset: str | None = None,
        limit: int | None = None, progress: bool = True, log=print):
    """Evaluate ``model_ref`` (and baselines) on every eval set; returns the registered ``eval`` Manifest.

    The manifest's files: ``results.json`` (what ``crucible eval --json`` prints), ``report.md``,
    ``report.html``, ``spec.json`` and ``predictions/<system>/<set>.jsonl`` (per-example rows).
    """
    from pipelines.contract import Checker
    from pipelines.engines import GenParams
    from pipelines.engines.loading import is_registry_ref
    from pipelines.evaluate import report, runner, sources
    from pipelines.fanout import FanOut, should_fan_out
    from pipelines.guide import guide_for

    checker = Checker(spec.contract)
    kind, labels = checker.type, spec.contract.labels
    model_manifest = registry.get(model_ref) if is_registry_ref(model_ref) else None
    sets, dataset_id, train = sources.eval_sets(spec, registry, dataset=dataset, model_manifest=model_manifest,
                                                limit=limit or spec.eval.limit)
    names = list(dict.fromkeys([*spec.eval.baselines, *(baselines or [])]))
    systems = [sources.candidate_system(spec, registry, model_manifest.id if model_manifest else model_ref)]
    systems += [sources.baseline_system(b, spec, registry, model_ref, train) for b in names]
    # every system decodes under the same guide, so the comparison stays fair
    params = GenParams(max_new_tokens=spec.eval.max_new_tokens, temperature=spec.eval.temperature,
                       seed=spec.eval.seed, guide=guide_for(spec.contract))
    judge_engine, judge_recipe = _judge_engine(spec, registry)
    policy = FanOut.from_spec(spec.eval)
    n_boot, seed = spec.eval.bootstrap, spec.eval.seed
    all_rows: dict[str, dict[str, list[dict]]] = {s.name: {} for s in systems}
    summaries: dict[str, dict[str, Any]] = {s.name: {} for s in systems}
    engine_used = ""
    # Systems on the same weights (base and prompted-base differ only in their prompts) share one
    # engine (on vLLM one server start, a minute or more on a CPU), and every set of every system on
    # an engine is generated in one pass: a batching engine keeps its batch full across sets instead
    # of draining at the end of each (vLLM here, the demo's fine-tuned model on its three sets of 40:
    # 13.9-15.6 s in one pass, 18.2 s a pass per set).
    keys = [sources.engine_key(s, spec, registry) for s in systems]
    for key in dict.fromkeys(keys):
        group = [s for s, k in zip(systems, keys) if k == key]
        engine = sources.open_engine(group[0], spec, registry, progress=progress)
        engine_used = engine_used or engine.name
        parts: list[tuple[str, str, int]] = []  # (system, set, rows) in pass order
        examples_all, chats_all = [], []
        for system in group:
            if system.name == "model":  # the model's own saved default prompt wins over the spec's
                system.system_prompt = getattr(engine, "default_system_prompt", None) or system.system_prompt
            for set_name, examples in sets.items():
                examples_all += examples
                chats_all += runner.build_chats(examples, system=system.system_prompt,
                                                strip_system=system.strip_system, fewshot=system.fewshot,
                                                force_system=system.force_system, answer_form=checker.as_decoded)
                parts.append((system.name, set_name, len(examples)))
        log(f"[{', '.join(s.name for s in group)}] generating {len(chats_all)} examples in one pass: "
            + ", ".join(f"{n} of set '{st}'" + (f" ({sy})" if len(group) > 1 else "") for sy, st, n in parts))
        rows, wall = runner.generate_rows(engine, examples_all, chats_all, checker, params, judge_engine=judge_engine,
                                          rubric=spec.eval.judge.rubric if spec.eval.judge else None,
                                          recipe=sources.engine_recipe(group[0], spec, registry, progress=False),
                                          judge_recipe=judge_recipe, fan_out=policy)
        pass_perf = {"examples": len(rows), "completion_tokens": sum(r["completion_tokens"] for r in rows),
                     "wall_s": wall, "sets": [f"{sy}/{st}" for sy, st, _ in parts],
                     "fanned_out": should_fan_out(len(chats_all), policy)}
        at = 0
        for sys_name, set_name, n in parts:
            part = rows[at:at + n]
            at += n
            all_rows[sys_name][set_name] = part
            summaries[sys_name][set_name] = runner.summarize(part, kind, labels, pass_perf, n_boot=n_boot, seed=seed)
        del engine  # frees the weights / stops the server before the next engine's
    primary_set = next((s for s in PRIMARY_SET_ORDER if s in sets), next(iter(sets)))
    primary_metric = _primary_metric(spec, kind)
    model_sets = summaries["model"]
    results: dict[str, Any] = {
        "model": systems[0].describe, "task": spec.task, "contract": kind, "engine": engine_used,
        "dataset": dataset_id, "primary_set": primary_set, "primary_metric": primary_metric,
        "n": model_sets[primary_set]["n"], "metrics": model_sets[primary_set]["metrics"],
        "ci": model_sets[primary_set]["ci"], "ci_method": model_sets[primary_set]["ci_method"],
        "perf": model_sets[primary_set]["perf"],
        "sets": model_sets, "baselines": {}, "unchecked_formats": checker.unchecked_formats}
    for system in systems[1:]:
        bsets = {}
        for set_name in sets:
            b = dict(summaries[system.name][set_name])
            b["compare"] = runner.compare(all_rows["model"][set_name], all_rows[system.name][set_name], kind, labels,
                                          n_boot=n_boot, seed=seed)
            bsets[set_name] = b
        results["baselines"][system.name] = {"model": system.describe, "sets": bsets}
    worst = report.worst_failures(all_rows["model"])
    side = report.side_by_side(all_rows, primary_set)
    loss_png = _loss_curve(registry, model_manifest)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files: dict[str, Any] = {
            "results.json": json.dumps(results, indent=2, default=str).encode(),
            "report.md": report.to_markdown(results, worst, side=side, loss_png=loss_png).encode(),
            "report.html": report.to_html(results, worst, side=side, loss_png=loss_png).encode(),
            "spec.json": json.dumps(spec.to_dict(), indent=2).encode()}
        if loss_png:
            files["loss.png"] = loss_png
        for sys_name, by_set in all_rows.items():
            for set_name, rows in by_set.items():
                p = tmp / f"{sys_name}-{set_name}.jsonl"
                p.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
                files[f"predictions/{_safe(sys_name)}/{set_name}.jsonl"] = p
        inputs = {"model": model_manifest.id if model_manifest else model_ref, "dataset": dataset_id,
                  "spec_hash": spec.spec_hash(),
                  "baselines": {s.name: s.model for s in systems[1:]}}
        metadata = {"primary_set": primary_set, "primary_metric": primary_metric, "n": results["n"],
                    "metrics": results["metrics"], "contract": kind,
                    "sets": {k: {"n": v["n"], "metrics": v["metrics"]} for k, v in model_sets.items()}}
        return registry.create("eval", spec.task, files=files, inputs=inputs, metadata=metadata)


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name).strip("_") or "baseline"


def _primary_metric(spec, kind: str) -> str:
    from pipelines.evaluate.metrics import PRIMARY

    for g in spec.gates:
        if g.min is not None or g.beats:
            return g.metric
    return PRIMARY[kind]


def _judge_engine(spec, registry):
    """(the judge engine, its recipe for fanning out), or (None, None) without a judge."""
    j = spec.eval.judge
    if j is None:
        return None, None
    from pipelines.engines import get_engine
    from pipelines.fanout import EngineRecipe

    kwargs = {"model": j.model, "url": j.url, "api_key_env": j.api_key_env}
    recipe = EngineRecipe(j.engine, kwargs, registry_uri=registry.uri, cache_dir=str(registry.cache_dir))
    return get_engine(j.engine, registry=registry, **kwargs), recipe


def results_of(registry, eval_ref: str) -> tuple[Any, dict]:
    m = registry.get(eval_ref)
    if m.kind != "eval" or "results.json" not in m.files:
        raise ValueError(f"{eval_ref}: not an eval artifact with results.json")
    return m, json.loads(registry.read_file(m.id, "results.json"))


def gate(registry, eval_ref: str, spec=None) -> tuple[dict, Any]:
    """Apply the gates (the given spec's, else the spec saved with the eval); records the verdict
    as an ``eval`` artifact (``metadata.verdict``) pointing at the eval. Returns (verdict, manifest)."""
    from pipelines.evaluate import gates
    from pipelines.spec import spec_from_dict

    m, results = results_of(registry, eval_ref)
    if spec is None:
        spec = spec_from_dict(json.loads(registry.read_file(m.id, "spec.json")), source=f"{m.id}/spec.json")
    verdict = gates.check(results, gates.effective_gates(spec))
    verdict["eval"] = m.id
    record = registry.create("eval", m.task, files={"verdict.json": json.dumps(verdict, indent=2, default=str).encode()},
                             inputs={"eval": m.id, "model": m.inputs.get("model"), "spec_hash": spec.spec_hash()},
                             metadata={"verdict": "pass" if verdict["passed"] else "fail", "passed": verdict["passed"],
                                       "failed": [f"{c['metric']}@{c['eval_set']}" for c in verdict["failed"]]})
    verdict["verdict_record"] = record.id
    return verdict, record


def score_records(checker, predictions: list[dict], references: list[dict], *, n_boot: int = 1000,
                  seed: int = 0, gates: list | None = None) -> dict[str, Any]:
    """Score prediction rows against reference rows joined by ``id`` (no model involved); with
    ``gates`` (spec ``Gate`` entries) the verdict on the scored rows is in ``result["gate"]``."""
    from pipelines.evaluate import metrics as M
    from pipelines.evaluate.rows import to_example

    refs = {}
    for n, r in enumerate(references, 1):
        if "output" in r or "expected" in r or "tool_calls" in r:
            ref = next(r[k] for k in ("output", "expected", "tool_calls") if k in r)
            refs[str(r.get("id", f"line-{n}"))] = ref
        else:
            ex = to_example(r, n)
            refs[ex.id] = ex.reference
    preds = {str(p.get("id", f"line-{n}")): p.get("output") for n, p in enumerate(predictions, 1)}
    missing = sorted(set(refs) - set(preds))
    extra = sorted(set(preds) - set(refs))
    ids = [i for i in refs if i in preds]
    if not ids:
        raise ValueError("no prediction id matches a reference id (rows are joined by `id`)")
    rows = []
    for i in ids:
        out = preds[i]
        row = M.score_example(checker, out if isinstance(out, str) or out is None else json.dumps(out), refs[i])
        row["id"] = i
        rows.append(row)
    fn = lambda rs: M.aggregate(checker.type, rs, checker.contract.labels)  # noqa: E731
    ci, ci_method = M.intervals(checker.type, rows, checker.contract.labels, n=n_boot, seed=seed)
    result = {"n": len(rows), "metrics": fn(rows), "ci": ci, "ci_method": ci_method,
              "missing_predictions": len(missing), "unmatched_predictions": len(extra),
              "unchecked_formats": checker.unchecked_formats,
              "missing_ids": missing[:20]}
    if checker.type == "label":
        result["labels"] = M.label_report(rows, list(checker.contract.labels or []))
    if gates:
        from pipelines.evaluate.gates import check

        result["gate"] = check({"sets": {"scored": result}}, [g.model_dump() for g in gates])
    return result


def predict(engine, examples, *, params, system_prompt: str | None = None, recipe=None,
            fan_out=None) -> list[dict]:
    """``{"id", "output", "finish_reason", "prompt_tokens", "completion_tokens"}`` per example; a
    row without a system message gets ``system_prompt`` (the model's saved default). With
    ``recipe`` a large input fans out over Ray actors (``pipelines.fanout``)."""
    from pipelines import fanout
    from pipelines.evaluate.runner import build_chats

    chats = build_chats(examples, system=system_prompt)
    outs = fanout.generate(engine, chats, params, recipe=recipe, policy=fan_out)
    return [{"id": ex.id, "output": o.text, "finish_reason": o.finish_reason, "prompt_tokens": o.prompt_tokens,
             "completion_tokens": o.completion_tokens} for ex, o in zip(examples, outs)]
