"""Full `crucible eval` / `gate` / `score` / `predict` on a tiny model built by `crucible init-model`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.cli import app

runner = CliRunner()
LABELS = ["even", "odd"]


def invoke(*args, code=0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, f"exit {r.exit_code}: {r.output}\n{r.exception!r}"
    return r


def jline(r) -> dict:
    return json.loads(r.stdout)  # --json: stdout is exactly one object


def rows(n, start=0):
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"is {i} even or odd?"},
                                         {"role": "assistant", "content": LABELS[i % 2]}],
             "source": f"x:{i}", "meta": {}} for i in range(start, start + n)]


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory, gpt2_tokenizer):
    """A registry with a tiny model (from `crucible init-model`), a dataset and a spec."""
    tmp = tmp_path_factory.mktemp("evalproj")
    reg = f"file://{tmp}/registry"
    model_dir = tmp / "base"
    info = jline(invoke("init-model", model_dir, "--tokenizer", gpt2_tokenizer, "--task", "parity",
                        "--registry", reg, "--json"))
    from infra.registry import Registry

    r = Registry.open(reg, cache_dir=tmp / "cache")
    ds = r.create("dataset", "parity", files={
        "train.jsonl": json.dumps(rows(1)[0]).encode() + b"\n" + json.dumps(rows(1, 1)[0]).encode() + b"\n",
        "test.jsonl": write_jsonl(tmp / "test.jsonl", rows(10, 10)),
        "eval/golden.jsonl": write_jsonl(tmp / "golden.jsonl", rows(4, 30))})
    spec = tmp / "spec.yaml"
    spec.write_text(f"""
task: parity
contract: {{type: label, labels: [even, odd]}}
model: {{base: {model_dir}, system_prompt: "Say even or odd."}}
eval: {{max_new_tokens: 4, batch_size: 4, bootstrap: 50, baselines: [base]}}
gates:
  - {{metric: accuracy, min: 0.0}}
  - {{metric: latency_p95_s, max: 60}}
