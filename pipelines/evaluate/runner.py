"""Generate on a set of examples with one engine, score each row, and summarise with CIs
(Wilson for rates, BCa bootstrap for the rest; ``ci_method`` names each one)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from pipelines.engines import GenParams
from pipelines.evaluate import metrics as M
from pipelines.evaluate.rows import Example, reference_text, without_system
from pipelines.guide import Guide, compiled
from pipelines.templates import with_system_prompt

PERF_LOWER_IS_BETTER = ("latency_p50_s", "latency_p95_s")


def build_chats(examples: list[Example], *, system: str | None = None, strip_system: bool = False,
                fewshot: list[Example] | None = None, force_system: bool = False,
                answer_form=None) -> list[list[dict]]:
    """Chats as a system is asked them: the row's own chat, optionally without its system message,
    with ``system`` added where the row has none (or replacing it, ``force_system``), and few-shot
    examples as earlier user/assistant turns (their answers in ``answer_form``, e.g. the compact JSON
    the guide will enforce, so the shots show what the model may write)."""
    shots: list[dict] = []
    for ex in fewshot or []:
        answer = reference_text(ex.reference)
        shots += without_system(ex.chat) + [{"role": "assistant", "content": answer_form(answer) if answer_form
                                             else answer}]
    chats = []
    for ex in examples:
        chat = without_system(ex.chat) if (strip_system or force_system) else ex.chat
        if shots:
            sys_msgs = [m for m in chat if m.get("role") == "system"]
            chat = sys_msgs + shots + [m for m in chat if m.get("role") != "system"]
        chats.append(with_system_prompt(chat, system))
    return chats


def _checkable_guide(engine, params: GenParams) -> Guide | None:
    """For greedy decoding under a guide we can check (``pipelines.guide``) on an engine that does
    not report where the guide overrode the model (vLLM, a remote server): that guide, compiled;
    eval then decodes freely first. Else None."""
    if not params.guide or params.temperature != 0 or params.stop or getattr(engine, "reports_guide_interventions", False):
        return None
    try:
        return compiled(params.guide)
    except (ValueError, KeyError, TypeError):
        return None


def _guided_from_free(engine, chats, params: GenParams, guide: Guide, *, recipe=None, fan_out=None) -> list:
    """Each chat's output under ``params.guide`` (compiled: ``guide``) with ``extra["guide_interventions"]``, decoding
    every chat once without the guide and again with it only where the free output leaves the
    grammar. Under greedy decoding a free output that the grammar accepts at every character (and
    that ends where the grammar may end, or at the token limit) is exactly what the guided decode
    writes: the guide never masked the model's best token. A fine-tuned model mostly stays inside,
    so its eval costs one decode instead of two (vLLM's structured outputs do not say where they
    intervened, so the old way decoded every row twice)."""
    from pipelines import fanout

    # free, but cut where it leaves the grammar (streamed, on engines that can): a base model that
    # writes prose leaves at its first token, and only that verdict is wanted from it
    outs = fanout.generate(engine, chats, replace(params, guide=None, stop_outside=params.guide), recipe=recipe,
                           policy=fan_out)
    redo = []
    for i, o in enumerate(outs):
        state = guide.advance(guide.start, o.text)
        if state is not None and (o.finish_reason == "length" or guide.done(state)):
            o.extra["guide_interventions"] = 0
        else:
            redo.append(i)
    if redo:
        guided = fanout.generate(engine, [chats[i] for i in redo], params, recipe=recipe, policy=fan_out)
        for i, g in zip(redo, guided):
            g.extra["guide_interventions"] = 1
            outs[i] = g
    return outs


def generate_rows(engine, examples: list[Example], chats: list[list[dict]], checker, params: GenParams,
                  *, judge_engine=None, rubric: str | None = None, recipe=None, judge_recipe=None,
                  fan_out=None) -> tuple[list[dict], float]:
    """Per-example rows (output, tokens, latency, metric facts) and the wall time of generation;
    with recipes (``pipelines.fanout``) a large set is generated over Ray actors."""
    from pipelines import fanout

    start = time.perf_counter()
    guide = _checkable_guide(engine, params)
    if guide is not None:
        outs = _guided_from_free(engine, chats, params, guide, recipe=recipe, fan_out=fan_out)
        wall = time.perf_counter() - start
    else:
        outs = fanout.generate(engine, chats, params, recipe=recipe, policy=fan_out)
        wall = time.perf_counter() - start
        if params.guide and params.temperature == 0 and outs and not any("guide_interventions" in o.extra for o in outs):
            # An engine that decoded under a guide we cannot check ourselves: the same rows once more
            # without it, outside the timed part. Under greedy decoding an identical output is one the
            # constraint never changed, as the HF guide counts.
            free = fanout.generate(engine, chats, replace(params, guide=None), recipe=recipe, policy=fan_out)
            for o, f in zip(outs, free):
                o.extra["guide_interventions"] = int(f.text != o.text)
    rows = []
    for ex, chat, out in zip(examples, chats, outs):
        row: dict[str, Any] = {"id": ex.id, "instruction": ex.instruction, "reference": ex.reference,
                               "output": out.text, "prompt_tokens": out.prompt_tokens,
                               "completion_tokens": out.completion_tokens, "finish_reason": out.finish_reason,
                               "latency_s": round(out.latency_s, 6)}
        row.update(M.score_example(checker, out.text, ex.reference))
        if "guide_interventions" in out.extra and params.temperature == 0:
            # greedy: no intervention means the unconstrained output is this very output
            row["guide_interventions"] = out.extra["guide_interventions"]
        rows.append(row)
    if judge_engine is not None:
        from pipelines.evaluate.judge import judge

        verdicts = judge(judge_engine, [(r["instruction"], reference_text(r["reference"]), r["output"]) for r in rows],
                         rubric=rubric, recipe=judge_recipe, fan_out=fan_out)
        for r, v in zip(rows, verdicts):
            r.update(v)
    return rows, wall


def perf(rows: list[dict], generated: dict[str, Any]) -> dict[str, Any]:
    """Latency of these rows; throughput of the pass that generated them (``generated``: its
    ``examples``, ``completion_tokens``, ``wall_s``, ``sets`` and ``fanned_out``). A pass covers every
    set of the systems on one engine, so its rate is each of those sets' rate."""
    import numpy as np

    lat = [r["latency_s"] for r in rows] or [0.0]
    wall, n = generated["wall_s"], generated["examples"]
    return {"latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "tokens_per_s": generated["completion_tokens"] / wall if wall > 0 else 0.0,
            "examples_per_s": n / wall if wall > 0 else 0.0,
            "completion_tokens": sum(r["completion_tokens"] for r in rows), "wall_s": wall,
            "pass_examples": n, "pass_sets": list(generated["sets"]), "fanned_out": bool(generated.get("fanned_out"))}


