"""Stage entry points: ``crucible eval``, ``score``, ``predict`` and ``gate``.

Also runs as ``python -m jobs.evaluate SPEC --model REF [--baseline ...]`` (locally or under
``ray job submit``). Heavy imports (torch, transformers) stay inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from jobs.common import (CheckFailed, JsonOpt, RegistryOpt, SetOpt, command, emit, err, open_registry, out,
                         run_standalone)


def _metrics_table(title: str, metrics: dict, ci: dict | None = None, ci_method: dict | None = None):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("metric", "value", "95% CI", "CI method"):
        t.add_column(col)
    for k, v in metrics.items():
        c = (ci or {}).get(k)
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v), f"[{c[0]:.3f}, {c[1]:.3f}]" if c else "",
                  (ci_method or {}).get(k, ""))
    return t


def eval_cmd(spec_file: Path = typer.Argument(..., metavar="SPEC", help="The spec YAML."),
             model: str = typer.Option(..., "--model", help="Model to evaluate: registry id, TASK@ALIAS or folder "
                                       "(a full model or a LoRA adapter)."),
             baseline: Optional[list[str]] = typer.Option(None, "--baseline", help="Also evaluate and compare: "
                                                          "'base', 'prompted-base', a model ref (e.g. TASK@production), "
                                                          "or http(s)://URL[#MODEL]. Repeatable; adds to eval.baselines."),
             dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset artifact to read eval sets from "
                                                   "(default: the model's training dataset, else the task's newest)."),
             limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N rows of each set."),
             set_: Optional[list[str]] = SetOpt, registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Generate on every eval set, score by the contract, compare with baselines, register an eval.

    Uses the model's own saved chat template and default system prompt. Registers an [bold]eval[/bold]
    artifact with per-example rows (predictions/), results.json and a report (report.md,
    report.html: metrics with bootstrap CIs, baselines side by side with deltas, latency p50/p95,
    tokens/s, worst failures by cause). [bold]--json[/bold] prints
    {"eval", "n", "metrics", "ci", "perf", "sets", "baselines", ...}. Then:
    [bold]crucible gate EVAL_REF[/bold].
    """
    from pipelines.evaluate import results_of, run
    from pipelines.spec import load_spec

    spec = load_spec(spec_file, set_ or [])
    reg = open_registry(registry or spec.registry)
    log = (lambda *a: None) if as_json else (lambda msg: err.print(msg, highlight=False, markup=False))
    m = run(spec, reg, model, baseline or [], dataset=dataset, limit=limit, progress=not as_json, log=log)
    _, results = results_of(reg, m.id)
    result = {"eval": m.id, **results}

    def human():
        pm, ps = results["primary_metric"], results["primary_set"]
        out.print(_metrics_table(f"{m.id} — set '{ps}', {results['n']} examples", results["metrics"], results["ci"],
                                 results.get("ci_method")))
        for b, r in results["baselines"].items():
            d = r["sets"][ps]["compare"]["delta"].get(pm)
            if d:
                out.print(f"vs {b}: {pm} Δ {d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}], "
                          f"{r['sets'][ps]['compare']['regressions']} regressions", highlight=False)
        p = results["perf"]
        out.print(f"latency p50 {p['latency_p50_s']:.3f}s p95 {p['latency_p95_s']:.3f}s, "
                  f"{p['tokens_per_s']:.1f} tokens/s", highlight=False)
        out.print(f"report: crucible registry show {m.id}  (report.md, report.html); next: crucible gate {m.id}",
                  highlight=False)

    emit(result, as_json, human)


