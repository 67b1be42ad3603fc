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

``rates`` names the metrics that are a share of rows (with their counts); ``intervals`` gives
those Wilson intervals and every other metric a BCa bootstrap one, each with its method.
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


def _same_numbers(value: Any) -> Any:
    """JSON has one number type: 2.0 and 2 are the same value (true stays a boolean)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _same_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_same_numbers(v) for v in value]
    return value


def _canon(value: Any) -> str:
    return json.dumps(_same_numbers(value), sort_keys=True, ensure_ascii=False)


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
    """Optimal order-insensitive pairing: (calls matched exactly, names matched, arguments right).

    Reference and predicted calls of the same name are paired by an assignment (Hungarian, scipy)
    that maximises exact matches first, then arguments right, then pairs. A greedy pairing goes
    wrong when one call's arguments are a subset of another's of the same function.
    """
    if not pred or not ref:
        return 0, 0, 0
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    args = [[sum(_canon(pc["arguments"].get(k)) == _canon(v) for k, v in rc["arguments"].items()) for pc in pred]
            for rc in ref]
    exact = [[_canon(pc["arguments"]) == _canon(rc["arguments"]) for pc in pred] for rc in ref]
    same = [[pc["name"] == rc["name"] for pc in pred] for rc in ref]
    # lexicographic weights: one exact match outweighs any number of arguments, one argument any
    # number of name-only pairs; pairs of different names are never taken
    n_pairs = min(len(pred), len(ref)) + 1
    per_arg = n_pairs
    per_exact = per_arg * (sum(len(rc["arguments"]) for rc in ref) + 1) * n_pairs
    w = np.array([[(per_exact * exact[i][j] + per_arg * args[i][j] + 1) if same[i][j] else -1
                   for j in range(len(pred))] for i in range(len(ref))], dtype=float)
    rows, cols = linear_sum_assignment(w, maximize=True)
    n_exact = names = args_right = 0
    for i, j in zip(rows, cols):
        if same[i][j]:
            names += 1
            args_right += args[i][j]
            n_exact += exact[i][j]
    return n_exact, names, args_right


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


def rates(kind: str, rows: list[dict]) -> dict[str, tuple[int, int]]:
    """The metrics that are a share of rows: ``{metric: (successes, trials)}``.

    These get binomial (Wilson) intervals; every other metric gets a bootstrap. ``aggregate``
    reads its rates from here, so the two never disagree on what a rate counts.
    """
    def share(pred, subset=None) -> tuple[int, int]:
        rs = rows if subset is None else subset
        return sum(bool(pred(r)) for r in rs), len(rs)

    out = {"valid_rate": share(lambda r: r["valid"])}
    if kind == "text":
        out.update(exact_match=share(lambda r: r["exact"]), normalized_match=share(lambda r: r["normalized"]))
    elif kind == "label":
        out["accuracy"] = share(lambda r: r["correct"])
    elif kind == "json":
        out.update(parse_rate=share(lambda r: r["parsed"]), schema_valid_rate=out["valid_rate"],
                   exact_record_rate=share(lambda r: r["exact_record"]))
        for key in sorted({k for r in rows for k in r.get("fields", {})}):
            out[f"{key}_accuracy"] = share(lambda r, key=key: r.get("fields", {}).get(key, False))
    elif kind == "tool_call":
        calls = [r for r in rows if r["expects_call"]]
        none = [r for r in rows if not r["expects_call"]]
        if calls:
            out["parse_rate"] = share(lambda r: r["parsed"], calls)
        out.update(tool_name_accuracy=share(lambda r: r["names_ok"]), call_accuracy=share(lambda r: r["call_ok"]))
        if none:
            out["no_call_accuracy"] = share(lambda r: r["call_ok"], none)
    if rows and all("guide_interventions" in r for r in rows):  # constrained greedy decoding (engines.constrain)
        out["unconstrained_valid_rate"] = share(lambda r: r["valid"] and not r["guide_interventions"])
    if any("judge" in r for r in rows):
        out["judge_parse_rate"] = share(lambda r: r.get("judge") is not None)
    return out


def aggregate(kind: str, rows: list[dict], labels: list[str] | None = None) -> dict[str, float]:
    """The named metrics for rows of one contract type (see the module doc)."""
    if not rows:
        return {}
    m: dict[str, float] = {name: k / n for name, (k, n) in rates(kind, rows).items()}
    if kind == "text":
        m["token_f1"] = _mean(r["f1"] for r in rows)
    elif kind == "label":
        seen = sorted({r["ref_label"] for r in rows})
        per = label_report(rows, list(labels or seen))["per_label"]
        # macro over labels that occur in the references (or are predicted), so absent labels
        # in a small eval set do not drag the mean to zero
        present = [l for l, v in per.items() if v["support"] or any(r["pred_label"] == l for r in rows)]
        m["macro_f1"] = _mean(per[l]["f1"] for l in present)
    elif kind == "json":
        tp, n_pred, n_ref = (sum(r[k] for r in rows) for k in ("tp", "n_pred", "n_ref"))
        p, rc, f = _prf(tp, n_pred, n_ref)
        m.update(field_precision=p, field_recall=rc, field_f1=f)
    elif kind == "tool_call":
        calls = [r for r in rows if r["expects_call"]]
        n_args = sum(r["n_args"] for r in calls)
        m.setdefault("parse_rate", 1.0)  # nothing expected a call: nothing could fail to parse
        m["argument_accuracy"] = sum(r["args_right"] for r in calls) / n_args if n_args else 1.0
    scores = [r["judge"] for r in rows if r.get("judge") is not None]
    if scores:
        m["judge_score"] = _mean(scores)
    return m


def score(checker: Checker, preds: list, refs: list) -> tuple[list[dict], dict[str, float]]:
    rows = [score_example(checker, p, r) for p, r in zip(preds, refs)]
    return rows, aggregate(checker.type, rows, checker.contract.labels)


# -- intervals -------------------------------------------------------------------------------------
# Rates get a binomial interval: a bootstrap of 40/40 has zero width, Wilson's is [0.912, 1].
# Other metrics get a BCa bootstrap; its jackknife costs one aggregate per row, so above
# BCA_MAX_ROWS rows (where BCa and percentile agree anyway) the percentile bootstrap is used.
# Every interval is reported with the method that made it.
BCA_MAX_ROWS = 2000


def wilson(k: int, n: int, alpha: float = 0.05) -> list[float]:
    """Wilson score interval of a binomial rate ``k/n``."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return [float(ci.low), float(ci.high)]


