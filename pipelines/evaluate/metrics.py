"""Metrics per contract, built on ``pipelines.contract`` (the one definition of a valid output).

``score_example`` turns one (prediction, reference) pair into a row of per-example facts;
``aggregate`` turns rows into the named metrics scripts rely on. Keeping the two apart lets the
bootstrap resample rows and recompute any metric, including non-averages such as macro-F1.

Names: text ``exact_match``, ``normalized_match``, ``token_f1``; label ``accuracy``, ``macro_f1``;
json ``parse_rate``, ``schema_valid_rate``, ``field_precision``, ``field_recall``, ``field_f1``,
``exact_record_rate`` and ``<field>_accuracy`` per top-level field of the reference; tool_call ``parse_rate``, ``tool_name_accuracy``, ``argument_accuracy``,
``call_accuracy``, ``no_call_accuracy``; every contract ``valid_rate`` (the contract's verdict), and under
constrained greedy decoding ``unconstrained_valid_rate``: rows valid without the constraint ever
overriding the model's choice, i.e. the validity the same model has decoding freely.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from typing import Any, Callable

from pipelines.contract import Checker, normalize_tool_calls

PRIMARY = {"text": "token_f1", "label": "accuracy", "json": "field_f1", "tool_call": "call_accuracy"}
INVALID = "<invalid>"


# -- text ------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD-style)."""
    text = str(text or "").lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_text(pred).split(), normalize_text(ref).split()
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


# -- json ------------------------------------------------------------------------------------------
def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a JSON value as ``{"a.b[0]": leaf}``; an empty dict/list is a leaf itself."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix or "$": value}


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _parse_json(text: Any) -> tuple[bool, Any]:
    if not isinstance(text, str):
        return text is not None, text
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False, None


# -- tool calls ------------------------------------------------------------------------------------
def reference_calls(ref: Any) -> list[dict]:
    """Expected calls from a reference: a call, a list of calls, OpenAI ``tool_calls``, JSON text of
    any of these; ``[]``/``null``/plain text mean "no call expected"."""
    if isinstance(ref, str):
        ok, parsed = _parse_json(ref)
        if not ok:
            return []
        ref = parsed
    if ref in (None, [], {}):
        return []
    return normalize_tool_calls(ref) or []


def _match_calls(pred: list[dict], ref: list[dict]) -> tuple[int, int, int]:
    """Greedy order-insensitive matching: (calls matched exactly, names matched, arguments right).

    Each reference call is paired with the unused predicted call of the same name that agrees on
    the most arguments, so parallel calls in any order score as they should.
    """
    used: set[int] = set()
    exact = names = args_right = 0
    for rc in ref:
        best, best_score = None, -1
        for j, pc in enumerate(pred):
            if j in used or pc["name"] != rc["name"]:
                continue
            score = sum(_canon(pc["arguments"].get(k)) == _canon(v) for k, v in rc["arguments"].items())
            if score > best_score:
                best, best_score = j, score
        if best is None:
            continue
        used.add(best)
        names += 1
        args_right += best_score
        exact += _canon(pred[best]["arguments"]) == _canon(rc["arguments"])
    return exact, names, args_right