def score_cmd(contract: str = typer.Option(..., "--contract", help="text, label, json or tool_call."),
              schema: Optional[Path] = typer.Option(None, "--schema", help="JSON Schema file (json contract)."),
              labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels (label contract)."),
              tools: Optional[Path] = typer.Option(None, "--tools", help="JSON file: list of {name, parameters} "
                                                   "(tool_call contract; default: any tool name, any arguments)."),
              predictions: Path = typer.Option(..., "--predictions", help="JSONL rows {id, output}."),
              references: Path = typer.Option(..., "--references", help="JSONL rows {id, output} (or canonical "
                                              "messages rows; for tool calls the expected call(s))."),
              bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Resamples for the 95% CIs."),
              gate: Optional[list[str]] = typer.Option(None, "--gate", help="A release gate as a YAML mapping, "
                                                       "e.g. '{metric: valid_rate, min: 0.95, on: lower_bound}'; "
                                                       "repeatable; exit 1 when one fails."),
              as_json: bool = JsonOpt):
    """Score given outputs against references without a model (rows joined by `id`).

    Example: crucible score --contract label --labels pos,neg --predictions p.jsonl --references r.jsonl --json
    prints {"n", "metrics": {"accuracy", "macro_f1", "valid_rate"}, "ci", "ci_method", "labels", ...}:
    rates get Wilson intervals, other metrics BCa bootstrap ones. With --gate, "gate" holds the verdict.
    """
    import yaml
    from pipelines.contract import Checker
    from pipelines.evaluate import score_records
    from pipelines.evaluate.rows import read_records
    from pipelines.spec import Contract, Gate

    gates = []
    for n, text in enumerate(gate or []):
        try:
            gates.append(Gate.model_validate(yaml.safe_load(text)))
        except Exception as e:  # pydantic's message names the field
            raise ValueError(f"--gate #{n + 1} {text!r}: {e}") from None
    raw: dict = {"type": contract}
    if schema:
        raw["schema"] = json.loads(schema.read_text())
    if labels:
        raw["labels"] = [x.strip() for x in labels.split(",") if x.strip()]
    if contract == "tool_call":
        raw["tools"] = json.loads(tools.read_text()) if tools else None
        if raw["tools"] is None:  # no tool list given: accept any name, so only matching is scored
            names = set()
            from pipelines.evaluate.metrics import reference_calls

            for r in read_records(references):
                names |= {c["name"] for c in reference_calls(r.get("output", r.get("expected")))}
            raw["tools"] = [{"name": n} for n in sorted(names)] or [{"name": "none"}]
    try:
        c = Contract.model_validate(raw)
    except Exception as e:  # pydantic's message names the field
        raise ValueError(f"contract: {e}") from None
    result = score_records(Checker(c), read_records(predictions), read_records(references), n_boot=bootstrap,
                           gates=gates)

    def human():
        out.print(_metrics_table(f"{result['n']} scored rows", result["metrics"], result["ci"], result["ci_method"]))
        if result["missing_predictions"]:
            err.print(f"{result['missing_predictions']} reference(s) had no prediction")
        for ch in result.get("gate", {}).get("checks", []):
            v = "–" if ch["value"] is None else f"{ch['value']:.4g}"
            out.print(f"{'✓' if ch['passed'] else '✗'} {ch['metric']} ({ch['on']}): {v}  {'; '.join(ch['reasons'])}",
                      highlight=False)

    emit(result, as_json, human)
    if gates and not result["gate"]["passed"]:
        raise typer.Exit(1)