def _resample(n_rows: int, stat: Callable, keys: list[str], *, n: int, seed: int,
              alpha: float) -> dict[str, tuple[list[float], str]]:
    """``{key: ([lo, hi], method)}`` from resampling row indices; ``stat(idx)`` gives one value per key."""
    import warnings

    import numpy as np
    from scipy.stats import bootstrap as sp_bootstrap

    method = "BCa" if n_rows <= BCA_MAX_ROWS else "percentile"
    with warnings.catch_warnings():  # a degenerate metric (every draw equal) is handled below
        warnings.simplefilter("ignore")
        res = sp_bootstrap((np.arange(n_rows),), lambda idx: stat(idx.astype(int)), method=method,
                           n_resamples=n, vectorized=False, confidence_level=1 - alpha, rng=seed)
    lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    dist = np.atleast_2d(res.bootstrap_distribution)
    out = {}
    for i, k in enumerate(keys):
        draws = dist[i][~np.isnan(dist[i])]
        if not draws.size:
            continue
        if np.isfinite(lo[i]) and np.isfinite(hi[i]):
            out[k] = ([float(lo[i]), float(hi[i])], f"{method} bootstrap")
        elif draws.min() == draws.max():  # every resample gave the same value
            out[k] = ([float(draws[0])] * 2, "bootstrap (degenerate: every resample equal)")
        else:  # BCa undefined here (e.g. a metric absent from some resamples)
            out[k] = ([float(np.quantile(draws, alpha / 2)), float(np.quantile(draws, 1 - alpha / 2))],
                      "percentile bootstrap")
    return out


def bootstrap(rows: list[dict], fn: Callable[[list[dict]], dict[str, float]], *, n: int = 1000,
              seed: int = 0, alpha: float = 0.05, keys: list[str] | None = None
              ) -> dict[str, tuple[list[float], str]]:
    """``{metric: ([lo, hi], method)}`` by resampling rows with replacement (BCa, see above)."""
    import numpy as np

    if n <= 0 or len(rows) < 2:  # one row has no spread to resample
        return {}
    keys = list(fn(rows)) if keys is None else keys

    def stat(idx):
        got = fn([rows[i] for i in idx])
        return np.array([got.get(k, np.nan) for k in keys], dtype=float)

    return _resample(len(rows), stat, keys, n=n, seed=seed, alpha=alpha) if keys else {}


def intervals(kind: str, rows: list[dict], labels: list[str] | None = None, *, n: int = 1000, seed: int = 0,
              alpha: float = 0.05) -> tuple[dict[str, list[float]], dict[str, str]]:
    """``(ci, ci_method)``: ``{metric: [lo, hi]}`` and ``{metric: method}``; Wilson for the rates,
    a bootstrap of ``n`` resamples for the other metrics (none when ``n`` is 0)."""
    if not rows:
        return {}, {}
    ci, method = {}, {}
    counted = rates(kind, rows)
    for name, (k, trials) in counted.items():
        ci[name], method[name] = wilson(k, trials, alpha), "Wilson"
    fn = lambda rs: aggregate(kind, rs, labels)  # noqa: E731
    others = [k for k in fn(rows) if k not in counted]
    for name, (band, how) in bootstrap(rows, fn, n=n, seed=seed, alpha=alpha, keys=others).items():
        ci[name], method[name] = band, how
    return ci, method


def paired_bootstrap(a: list[dict], b: list[dict], fn: Callable[[list[dict]], dict[str, float]], *,
                     n: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """``{metric: {"delta", "lo", "hi", "method"}}`` for a − b over the same examples (rows aligned),
    resampling example indices jointly so the interval reflects the paired design."""
    import numpy as np

    if not a or len(a) != len(b):
        raise ValueError("paired bootstrap needs two equally long, aligned row lists")
    fa, fb = fn(a), fn(b)
    keys = [k for k in fa if k in fb]
    out = {k: {"delta": fa[k] - fb[k], "lo": float("nan"), "hi": float("nan"), "method": None} for k in keys}
    if n <= 0 or len(a) < 2:
        return out

    def stat(idx):
        sa, sb = fn([a[i] for i in idx]), fn([b[i] for i in idx])
        return np.array([sa[k] - sb[k] if k in sa and k in sb else np.nan for k in keys], dtype=float)

    for k, ((lo, hi), how) in _resample(len(a), stat, keys, n=n, seed=seed, alpha=alpha).items():
        out[k].update(lo=lo, hi=hi, method=f"paired {how}")
    return out