def summarize(rows: list[dict], kind: str, labels: list[str] | None, generated: dict[str, Any], *, n_boot: int,
              seed: int) -> dict[str, Any]:
    """Metrics with CIs, failure counts and ``perf`` (see ``perf``) of one set's rows."""
    fn = lambda rs: M.aggregate(kind, rs, labels)  # noqa: E731
    failures: dict[str, int] = {}
    for r in rows:
        if not r["correct"]:
            key = r["reason"] or "wrong"
            failures[key] = failures.get(key, 0) + 1
    ci, ci_method = M.intervals(kind, rows, labels, n=n_boot, seed=seed)
    out = {"n": len(rows), "metrics": fn(rows), "ci": ci, "ci_method": ci_method,
           "perf": perf(rows, generated), "failures": failures}
    if kind == "label":
        out["labels"] = M.label_report(rows, list(labels or sorted({r["ref_label"] for r in rows})))
    return out


def compare(rows: list[dict], base_rows: list[dict], kind: str, labels: list[str] | None, *, n_boot: int,
            seed: int) -> dict[str, Any]:
    """Deltas (candidate − baseline) with paired CIs, and per-example regressions/improvements."""
    by_id = {r["id"]: r for r in base_rows}
    pairs = [(r, by_id[r["id"]]) for r in rows if r["id"] in by_id]
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    fn = lambda rs: M.aggregate(kind, rs, labels)  # noqa: E731
    return {"delta": M.paired_bootstrap(a, b, fn, n=n_boot, seed=seed) if pairs else {},
            "regressions": sum(1 for x, y in pairs if y["correct"] and not x["correct"]),
            "improvements": sum(1 for x, y in pairs if x["correct"] and not y["correct"]),
            "regressed_ids": [x["id"] for x, y in pairs if y["correct"] and not x["correct"]][:50],
            "paired": len(pairs)}
