"""The eval report a person reads: ``report.md`` and a self-contained ``report.html``.

Sections: per-set metrics with 95% intervals, each with the method that made it (Wilson for
rates, BCa bootstrap otherwise); baselines side by side with the model's deltas (paired bootstrap CIs) and per-example regressions; latency p50/p95 and tokens/s; and the
worst failures grouped by cause (the contract's reason code, or "wrong" for valid-but-incorrect).
"""

from __future__ import annotations

import base64
import html
from typing import Any

WORST_PER_CAUSE = 3
SIDE_BY_SIDE_ROWS = 12


def _f(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _delta(d: dict | None) -> str:
    if not d:
        return "–"
    lo, hi = d.get("lo"), d.get("hi")
    band = f" [{lo:+.3f}, {hi:+.3f}]" if lo == lo and hi == hi else ""  # NaN check: no CI
    return f"{d['delta']:+.3f}{band}"


def tables(results: dict, worst: dict[str, list[dict]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table; both renderers draw from this one list."""
    out = []
    baselines = results.get("baselines", {})
    for name, s in results["sets"].items():
        names = list(s["metrics"])
        header = ["metric", "model", "95% CI", "CI method"] + [f"{b} (Δ model−{b}, 95% CI)" for b in baselines]
        rows = []
        for m in names:
            row = [m, _f(s["metrics"][m]), _ci(s["ci"].get(m)), s.get("ci_method", {}).get(m, "")]
            for b, bres in baselines.items():
                bs = bres["sets"].get(name, {})
                row.append(f"{_f(bs.get('metrics', {}).get(m))} ({_delta(bs.get('compare', {}).get('delta', {}).get(m))})")
            rows.append(row)
        for b, bres in baselines.items():
            c = bres["sets"].get(name, {}).get("compare")
            if c:
                rows.append([f"regressions vs {b}", str(c["regressions"]), "", "", *[""] * len(baselines)])
                rows.append([f"improvements vs {b}", str(c["improvements"]), "", "", *[""] * len(baselines)])
        out.append((f"Set `{name}` — {s['n']} examples", header, rows))
    # every set of the systems on one engine is generated in one pass: the rates are the pass's
    perf_header = ["system", "set", "latency p50 (s)", "latency p95 (s)", "tokens/s (its pass)", "examples/s (its pass)"]
    perf_rows = []
    for system, block in [("model", results)] + [(b, r) for b, r in baselines.items()]:
        for name, s in block["sets"].items():
            p = s["perf"]
            perf_rows.append([system, name, _f(p["latency_p50_s"]), _f(p["latency_p95_s"]), _f(p["tokens_per_s"]),
                              _f(p["examples_per_s"])])
    out.append(("Speed", perf_header, perf_rows))
    fail_rows = []
    for name, s in results["sets"].items():
        for cause, count in sorted(s["failures"].items(), key=lambda kv: -kv[1]):
            for r in worst.get(f"{name}/{cause}", []):
                fail_rows.append([name, f"{cause} ({count})", r["id"], _clip(r["instruction"]),
                                  _clip(str(r["reference"])), _clip(r["output"]), _clip(r.get("detail") or "")])
    out.append(("Worst failures, grouped by cause", ["set", "cause (count)", "id", "instruction", "reference",
                                                    "output", "detail"], fail_rows))
    return out


def side_by_side(all_rows: dict[str, dict[str, list[dict]]], set_name: str, n: int = SIDE_BY_SIDE_ROWS):
    """(title, header, rows): the first ``n`` examples of ``set_name`` with every system's output."""
    systems = list(all_rows)
    by_id = {s: {r["id"]: r for r in all_rows[s].get(set_name, [])} for s in systems}
    rows = []
    for r in all_rows["model"].get(set_name, [])[:n]:
        cells = [r["id"], _clip(r["instruction"]), _clip(str(r["reference"]))]
        for s in systems:
            other = by_id[s].get(r["id"])
            cells.append("" if other is None else ("✓ " if other["correct"] else "✗ ") + _clip(other["output"]))
        rows.append(cells)
    return (f"Side by side — first {len(rows)} examples of `{set_name}`",
            ["id", "instruction", "reference", *systems], rows)


def worst_failures(rows_by_set: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Up to ``WORST_PER_CAUSE`` failing rows per (set, cause), lowest token-F1 / judge score first."""
    groups: dict[str, list[dict]] = {}
    for name, rows in rows_by_set.items():
        for r in rows:
            if not r["correct"]:
                groups.setdefault(f"{name}/{r['reason'] or 'wrong'}", []).append(r)
    return {k: sorted(v, key=lambda r: (r.get("f1", 0.0), r.get("judge") or 0.0))[:WORST_PER_CAUSE]
            for k, v in groups.items()}


def _clip(text: str, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _intro(results: dict) -> list[tuple[str, str]]:
    items = [("model", results["model"]), ("task", results["task"]), ("contract", results["contract"]),
             ("primary metric", f"{results['primary_metric']} on `{results['primary_set']}`: "
                                f"{_f(results['metrics'].get(results['primary_metric']))} "
                                f"{_ci(results['ci'].get(results['primary_metric']))} "
                                f"({results.get('ci_method', {}).get(results['primary_metric'], 'no interval')})"),
             ("engine", results.get("engine", ""))]
    for b, r in results.get("baselines", {}).items():
        items.append((f"baseline {b}", r["model"]))
    return items


def to_markdown(results: dict, worst: dict[str, list[dict]], *, side: tuple | None = None,
                loss_png: bytes | None = None) -> str:
    lines = [f"# Eval report — {results['task']}", ""]
    lines += [f"- **{k}**: {v}" for k, v in _intro(results)] + [""]
    if loss_png:
        lines += ["## Training loss", "", "![train and dev loss](loss.png)", ""]
    for title, header, rows in tables(results, worst) + ([side] if side else []):
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["(none)", ""]
            continue
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def to_html(results: dict, worst: dict[str, list[dict]], *, side: tuple | None = None,
            loss_png: bytes | None = None) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>Eval report — {e(results['task'])}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:14px;text-align:left;vertical-align:top}th{background:#f3f3f3}</style></head><body>",
             f"<h1>Eval report — {e(results['task'])}</h1><ul>"]
    parts += [f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in _intro(results)]
    parts.append("</ul>")
    if loss_png:  # inlined, so the report stays one self-contained file
        parts.append("<h2>Training loss (train and dev)</h2><img alt='loss curve' src='data:image/png;base64,"
                     + base64.b64encode(loss_png).decode() + "'>")
    for title, header, rows in tables(results, worst) + ([side] if side else []):
        parts.append(f"<h2>{e(title.replace('`', ''))}</h2>")
        if not rows:
            parts.append("<p>(none)</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