# -- per example -----------------------------------------------------------------------------------
def score_example(checker: Checker, pred: str | None, ref: Any) -> dict[str, Any]:
    """Per-example facts for ``aggregate``; ``correct`` is the one yes/no used for regressions."""
    kind = checker.type
    verdict = checker.check(pred)
    row: dict[str, Any] = {"valid": verdict.valid, "reason": verdict.reason, "detail": verdict.detail}
    if kind == "text":
        ref_s = str(ref if ref is not None else "")
        row.update(exact=str(pred or "").strip() == ref_s.strip(),
                   normalized=normalize_text(pred) == normalize_text(ref_s), f1=token_f1(pred or "", ref_s))
        row["correct"] = row["normalized"]
    elif kind == "label":
        ref_label = checker.check(str(ref)).value if ref is not None else None
        row.update(pred_label=verdict.value if verdict.valid else INVALID, ref_label=ref_label or str(ref))
        row["correct"] = row["pred_label"] == row["ref_label"]
    elif kind == "json":
        parsed_ok, value = _parse_json(pred)
        _, ref_value = _parse_json(ref) if isinstance(ref, str) else (True, ref)
        p_leaves = {k: _canon(v) for k, v in flatten(value).items()} if parsed_ok else {}
        r_leaves = {k: _canon(v) for k, v in flatten(ref_value).items()}
        row.update(parsed=parsed_ok, tp=sum(p_leaves.get(k) == v for k, v in r_leaves.items()),
                   n_pred=len(p_leaves), n_ref=len(r_leaves),
                   exact_record=parsed_ok and _canon(value) == _canon(ref_value))
        if isinstance(ref_value, dict):  # per top-level field, e.g. intent_accuracy for a triage record
            got = value if parsed_ok and isinstance(value, dict) else {}
            row["fields"] = {k: k in got and _canon(got[k]) == _canon(v) for k, v in ref_value.items()}
        row["correct"] = row["exact_record"]
    elif kind == "tool_call":
        expected = reference_calls(ref)
        parsed_ok, value = _parse_json(pred)
        calls = (normalize_tool_calls(value) or []) if parsed_ok else []
        is_call = parsed_ok and bool(calls)
        exact, names, args_right = _match_calls(calls, expected)
        n_args = sum(len(c["arguments"]) for c in expected)
        row.update(expects_call=bool(expected), parsed=is_call, n_expected=len(expected), n_pred=len(calls),
                   names_ok=Counter(c["name"] for c in calls) == Counter(c["name"] for c in expected),
                   args_right=args_right, n_args=n_args,
                   call_ok=exact == len(expected) == len(calls))
        row["correct"] = row["call_ok"]
    else:
        raise ValueError(f"contract type {kind!r}: no metrics")
    return row