""")
    return {"tmp": tmp, "reg": reg, "model": info["model"], "dataset": ds.id, "spec": spec, "model_dir": model_dir}


@pytest.fixture(scope="module")
def evaluated(project):
    r = invoke("eval", project["spec"], "--model", project["model"], "--baseline", "prompted-base",
               "--registry", project["reg"], "--json")
    return jline(r)


def test_eval_json_shape_and_registered_files(evaluated, project):
    res = evaluated
    assert res["eval"].startswith("eval-parity-")
    assert res["n"] == 10 and res["primary_set"] == "test" and set(res["sets"]) == {"test", "golden"}
    assert set(res["metrics"]) >= {"accuracy", "macro_f1", "valid_rate"}
    for name, lo_hi in res["ci"].items():
        assert lo_hi[0] <= res["metrics"][name] + 1e-9 and lo_hi[1] >= res["metrics"][name] - 1e-9
    assert set(res["baselines"]) == {"base", "prompted-base"}
    cmp = res["baselines"]["base"]["sets"]["test"]["compare"]
    assert set(cmp["delta"]["accuracy"]) == {"delta", "lo", "hi", "method"} and cmp["paired"] == 10
    assert cmp["delta"]["accuracy"]["method"] in ("paired BCa bootstrap",
                                                  "paired bootstrap (degenerate: every resample equal)")
    # each interval names its method: rates binomial, the rest bootstrap
    assert res["ci_method"]["accuracy"] == "Wilson" and res["ci_method"]["valid_rate"] == "Wilson"
    assert "bootstrap" in res["ci_method"]["macro_f1"]
    p = res["perf"]
    assert 0 < p["latency_p50_s"] <= p["latency_p95_s"] and p["tokens_per_s"] > 0
    # one pass per engine: the model's two sets together; base and prompted-base (same weights) together
    assert p["pass_sets"] == ["model/test", "model/golden"] and p["pass_examples"] == 14
    assert p["examples_per_s"] == pytest.approx(14 / p["wall_s"])
    shared = res["baselines"]["prompted-base"]["sets"]["golden"]["perf"]
    assert shared["pass_sets"] == ["base/test", "base/golden", "prompted-base/test", "prompted-base/golden"]
    assert shared["pass_examples"] == 28
    from infra.registry import Registry

    reg = Registry.open(project["reg"], cache_dir=project["tmp"] / "cache")
    m = reg.get(res["eval"])
    assert m.inputs["model"] == project["model"] and m.inputs["dataset"] == project["dataset"]
    assert {"results.json", "report.md", "report.html", "spec.json", "predictions/model/test.jsonl",
            "predictions/base/golden.jsonl", "predictions/prompted-base/test.jsonl"} <= set(m.files)
    preds = [json.loads(l) for l in reg.read_file(m.id, "predictions/model/test.jsonl").decode().splitlines()]
    assert [x["id"] for x in preds] == [f"r{i}" for i in range(10, 20)]
    rows = {}
    for system in ("base", "prompted-base"):  # each system's rows of the shared pass are its own
        got = {s: [json.loads(l) for l in reg.read_file(m.id, f"predictions/{system}/{s}.jsonl").decode().splitlines()]
               for s in ("test", "golden")}
        assert [x["id"] for x in got["test"]] == [x["id"] for x in preds]
        assert len(got["golden"]) == 4 and not {x["id"] for x in got["golden"]} & {x["id"] for x in preds}
        rows[system] = got["test"]
    # prompted-base's prompts carry its few-shot examples: longer, row by row
    assert all(p["prompt_tokens"] > b["prompt_tokens"] for p, b in zip(rows["prompted-base"], rows["base"]))
    # the metric is recomputable from the stored rows
    assert res["metrics"]["accuracy"] == pytest.approx(sum(x["correct"] for x in preds) / 10)
    md = reg.read_file(m.id, "report.md").decode()
    for needle in ("| accuracy |", "prompted-base", "latency p95", "Worst failures", "regressions vs base",
                   "| CI method |", "| Wilson |"):
        assert needle in md
    assert "<table>" in reg.read_file(m.id, "report.html").decode()
    # Side by side: the first test examples with every system's output, marked right or wrong.
    side = md[md.index("## Side by side"):]
    assert "| id | instruction | reference | model | base | prompted-base |" in side
    first = next(line for line in side.splitlines() if line.startswith("| r10 |"))
    assert first.count("✓") + first.count("✗") == 3
    assert "loss.png" not in m.files  # an init-model model has no training run, so no loss curve


def test_baselines_build_their_prompts(evaluated, project):
    """base sees no system prompt; prompted-base sees the contract instruction and train few-shot."""
    from infra.registry import Registry
    from pipelines.evaluate.runner import build_chats
    from pipelines.evaluate.rows import read_examples
    from pipelines.evaluate.sources import baseline_system
    from pipelines.spec import load_spec

    spec = load_spec(project["spec"])
    reg = Registry.open(project["reg"], cache_dir=project["tmp"] / "cache")
    exs = read_examples(project["tmp"] / "test.jsonl")
    train = exs[:2]
    pb = baseline_system("prompted-base", spec, reg, project["model"], train)
    chat = build_chats(exs[:1], system=pb.system_prompt, fewshot=pb.fewshot, force_system=True)[0]
    assert chat[0]["role"] == "system" and "even, odd" in chat[0]["content"] and "Say even or odd." in chat[0]["content"]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user"]
    b = baseline_system("base", spec, reg, project["model"], train)
    with_sys = [{"role": "system", "content": "x"}, *exs[0].chat]
    exs[0].chat = with_sys
    assert all(m["role"] != "system" for m in build_chats(exs[:1], strip_system=b.strip_system)[0])
    # base and prompted-base differ only in prompts: eval opens one engine for both, not for the model
    from pipelines.evaluate.sources import candidate_system, engine_key
    assert engine_key(b, spec, reg) == engine_key(pb, spec, reg)
    assert engine_key(candidate_system(spec, reg, project["model"]), spec, reg) != engine_key(b, spec, reg)


def test_gate_pass_and_fail_exit_codes(evaluated, project, tmp_path):
    ok = jline(invoke("gate", evaluated["eval"], "--registry", project["reg"], "--json"))
    assert ok["passed"] is True and len(ok["checks"]) == 4  # 2 gates x 2 sets
    assert ok["verdict_record"].startswith("eval-parity-")
    from infra.registry import Registry

    reg = Registry.open(project["reg"], cache_dir=project["tmp"] / "cache")
    assert reg.get(ok["verdict_record"]).metadata["passed"] is True  # what serving reads before a promote
    strict = tmp_path / "strict.yaml"
    strict.write_text(project["spec"].read_text().replace("{metric: accuracy, min: 0.0}",
                                                          "{metric: accuracy, min: 1.01, eval_set: golden}"))
    r = invoke("gate", evaluated["eval"], strict, "--registry", project["reg"], "--json", code=1)
    bad = jline(r)
    assert bad["passed"] is False and [c["metric"] for c in bad["failed"]] == ["accuracy"]
    assert "min 1.01" in bad["failed"][0]["reasons"][0]
    r = invoke("gate", evaluated["eval"], strict, "--registry", project["reg"], code=1)
    assert "accuracy@golden" in r.output
    # a gate on a baseline the eval never ran fails closed
    missing = tmp_path / "missing.yaml"
    missing.write_text(project["spec"].read_text().replace(
        "{metric: accuracy, min: 0.0}", "{metric: regressions, against: parity@production, max: 0}"))
    bad = jline(invoke("gate", evaluated["eval"], missing, "--registry", project["reg"], "--json", code=1))
    assert "not measured" in bad["failed"][0]["reasons"][0]
    assert reg.get(bad["verdict_record"]).metadata["verdict"] == "fail"
    assert reg.get(bad["verdict_record"]).metadata["passed"] is False


def test_gate_logic_beats_regressions_and_default_validity():
    from pipelines.evaluate.gates import check, effective_gates
    from pipelines.spec import spec_from_dict

    results = {"sets": {"golden": {"metrics": {"accuracy": 0.8, "valid_rate": 0.97}, "perf": {"latency_p95_s": 0.2}}},
               "baselines": {"t@production": {"sets": {"golden": {"metrics": {"accuracy": 0.7}, "perf": {},
                                                                  "compare": {"regressions": 2}}}}}}
    spec = spec_from_dict({"task": "t", "model": {"base": "x"},
                           "contract": {"type": "json", "schema": {"type": "object"}},
                           "gates": [{"metric": "accuracy", "beats": "t@production", "margin": 0.05},
                                     {"metric": "regressions", "against": "t@production", "max": 0}]})
    v = check(results, effective_gates(spec))
    assert [c["passed"] for c in v["checks"]] == [True, False, False]  # beats ok; 2 regressions; valid 0.97 < 0.99
    assert v["checks"][2]["implicit"] and not v["passed"]


def test_score_command(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "output": "pos"}, {"id": "b", "output": "neg"},
                                               {"id": "c", "output": "???"}])
    refs = write_jsonl(tmp_path / "r.jsonl", [{"id": "b", "output": "pos"}, {"id": "a", "output": "pos"},
                                              {"id": "c", "output": "neg"}, {"id": "d", "output": "neg"}])
    res = jline(invoke("score", "--contract", "label", "--labels", "pos,neg", "--predictions", preds,
                       "--references", refs, "--json"))
    assert res["n"] == 3 and res["metrics"]["accuracy"] == pytest.approx(1 / 3)
    assert res["missing_predictions"] == 1
    calls = write_jsonl(tmp_path / "tp.jsonl", [{"id": "1", "output": '[{"name": "b", "arguments": {}}, '
                                                                      '{"name": "a", "arguments": {"x": 1}}]'}])
    crefs = write_jsonl(tmp_path / "tr.jsonl", [{"id": "1", "output": [{"name": "a", "arguments": {"x": 1}},
                                                                       {"name": "b", "arguments": {}}]}])
    res = jline(invoke("score", "--contract", "tool_call", "--predictions", calls, "--references", crefs, "--json"))
    assert res["metrics"]["call_accuracy"] == 1.0 and res["metrics"]["parse_rate"] == 1.0
    r = invoke("score", "--contract", "json", "--predictions", preds, "--references", refs, "--json", code=2)
    assert "schema" in r.output


def test_predict_keeps_ids_and_uses_saved_system_prompt(project, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(project["model_dir"], model)
    (model / "crucible.json").write_text(json.dumps({"system_prompt": "SAVED-PROMPT"}))
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "x1", "prompt": "hello"},
                                              {"instruction": "add", "input": "1 2"},
                                              {"id": "x3", "messages": [{"role": "system", "content": "own"},
                                                                        {"role": "user", "content": "hi"}]}])
    out = tmp_path / "out.jsonl"
    res = jline(invoke("predict", model, "--input", inp, "--output", out, "--max-new-tokens", "3", "--json"))
    got = [json.loads(l) for l in out.read_text().splitlines()]
    assert res["n"] == 3 and [g["id"] for g in got] == ["x1", "line-2", "x3"]
    assert all(isinstance(g["output"], str) and g["completion_tokens"] <= 3 for g in got)
    from pipelines.engines import get_engine
    from pipelines.evaluate.runner import build_chats
    from pipelines.evaluate.rows import read_examples

    eng = get_engine("hf", model=str(model))
    assert eng.default_system_prompt == "SAVED-PROMPT"
    chats = build_chats(read_examples(inp, need_reference=False), system=eng.default_system_prompt)
    assert chats[0][0] == {"role": "system", "content": "SAVED-PROMPT"} and chats[2][0]["content"] == "own"


def test_constrained_eval_and_predict(evaluated, project, tmp_path):
    """Under contract.constrained_decoding every system answers a label; the model's own validity is
    still reported, and equals what the free-decoding eval measured for the same greedy model."""
    r = jline(invoke("eval", project["spec"], "--model", project["model"], "--registry", project["reg"],
                     "--set", "contract.constrained_decoding=true", "--json"))
    for res in [r["sets"], *(b["sets"] for b in r["baselines"].values())]:
        for s in res.values():
            assert s["metrics"]["valid_rate"] == 1.0
    for name, s in r["sets"].items():
        assert s["metrics"]["unconstrained_valid_rate"] == evaluated["sets"][name]["metrics"]["valid_rate"]
    import shutil

    model = tmp_path / "model"
    shutil.copytree(project["model_dir"], model)
    (model / "crucible.json").write_text(json.dumps({"guide": json.dumps({"choice": LABELS})}))
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"x{i}", "prompt": f"is {i} even?"} for i in range(4)])
    for flag, constrained in (([], True), (["--free"], False)):
        out = tmp_path / f"out{len(flag)}.jsonl"
        res = jline(invoke("predict", model, "--input", inp, "--output", out, "--max-new-tokens", "3", *flag, "--json"))
        got = [json.loads(l)["output"] for l in out.read_text().splitlines()]
        assert res["constrained"] is constrained
        assert all(g in LABELS for g in got) is constrained, got


def test_eval_with_http_judge(project, tmp_path, monkeypatch):
    """The judge runs through the http engine against a real local server; unparsed replies are not 0."""
    from infra.registry import Registry
    from pipelines.engines import get_engine
    from pipelines.evaluate import results_of, run
    from pipelines.spec import load_spec
    from tests.openai_server import serve

    judge_model = get_engine("hf", model=str(project["model_dir"]))
    reg = Registry.open(project["reg"], cache_dir=project["tmp"] / "cache")
    with serve(judge_model) as (url, state):
        spec = load_spec(project["spec"], [f"eval.judge={{engine: http, url: '{url}', model: tiny}}",
                                           "eval.baselines=[]", "eval.limit=3"])
        m = run(spec, reg, project["model"], log=lambda *a: None, progress=False)
        assert state["requests"] == 6  # 3 test + 3 golden rows judged
    _, res = results_of(reg, m.id)
    rows = [json.loads(l) for l in reg.read_file(m.id, "predictions/model/test.jsonl").decode().splitlines()]
    assert all("judge_reply" in r for r in rows)
    parsed = [r["judge"] for r in rows if r["judge"] is not None]
    assert res["metrics"]["judge_parse_rate"] == pytest.approx(len(parsed) / 3)
    assert ("judge_score" in res["metrics"]) == bool(parsed)


def test_score_40_of_40_valid_rate_interval_and_lower_bound_gate(tmp_path):
    """40/40 schema-valid triage records: the rate's Wilson interval is [0.912, 1], not [1, 1]; a
    point gate at 0.95 passes, the same gate on the lower bound fails (exit 1)."""
    import csv

    from tests.conftest import shared

    root = Path(__file__).resolve().parents[1]
    with open(shared("datasets", "customer-support", "support.csv"), newline="") as f:
        records = [r for _, r in zip(range(40), csv.DictReader(f))]
    refs, preds = [], []
    for i, r in enumerate(records):
        entity = {"type": r["entity_type"], "value": r["entity_value"]} if r["entity_type"] else None
        rec = {"intent": r["intent"], "category": r["category"], "entity": entity}
        refs.append({"id": str(i), "output": rec})
        preds.append({"id": str(i), "output": json.dumps(rec if i % 5 else {**rec, "entity": None})})
    p, r = write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs)
    base = ["score", "--contract", "json", "--schema", root / "examples/support-triage/schema.json",
            "--predictions", p, "--references", r, "--bootstrap", "200"]
    res = jline(invoke(*base, "--gate", "{metric: schema_valid_rate, min: 0.95}", "--json"))
    assert res["metrics"]["schema_valid_rate"] == 1.0 and res["gate"]["passed"]
    lo, hi = res["ci"]["schema_valid_rate"]
    assert res["ci_method"]["schema_valid_rate"] == "Wilson" and lo < 0.95 and hi == 1.0
    assert lo == pytest.approx(0.912, abs=1e-3)
    assert res["ci_method"]["field_f1"] == "BCa bootstrap"
    assert res["ci"]["field_f1"][0] < res["metrics"]["field_f1"] < res["ci"]["field_f1"][1]
    r1 = invoke(*base, "--gate", "{metric: schema_valid_rate, min: 0.95, on: lower_bound}", "--json", code=1)
    bad = jline(r1)
    assert not bad["gate"]["passed"] and bad["gate"]["failed"][0]["on"] == "lower_bound"
    assert "lower bound 0.9124 < min 0.95" in bad["gate"]["failed"][0]["reasons"][0]
    assert len([l for l in r1.stdout.splitlines() if l.strip()]) == 1  # --json: one object, nothing else
    human = invoke(*base, "--gate", "{metric: schema_valid_rate, min: 0.95, on: lower_bound}", code=1)
    assert "Wilson" in human.output and "lower_bound" in human.output
    r2 = invoke(*base, "--gate", "{metric: schema_valid_rate, min: 0.95, on: lowest}", code=2)
    assert "--gate #1" in r2.output and "on" in r2.output


@pytest.mark.slow
def test_generation_fans_out_over_ray_with_the_same_results(project, ray_local, tmp_path):
    """A pass (every set of the model) at or above eval.fan_out.min_rows is generated by a pool of Ray
    engine actors; the rows are the same as the one-process eval's, id for id."""
    from infra.registry import Registry
    from pipelines.evaluate import results_of, run
    from pipelines.spec import load_spec
    from tests.evalkit import lively_model

    model = str(lively_model(project["model_dir"], tmp_path / "lively"))
    reg = Registry.open(project["reg"], cache_dir=project["tmp"] / "cache")
    common = ["eval.baselines=[]", "eval.batch_size=1", "eval.max_new_tokens=6", "eval.bootstrap=0"]
    evals = {}
    for name, fan in (("local", "{mode: never}"), ("ray", "{mode: auto, min_rows: 5, actors: 2, shard_rows: 2}")):
        spec = load_spec(project["spec"], [*common, f"eval.fan_out={fan}"])
        m = run(spec, reg, model, log=lambda *a: None, progress=False)
        evals[name] = (m, results_of(reg, m.id)[1])
    (_, local), (_, fanned) = evals["local"], evals["ray"]
    # both sets are one pass of 14 rows (>= min_rows 5); the local eval's pass is the same 14 rows
    for s in fanned["sets"].values():
        assert s["perf"]["fanned_out"] is True and s["perf"]["pass_examples"] == 14
        assert s["perf"]["pass_sets"] == ["model/test", "model/golden"]
    assert not any(s["perf"]["fanned_out"] for s in local["sets"].values())
    for set_name in ("test", "golden"):
        rows = {k: [json.loads(l) for l in reg.read_file(m.id, f"predictions/model/{set_name}.jsonl").decode()
                    .splitlines()] for k, (m, _) in evals.items()}
        assert [r["id"] for r in rows["ray"]] == [r["id"] for r in rows["local"]]
        assert [(r["output"], r["completion_tokens"], r["correct"]) for r in rows["ray"]] == \
               [(r["output"], r["completion_tokens"], r["correct"]) for r in rows["local"]]
        assert fanned["sets"][set_name]["metrics"] == local["sets"][set_name]["metrics"]
    assert len({r["output"] for r in rows["local"]}) > 1, "outputs must vary for the comparison to mean anything"
    # predict: the same rows through Ray actors and in process
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"x{i}", "prompt": f"count to {i} please"} for i in range(6)])
    got = {}
    for mode in ("never", "always"):
        out = tmp_path / f"{mode}.jsonl"
        invoke("predict", model, "--input", inp, "--output", out, "--max-new-tokens", "5", "--batch-size", "1",
               "--fan-out", mode, "--json")
        got[mode] = [(json.loads(l)["id"], json.loads(l)["output"]) for l in out.read_text().splitlines()]
    assert got["always"] == got["never"] and len(got["never"]) == 6


