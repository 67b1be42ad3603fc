"""`make bench` at toy sizes: every benchmark runs end to end and writes its JSON with its ratios.

The figures themselves mean nothing at these sizes (speed targets live in the benchmarks, not in
tests); what this catches is a benchmark that no longer runs, which `make local-test` otherwise
never exercises.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.engines.vllm_server import vllm_python

ROOT = Path(__file__).resolve().parent.parent

CASES = [  # module, toy-size arguments, ratio keys that must be finite numbers, agreement keys
    ("run", ["--n", "6"], ["speedup_examples_per_s"], []),
    ("factory", ["--rows", "1500"], ["speedup_vs_single_process", "near_recall", "exact_recall"], []),
    ("train", ["--model", "tiny", "--steps", "2", "--rows", "60"], ["speedup_tokens_per_s", "mfu"],
     ["same_examples_per_step", "losses_agree"]),
    ("serve", ["--n", "8", "--warmup", "2", "--rounds", "1"], ["router_overhead_ms_p50",
                                                                "req_per_s_ratio_router_vs_direct"],
     ["same_answers_router_vs_direct"]),
    pytest.param("serve_vllm", ["--small", "--part", "serve"],  # the eval part is the same engine, tested elsewhere
                 ["req_per_s_ratio_crucible_vs_bare", "router_overhead_p50_ms", "handle_hop", "http_hop"], [],
                 marks=pytest.mark.skipif(vllm_python() is None, reason="no vLLM venv: make setup-vllm"),
                 id="serve_vllm"),
]


@pytest.mark.slow
@pytest.mark.parametrize("module, args, ratios, agreements", CASES,
                         ids=[c[0] if isinstance(c, tuple) else c.id for c in CASES])
def test_benchmark_runs_and_writes_its_ratios(module, args, ratios, agreements, tmp_path):
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", *args, "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = "engines" if module == "run" else module
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["name"] == name and result["when"]
    for key in ratios:  # a number, or one per system
        value = _find(result, key)
        numbers = list(value.values()) if isinstance(value, dict) else [value]
        assert numbers and all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers), (key, value)
    for key in agreements:  # the fast and the baseline path must compute the same thing
        assert _find(result, key) is True, (key, _find(result, key))
    if module == "run":  # batched and one-at-a-time greedy decoding agree on every prompt
        assert result["same_outputs"] == result["n"]


def _find(doc, key):
    """``doc[key]``, searched through nested dicts (some benchmarks group figures)."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for v in doc.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None
