"""The release card of a model: ``MODEL_CARD.md`` and ``model_card.json``, built only from the registry.

``build(registry, ref)`` gathers what the manifests already hold — the spec's intended use, the
base model and its licence, the dataset version (accepted/rejected rows, leak checks), the
training run (recipe, node-hours, MFU when the run recorded it), the newest eval of the model
(tables with intervals and their methods, against every baseline), the gate verdicts on it, the
most common failures, export formats and the lineage — and the serving cost per 1k requests and
per 1k valid answers from measured throughput and ``deploy.node_hour_usd``. ``to_markdown``
renders it; ``write`` puts both files in a folder (``crucible card``, and ``crucible export``
beside the weights). A figure the registry does not hold is printed as "not recorded", never guessed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

NOT_RECORDED = "not recorded"
TOP_FAILURES = 5


def _json_file(registry, m, rel: str) -> Any:
    return json.loads(registry.read_file(m.id, rel)) if m is not None and rel in m.files else None


def _get(registry, ref: str | None):
    from infra.registry import RefError, parse_id

    if not ref or not isinstance(ref, str) or not parse_id(ref):
        return None
    try:
        return registry.get(ref)
    except RefError:  # recorded in another registry
        return None


def _newest_eval(registry, model):
    evals = [m for m in registry.list("eval", model.task)
             if m.inputs.get("model") == model.id and "results.json" in m.files]
    return evals[-1] if evals else None


def _spec_dict(registry, run, ev) -> dict | None:
    return _json_file(registry, run, "spec.json") or _json_file(registry, ev, "spec.json")


def _licence(registry, spec: dict | None, base) -> str:
    if spec and spec.get("model", {}).get("license"):
        return spec["model"]["license"]
    if base is not None and "README.md" in base.files:  # a hub model card's front matter: `license: apache-2.0`
        text = registry.read_file(base.id, "README.md").decode(errors="replace")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                if line.strip().lower().startswith("license:"):
                    return line.split(":", 1)[1].strip()
    return NOT_RECORDED


def _intended_use(spec: dict | None) -> dict[str, Any]:
    if not spec:
        return {"task": None, "description": NOT_RECORDED}
    c = spec.get("contract", {})
    out = {"task": spec.get("task"), "description": spec.get("description") or NOT_RECORDED,
           "contract": c.get("type"), "system_prompt": spec.get("model", {}).get("system_prompt")}
    if c.get("labels"):
        out["labels"] = c["labels"]
    if c.get("tools"):
        out["tools"] = [t["name"] for t in c["tools"]]
    if isinstance(c.get("schema"), dict):
        out["schema_fields"] = sorted(c["schema"].get("properties", {}))
    return out


def _data(registry, ds) -> dict[str, Any]:
    if ds is None:
        return {"dataset": NOT_RECORDED}
    stats = _json_file(registry, ds, "stats.json") or {}
    md = ds.metadata
    return {"dataset": ds.id, "created_at": ds.created_at, "input_rows": md.get("input_rows"),
            "accepted": md.get("accepted"), "rejected": md.get("rejected"),
            "duplicate_clusters": md.get("duplicate_clusters"), "leaked": md.get("leaked"),
            "leaked_by_set": stats.get("leaked_by_set", NOT_RECORDED),
            "sources": [{"path": s.get("path"), "rows": s.get("rows")} for s in ds.inputs.get("sources", [])],
            "eval_sets": {k: v.get("rows") for k, v in (ds.inputs.get("eval_sets") or {}).items()}}


def _training(run, spec: dict | None, node_hour_usd: float | None) -> dict[str, Any]:
    if run is None:
        return {"run": NOT_RECORDED}
    md = run.metadata
    nodes = md.get("nodes")
    wall = md.get("wall_seconds")
    node_hours = wall / 3600 * (nodes or 1) if wall is not None else None
    train = (spec or {}).get("train", {})
    recipe = {k: train[k] for k in ("lr", "scheduler", "epochs", "max_steps", "micro_batch_size", "grad_accum")
              if k in train}
    if md.get("method") in ("lora", "qlora") and train.get("lora"):
        recipe["lora"] = train["lora"]
    out = {"run": run.id, "method": md.get("method"), "steps": md.get("steps"), "workers": md.get("workers"),
           "deepspeed_stage": md.get("deepspeed_stage"), "packing": md.get("packing"), "recipe": recipe,
           "final_loss": md.get("final_loss"), "dev_loss": md.get("final_dev_loss", md.get("dev_loss")),
           "tokens_per_s": md.get("tokens_per_s", NOT_RECORDED), "mfu": md.get("mfu", NOT_RECORDED),
           "precision": md.get("precision", NOT_RECORDED), "wall_seconds": wall,
           "nodes": nodes if nodes is not None else "1 (not recorded; assumed)", "node_hours": node_hours,
           "cost_usd": node_hours * node_hour_usd if node_hours is not None and node_hour_usd is not None else None}
    return out


def _eval_tables(results: dict) -> list[dict[str, Any]]:
    tables = []
    for set_name, s in results["sets"].items():
        rows = []
        for metric, value in s["metrics"].items():
            row = {"metric": metric, "model": value, "ci": s.get("ci", {}).get(metric),
                   "ci_method": s.get("ci_method", {}).get(metric), "baselines": {}}
            for b, bres in results.get("baselines", {}).items():
                bs = bres["sets"].get(set_name, {})
                row["baselines"][b] = {"value": bs.get("metrics", {}).get(metric),
                                       "delta": bs.get("compare", {}).get("delta", {}).get(metric)}
            rows.append(row)
        tables.append({"set": set_name, "n": s["n"], "rows": rows, "failures": s.get("failures", {})})
    return tables


def failure_clusters(rows: list[dict], kind: str, top: int = TOP_FAILURES) -> dict[str, Any]:
    """The most common ways the model was wrong: error kinds (the contract's reason, or 'wrong'),
    and for valid-but-wrong answers the most common confusions — label ref → predicted, a JSON
    field's reference value → predicted value, or a tool call's wrong name / wrong arguments."""
    wrong = [r for r in rows if not r.get("correct")]
    kinds = Counter(r.get("reason") or "wrong" for r in wrong)
    confusions: Counter = Counter()
    for r in wrong:
        if kind == "label":
            confusions[f"{r.get('ref_label')} → {r.get('pred_label')}"] += 1
        elif kind == "json" and r.get("valid") and r.get("fields"):
            ref = r["reference"] if isinstance(r["reference"], dict) else json.loads(r["reference"])
            got = json.loads(r["output"])
            for field, ok in r["fields"].items():
                if not ok:
                    confusions[f"{field}: {json.dumps(ref.get(field))} → {json.dumps(got.get(field, '(missing)'))}"] += 1
        elif kind == "tool_call" and r.get("valid"):
            confusions["wrong tool name or count" if not r.get("names_ok") else "wrong arguments"] += 1
    return {"n": len(rows), "wrong": len(wrong), "error_kinds": dict(kinds.most_common()),
            "top_confusions": [{"what": k, "count": v} for k, v in confusions.most_common(top)]}


def _cost(results: dict | None, node_hour_usd: float | None) -> dict[str, Any]:
    if results is None:
        return {"note": "no eval of this model: no measured throughput"}
    perf = results.get("perf", {})
    rate = perf.get("examples_per_s")
    valid = results.get("metrics", {}).get("valid_rate")
    out = {"measured_on": f"batch eval, set '{results['primary_set']}', {results['n']} requests, "
                          f"engine {results.get('engine') or NOT_RECORDED}",
           "requests_per_s": rate, "tokens_per_s": perf.get("tokens_per_s"), "valid_rate": valid,
           "node_hour_usd": node_hour_usd, "usd_per_1k_requests": None, "usd_per_1k_valid": None}
    if node_hour_usd is None:
        out["note"] = "deploy.node_hour_usd is not set in the spec: no cost"
    elif rate:
        out["usd_per_1k_requests"] = node_hour_usd / (rate * 3600) * 1000
        if valid:
            out["usd_per_1k_valid"] = out["usd_per_1k_requests"] / valid
    return out


def build(registry, ref: str) -> dict[str, Any]:
    """The card of model ``ref`` (id or TASK@ALIAS) as a dict; see the module doc."""
    from pipelines.export import FORMATS

    model = registry.get(ref)
    if model.kind != "model":
        raise ValueError(f"{ref}: a {model.kind} artifact, not a model (a card describes a model)")
    run = _get(registry, model.inputs.get("run"))
    ev = _newest_eval(registry, model)
    spec = _spec_dict(registry, run, ev)
    base_ref = model.inputs.get("base_model") or (run.inputs.get("base_model") if run else None)
    base = _get(registry, base_ref)
    ds = _get(registry, model.inputs.get("dataset") or (run.inputs.get("dataset") if run else None))
    node_hour_usd = (spec or {}).get("deploy", {}).get("node_hour_usd")
    results = json.loads(registry.read_file(ev.id, "results.json")) if ev else None
    card: dict[str, Any] = {
        "model": model.id, "task": model.task, "created_at": model.created_at,
        "aliases": sorted(f"{model.task}@{a}" for a, i in registry.aliases(model.task).get(model.task, {}).items()
                          if i == model.id),
        "intended_use": _intended_use(spec),
        "base_model": {"ref": base_ref or NOT_RECORDED, "id": base.id if base else None,
                       "licence": _licence(registry, spec, base),
                       "parameters": (base.metadata.get("parameters") if base else None)},
        "weights": {"model_type": model.metadata.get("model_type"), "parameters": model.metadata.get("parameters"),
                    "adapter": model.metadata.get("adapter"), "files": sorted(model.files)},
        "data": _data(registry, ds), "training": _training(run, spec, node_hour_usd),
        "eval": None, "gates": [], "failures": None,
        "exports": {"formats": list(FORMATS), "merged_models": [
            m.id for m in registry.list("model", model.task) if m.inputs.get("merged_from") == model.id]},
        "cost": _cost(results, node_hour_usd),
        "lineage": [{"depth": d, "via": via, "id": m.id if m else None, "kind": m.kind if m else None}
                    for d, via, m in registry.lineage(model.id)]}
    if ev is not None:
        card["eval"] = {"eval": ev.id, "created_at": ev.created_at, "primary_set": results["primary_set"],
                        "primary_metric": results["primary_metric"], "engine": results.get("engine"),
                        "baselines": {b: r["model"] for b, r in results.get("baselines", {}).items()},
                        "unchecked_formats": results.get("unchecked_formats", []),
                        "tables": _eval_tables(results)}
        for v in registry.list("eval", model.task):
            if v.inputs.get("eval") == ev.id and "verdict" in v.metadata:
                verdict = _json_file(registry, v, "verdict.json") or {}
                card["gates"].append({"record": v.id, "verdict": v.metadata["verdict"], "checks": [
                    {k: c.get(k) for k in ("metric", "eval_set", "on", "value", "min", "max", "beats", "passed",
                                           "reasons")} for c in verdict.get("checks", [])]})
        ps = results["primary_set"]
        rel = f"predictions/model/{ps}.jsonl"
        if rel in ev.files:
            rows = [json.loads(l) for l in registry.read_file(ev.id, rel).decode().splitlines() if l.strip()]
            card["failures"] = {"set": ps, **failure_clusters(rows, results["contract"])}
    return card


# -- rendering -------------------------------------------------------------------------------------
def _f(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) >= 0.001 or x == 0 else f"{x:.2e}"
    return str(x)


def _band(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "–"


def _delta(d: dict | None) -> str:
    if not d:
        return "–"
    band = f" [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d.get("lo") == d.get("lo") and d.get("lo") is not None else ""
    return f"{d['delta']:+.3f}{band}"


def _source(s: dict) -> str:
    return f"{s['path']} ({s['rows']} rows)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(none)", ""]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def to_markdown(card: dict[str, Any]) -> str:
    u, b, d, t, c = card["intended_use"], card["base_model"], card["data"], card["training"], card["cost"]
    L = [f"# Model card — {card['model']}", "",
         f"Task `{card['task']}`; registered {card['created_at']}; aliases: "
         f"{', '.join(card['aliases']) or 'none'}.", "", "## Intended use", "",
         f"- **description**: {u.get('description')}", f"- **output contract**: {_f(u.get('contract'))}"]
    for key in ("labels", "tools", "schema_fields"):
        if u.get(key):
            L.append(f"- **{key.replace('_', ' ')}**: {', '.join(u[key])}")
    L += [f"- **system prompt**: {_f(u.get('system_prompt'))}",
          "- **out of scope**: inputs unlike the training data below; the eval figures hold only for them.", "",
          "## Base model and licence", "", f"- **base model**: {b['ref']}" + (f" (`{b['id']}`)" if b["id"] else ""),
          f"- **licence**: {b['licence']}", f"- **weights**: {_f(card['weights']['model_type'])}, "
          f"{_f(card['weights']['parameters'])} parameters" + (" (LoRA adapter)" if card["weights"]["adapter"] else ""),
          "", "## Data", ""]
    if d.get("dataset") == NOT_RECORDED:
        L += [f"dataset: {NOT_RECORDED}", ""]
    else:
        L += [f"- **dataset version**: `{d['dataset']}` ({d['created_at']}), {_f(d['input_rows'])} input rows",
              f"- **accepted**: {', '.join(f'{k} {v}' for k, v in (d['accepted'] or {}).items())}",
              f"- **rejected**: {sum((d['rejected'] or {}).values())} — "
              f"{', '.join(f'{k} {v}' for k, v in (d['rejected'] or {}).items()) or 'none'}",
              f"- **duplicate clusters**: {_f(d['duplicate_clusters'])}",
              f"- **leak check** (training rows repeating an eval row, removed): {_f(d['leaked'])}"
              + (f" — {', '.join(f'{k} {v}' for k, v in d['leaked_by_set'].items())}"
                 if isinstance(d["leaked_by_set"], dict) and d["leaked_by_set"] else ""),
              f"- **sources**: {', '.join(_source(s) for s in d['sources']) or '–'}",
              f"- **eval sets**: {', '.join(f'{k} ({v} rows)' for k, v in d['eval_sets'].items()) or '–'}", ""]
    L += ["## Training recipe and cost", ""]
    if t.get("run") == NOT_RECORDED:
        L += [f"training run: {NOT_RECORDED} (the model was registered directly)", ""]
    else:
        L += _table(["figure", "value"], [[k.replace("_", " "), _f(v if not isinstance(v, dict) else json.dumps(v))]
                                          for k, v in t.items()])
    L += ["## Evaluation", ""]
    ev = card["eval"]
    if ev is None:
        L += ["No eval of this model in the registry: run `crucible eval SPEC --model "
              f"{card['model']}`.", ""]
    else:
        L += [f"Eval `{ev['eval']}` ({ev['created_at']}), engine {_f(ev['engine'])}; primary metric "
              f"`{ev['primary_metric']}` on `{ev['primary_set']}`. Intervals are 95%; the method column says "
              "which (Wilson for rates, BCa bootstrap otherwise); deltas are model − baseline with paired "
              "bootstrap intervals.", ""]
        for name, model in ev["baselines"].items():
            L.append(f"- baseline **{name}**: {model}")
        if ev["baselines"]:
            L.append("")
        if ev["unchecked_formats"]:
            L += [f"JSON Schema formats not checked: {', '.join(ev['unchecked_formats'])}.", ""]
        for tab in ev["tables"]:
            L += [f"### Set `{tab['set']}` — {tab['n']} examples", ""]
            header = ["metric", "model", "95% CI", "method", *[f"{b} (Δ)" for b in ev["baselines"]]]
            rows = [[r["metric"], _f(r["model"]), _band(r["ci"]), _f(r["ci_method"]),
                     *[f"{_f(r['baselines'][b]['value'])} ({_delta(r['baselines'][b]['delta'])})"
                       for b in ev["baselines"]]] for r in tab["rows"]]
            L += _table(header, rows)
    L += ["## Gate verdicts", ""]
    if not card["gates"]:
        L += ["No gate verdict recorded for this eval (`crucible gate EVAL`).", ""]
    for g in card["gates"]:
        L += [f"**{g['verdict'].upper()}** (`{g['record']}`)", ""]
        L += _table(["metric", "set", "on", "value", "bound", "result"],
                    [[ch["metric"], ch["eval_set"], ch.get("on") or "value", _f(ch["value"]),
                      " ".join(x for x in (f"min {ch['min']}" if ch["min"] is not None else "",
                                           f"max {ch['max']}" if ch["max"] is not None else "",
                                           f"beats {ch['beats']}" if ch["beats"] else "") if x),
                      "pass" if ch["passed"] else "FAIL: " + "; ".join(ch["reasons"])] for ch in g["checks"]])
    L += ["## Known failure clusters", ""]
    fc = card["failures"]
    if not fc:
        L += [NOT_RECORDED, ""]
    else:
        L += [f"On `{fc['set']}`: {fc['wrong']} of {fc['n']} answers wrong.", ""]
        L += _table(["error kind", "count"], [[k, str(v)] for k, v in fc["error_kinds"].items()])
        L += _table(["most common confusion", "count"], [[x["what"], str(x["count"])] for x in fc["top_confusions"]])
    L += ["## Serving cost", ""]
    L += _table(["figure", "value"], [[k.replace("_", " "), _f(v)] for k, v in c.items()])
    L += ["## Export formats", "", f"- `crucible export {card['model']} --format "
          f"{'|'.join(card['exports']['formats'])}` (a LoRA adapter is merged into its base first)"]
    L += [f"- merged model: `{m}`" for m in card["exports"]["merged_models"]] + [""]
    L += ["## Lineage", ""] + [f"{'  ' * x['depth']}- {x['via'] + ': ' if x['via'] else ''}"
                               f"`{x['id'] or '(not in this registry)'}`" + (f" ({x['kind']})" if x["kind"] else "")
                               for x in card["lineage"]] + [""]
    return "\n".join(L)


def write(registry, ref: str, out: str | Path) -> dict[str, Any]:
    """Write ``MODEL_CARD.md`` and ``model_card.json`` into ``out``; returns the card with their paths."""
    card = build(registry, ref)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "MODEL_CARD.md").write_text(to_markdown(card))
    (out / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
    return {**card, "files": [str(out / "MODEL_CARD.md"), str(out / "model_card.json")]}