def test_free_first_decoding_matches_the_guides_own_counts(tiny_model, tmp_path):
    """An engine that does not say where its guide overrode the model (vLLM) is decoded freely
    first, and under the guide only where the free output leaves the grammar. The outputs and the
    per-row verdicts (guide changed the output or not) equal the HF guide's own, token by token."""
    from pipelines.contract import Checker
    from pipelines.engines import GenParams, get_engine
    from pipelines.evaluate.rows import Example
    from pipelines.evaluate.runner import generate_rows
    from pipelines.spec import Contract
    from tests.evalkit import chats, lively_model

    engine = get_engine("hf", model=str(lively_model(tiny_model, tmp_path / "lively")), batch_size=4)
    cs = chats(10)
    free = engine.generate(cs, GenParams(max_new_tokens=3))
    # labels: what the model writes freely for 4 of the chats, and 2 it never writes; so some free
    # outputs stay inside the grammar and the rest need the guided decode
    labels = sorted({o.text for o in free[:4]}) + ["zulu", "yankee x"]
    assert 0 < len({o.text for o in free} - set(labels)), "some free outputs must leave the grammar"
    checker = Checker(Contract(type="label", labels=labels, constrained_decoding=True))
    params = GenParams(max_new_tokens=3, guide=json.dumps({"choice": labels}))
    examples = [Example(id=str(i), chat=c) for i, c in enumerate(cs)]
    own, _ = generate_rows(engine, examples, cs, checker, params)
    engine.reports_guide_interventions = False  # as vLLM: the guide's verdicts come from the free decode
    calls = []
    generate = engine.generate
    engine.generate = lambda chats, p: calls.append((len(chats), p.guide is not None)) or generate(chats, p)
    freed, _ = generate_rows(engine, examples, cs, checker, params)
    assert [r["output"] for r in freed] == [r["output"] for r in own]
    assert [r["guide_interventions"] > 0 for r in freed] == [r["guide_interventions"] > 0 for r in own]
    kept = sum(not r["guide_interventions"] for r in freed)
    assert 0 < kept < len(cs)
    assert calls == [(len(cs), False), (len(cs) - kept, True)], "guided again only where the free output left"