# -- aggregates ------------------------------------------------------------------------------------
def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _prf(tp: int, n_pred: int, n_ref: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else (1.0 if n_ref == 0 else 0.0)
    r = tp / n_ref if n_ref else (1.0 if n_pred == 0 else 0.0)
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def label_report(rows: list[dict], labels: list[str]) -> dict[str, Any]:
    """Per-label precision/recall/F1 and the confusion matrix (``confusion[ref][pred]``)."""
    confusion: dict[str, Counter] = {l: Counter() for l in labels}
    for r in rows:
        confusion.setdefault(r["ref_label"], Counter())[r["pred_label"]] += 1
    per_label = {}
    for l in labels:
        tp = confusion.get(l, Counter())[l]
        n_pred = sum(c[l] for c in confusion.values())
        n_ref = sum(confusion.get(l, Counter()).values())
        p, rc, f = _prf(tp, n_pred, n_ref)
        per_label[l] = {"precision": p, "recall": rc, "f1": f, "support": n_ref}
    return {"per_label": per_label, "confusion": {k: dict(v) for k, v in confusion.items()}}


def aggregate(kind: str, rows: list[dict], labels: list[str] | None = None) -> dict[str, float]:
    """The named metrics for rows of one contract type (see the module doc)."""
    if not rows:
        return {}
    m: dict[str, float] = {"valid_rate": _mean(r["valid"] for r in rows)}
    if kind == "text":
        m.update(exact_match=_mean(r["exact"] for r in rows), normalized_match=_mean(r["normalized"] for r in rows),
                 token_f1=_mean(r["f1"] for r in rows))
    elif kind == "label":
        m["accuracy"] = _mean(r["correct"] for r in rows)
        seen = sorted({r["ref_label"] for r in rows})
        per = label_report(rows, list(labels or seen))["per_label"]
        # macro over labels that occur in the references (or are predicted), so absent labels
        # in a small eval set do not drag the mean to zero
        present = [l for l, v in per.items() if v["support"] or any(r["pred_label"] == l for r in rows)]
        m["macro_f1"] = _mean(per[l]["f1"] for l in present)
    elif kind == "json":
        tp, n_pred, n_ref = (sum(r[k] for r in rows) for k in ("tp", "n_pred", "n_ref"))
        p, rc, f = _prf(tp, n_pred, n_ref)
        m.update(parse_rate=_mean(r["parsed"] for r in rows), schema_valid_rate=m["valid_rate"],
                 field_precision=p, field_recall=rc, field_f1=f,
                 exact_record_rate=_mean(r["exact_record"] for r in rows))
        for key in sorted({k for r in rows for k in r.get("fields", {})}):
            m[f"{key}_accuracy"] = _mean(r.get("fields", {}).get(key, False) for r in rows)
    elif kind == "tool_call":
        calls = [r for r in rows if r["expects_call"]]
        none = [r for r in rows if not r["expects_call"]]
        n_args = sum(r["n_args"] for r in calls)
        m.update(parse_rate=_mean(r["parsed"] for r in calls) if calls else 1.0,
                 tool_name_accuracy=_mean(r["names_ok"] for r in rows),
                 argument_accuracy=sum(r["args_right"] for r in calls) / n_args if n_args else 1.0,
                 call_accuracy=_mean(r["call_ok"] for r in rows))
        if none:
            m["no_call_accuracy"] = _mean(r["call_ok"] for r in none)
    if all("guide_interventions" in r for r in rows):  # constrained greedy decoding (see engines.constrain)
        m["unconstrained_valid_rate"] = _mean(r["valid"] and not r["guide_interventions"] for r in rows)
    if any("judge" in r for r in rows):
        scores = [r["judge"] for r in rows if r.get("judge") is not None]
        m["judge_parse_rate"] = len(scores) / len(rows)
        if scores:
            m["judge_score"] = _mean(scores)
    return m


def score(checker: Checker, preds: list, refs: list) -> tuple[list[dict], dict[str, float]]:
    rows = [score_example(checker, p, r) for p, r in zip(preds, refs)]
    return rows, aggregate(checker.type, rows, checker.contract.labels)


# -- bootstrap -------------------------------------------------------------------------------------
def bootstrap(rows: list[dict], fn: Callable[[list[dict]], dict[str, float]], *, n: int = 1000,
              seed: int = 0, alpha: float = 0.05) -> dict[str, list[float]]:
    """Percentile confidence intervals ``{metric: [lo, hi]}`` by resampling rows with replacement."""
    import numpy as np

    if n <= 0 or not rows:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        sample = [rows[i] for i in rng.integers(0, len(rows), len(rows))]
        for k, v in fn(sample).items():
            draws.setdefault(k, []).append(v)
    return {k: [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))] for k, v in draws.items()}


def paired_bootstrap(a: list[dict], b: list[dict], fn: Callable[[list[dict]], dict[str, float]], *,
                     n: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, dict[str, float]]:
    """``{metric: {"delta", "lo", "hi"}}`` for a − b over the same examples (rows aligned), resampling
    example indices jointly so the interval reflects the paired design."""
    import numpy as np

    if not a or len(a) != len(b):
        raise ValueError("paired bootstrap needs two equally long, aligned row lists")
    fa, fb = fn(a), fn(b)
    out = {k: {"delta": fa[k] - fb[k], "lo": float("nan"), "hi": float("nan")} for k in fa if k in fb}
    if n <= 0:
        return out
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in out}
    for _ in range(n):
        idx = rng.integers(0, len(a), len(a))
        sa, sb = fn([a[i] for i in idx]), fn([b[i] for i in idx])
        for k in draws:
            if k in sa and k in sb:
                draws[k].append(sa[k] - sb[k])
    for k, v in draws.items():
        if v:
            out[k]["lo"], out[k]["hi"] = float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))
    return out