def predict_cmd(model: str = typer.Argument(..., metavar="MODEL_REF", help="Registry id, TASK@ALIAS or folder."),
                input: Path = typer.Option(..., "--input", help="Rows: messages / instruction / prompt JSONL or CSV."),
                output: Path = typer.Option(..., "--output", help="Where to write {id, output, ...} JSONL."),
                engine: str = typer.Option("auto", "--engine", help="auto, hf or vllm."),
                max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
                temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
                seed: int = typer.Option(0, "--seed"),
                batch_size: int = typer.Option(16, "--batch-size", min=1),
                free: bool = typer.Option(False, "--free", help="Decode without the model's saved contract "
                                          "(when it was trained with contract.constrained_decoding)."),
                fan_out: str = typer.Option("auto", "--fan-out", help="auto (over Ray actors from --min-rows rows, "
                                            "or on an attached cluster), always or never."),
                min_rows: int = typer.Option(2000, "--min-rows", min=1, help="Rows from which auto fans out."),
                registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Batch inference on arbitrary rows, keeping each row's id and writing its output.

    A row without a system message gets the model's saved default system prompt. A final
    assistant message in a row is treated as a reference and not sent. A model trained with
    contract.constrained_decoding decodes under its saved schema or labels unless [bold]--free[/bold].
    """
    import time

    from pipelines.engines import GenParams, get_engine
    from pipelines.evaluate import predict
    from pipelines.evaluate.rows import read_examples
    from pipelines.fanout import EngineRecipe, FanOut

    if fan_out not in ("auto", "always", "never"):
        raise ValueError(f"--fan-out {fan_out!r}: choose auto, always or never")
    examples = read_examples(input, need_reference=False)
    reg = open_registry(registry)
    eng = get_engine(engine, model=model, registry=reg, batch_size=batch_size, progress=not as_json)
    recipe = EngineRecipe(engine, {"model": model, "batch_size": batch_size}, registry_uri=reg.uri,
                          cache_dir=str(reg.cache_dir))
    start = time.perf_counter()
    guide = None if free else getattr(eng, "default_guide", None)
    rows = predict(eng, examples, params=GenParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                                   guide=guide),
                   system_prompt=getattr(eng, "default_system_prompt", None), recipe=recipe,
                   fan_out=FanOut(mode=fan_out, min_rows=min_rows, shard_rows=batch_size * 4))
    wall = time.perf_counter() - start
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    toks = sum(r["completion_tokens"] for r in rows)
    result = {"output": str(output), "n": len(rows), "engine": eng.name, "wall_s": wall, "constrained": bool(guide),
              "tokens_per_s": toks / wall if wall else 0.0}
    emit(result, as_json, lambda: out.print(f"wrote {len(rows)} rows to {output} ({eng.name}, {wall:.1f}s, "
                                            f"{result['tokens_per_s']:.0f} tokens/s)", highlight=False))


def gate_cmd(eval_ref: str = typer.Argument(..., metavar="EVAL_REF", help="An eval artifact id."),
             spec_file: Optional[Path] = typer.Argument(None, metavar="[SPEC]", help="Spec whose gates to apply "
                                                        "(default: the spec saved with the eval)."),
             set_: Optional[list[str]] = SetOpt, registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Apply the spec's release gates to an eval: exit 0 pass, 1 fail (each failed gate with its numbers).

    Gates: {metric, eval_set, min, max, beats, margin, against, on}; on: lower_bound (or upper_bound)
    compares that end of the metric's 95% interval instead of its value; metric may be a contract metric,
    latency_p95_s, or regressions (with against: a baseline such as TASK@production). For json
    and tool_call contracts valid_rate >= eval.min_valid_rate (0.99) applies unless a gate names it.
    The verdict is recorded in the registry. --json prints {"passed", "checks", "failed", "eval", "verdict_record"}.
    """
    from pipelines.evaluate import gate
    from pipelines.spec import load_spec

    spec = load_spec(spec_file, set_ or []) if spec_file else None
    verdict, record = gate(open_registry(registry or (spec.registry if spec else None)), eval_ref, spec)

    def human():
        for c in verdict["checks"]:
            mark = "[green]✓[/green]" if c["passed"] else "[red]✗[/red]"
            v = "–" if c["value"] is None else f"{c['value']:.4g}"
            on = f" ({c['on']})" if c.get("on", "value") != "value" else ""
            out.print(f"{mark} {c['metric']}{on} on {c['eval_set']}: {v}  {'; '.join(c['reasons'])}", highlight=False)
        if verdict.get("note"):
            out.print(verdict["note"])
        out.print(f"verdict {'PASS' if verdict['passed'] else 'FAIL'} recorded as {record.id}", highlight=False)

    emit(verdict, as_json, human)
    if not verdict["passed"]:
        if as_json:
            raise typer.Exit(1)
        raise CheckFailed(f"{len(verdict['failed'])} gate check(s) failed: " + "; ".join(
            f"{c['metric']}@{c['eval_set']}: {', '.join(c['reasons'])}" for c in verdict["failed"]))


def register(app: typer.Typer) -> None:
    app.command("eval")(command(eval_cmd))
    app.command("score")(command(score_cmd))
    app.command("predict")(command(predict_cmd))
    app.command("gate")(command(gate_cmd))


if __name__ == "__main__":  # python -m jobs.evaluate SPEC [...] (locally or under `ray job submit`)
    run_standalone(eval_cmd)
