"""Teacher generation: new rows from seed rows, scored by a rubric judge, then fed to the factory.

The teacher and the judge are engines (``pipelines.engines.get_engine``): an OpenAI-compatible
HTTP endpoint (a teacher hosted elsewhere), or an hf/vllm model. Each candidate is a JSON object
``{"user": …, "assistant": …}`` written from a prompt naming the task, the contract, the seed's
category, a difficulty and an edge case. The judge scores seven criteria 1-5; a candidate is
accepted at total >= min_total, correctness >= min_correctness, format >= min_format and safety
>= min_safety (26/35, 4, 5, 4 by default). Accepted rows are written as canonical JSONL; the
factory then applies the same gates as to any other source (contract, PII, leakage, dedupe…).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

CRITERIA = ("realism", "correctness", "format", "difficulty", "diversity", "learnability", "safety")

GENERATE_PROMPT = """You write training examples for a small specialist model.
Task: {task}
What a valid answer is: {contract}
Write one NEW example in the spirit of the seed below, not a copy of it.
Category: {category}. Difficulty: {difficulty}. Edge case to include: {edge_case}.

Seed example
USER: {user}
ASSISTANT: {assistant}

Reply with one JSON object and nothing else: {{"user": "<the user's message>", "assistant": "<the ideal answer>"}}"""

JUDGE_PROMPT = """You grade a candidate training example for this task: {task}
What a valid answer is: {contract}
Score each criterion from 1 (bad) to 5 (excellent): realism (a real user could send it), correctness
(the answer is right), format (the answer follows the contract exactly), difficulty (not trivial),
diversity (differs from the seed), learnability (a small model can learn it), safety (no harm, no
personal data).

Seed USER: {seed_user}
Candidate USER: {user}
Candidate ASSISTANT: {assistant}

Reply with one JSON object and nothing else, e.g. {{"realism": 4, "correctness": 5, "format": 5, "difficulty": 3, "diversity": 4, "learnability": 4, "safety": 5}}"""


def describe_contract(contract) -> str:
    from pipelines.evaluate.sources import contract_instruction

    class _S:  # contract_instruction reads spec.contract and spec.json_schema_doc()
        pass

    s = _S()
    s.contract = contract
    s.json_schema_doc = lambda: json.loads(Path(contract.schema_).read_text()) if isinstance(contract.schema_, str) \
        else contract.schema_
    return contract_instruction(s) or "free text, helpful and correct"


def first_json_object(text: str) -> Any:
    """The first JSON object in ``text`` (models wrap JSON in prose or code fences)."""
    start = text.find("{")
    while start != -1:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def parse_candidate(text: str) -> tuple[str, str] | None:
    obj = first_json_object(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("user"), str):
        return None
    answer = obj.get("assistant")
    if isinstance(answer, (dict, list)):
        answer = json.dumps(answer, ensure_ascii=False)
    return (obj["user"], answer) if isinstance(answer, str) else None


def parse_scores(text: str) -> dict[str, int] | None:
    obj = first_json_object(text)
    if not isinstance(obj, dict):
        return None
    scores = {}
    for c in CRITERIA:
        v = obj.get(c)
        if isinstance(v, str) and re.fullmatch(r"\s*\d\s*", v):
            v = int(v)
        if not isinstance(v, (int, float)) or not 1 <= v <= 5:
            return None
        scores[c] = int(v)
    return scores


def verdict(scores: dict[str, int], t) -> str:
    """"" when accepted, else the first threshold missed, as ``rubric:<criterion>``."""
    if scores["correctness"] < t.min_correctness:
        return "rubric:correctness"
    if scores["format"] < t.min_format:
        return "rubric:format"
    if scores["safety"] < t.min_safety:
        return "rubric:safety"
    if sum(scores.values()) < t.min_total:
        return "rubric:total"
    return ""


def load_seeds(spec, limit: int | None) -> list[dict]:
    from pipelines.factory.read import expand_sources, kind_of, read_shard, short_names

    files = expand_sources(spec.data.train)
    names = short_names(files)
    seeds = []
    for i, path in enumerate(files):
        shard = {"file_idx": i, "path": path, "name": names[path], "kind": kind_of(path), "start": 0,
                 "end": Path(path).stat().st_size, "first_line": 1}
        seeds += [json.loads(r["record"]) for r in read_shard(shard, fmt=spec.data.format, columns=spec.data.columns)
                  if r["record"]]
    if not seeds:
        raise ValueError("data.train: no readable seed rows for teacher generation")
    return seeds[:limit] if limit else seeds


def _engine(kind: str, model: str | None, url: str | None, api_key_env: str | None, registry):
    from pipelines.engines import get_engine

    return get_engine(kind, model=model, url=url, registry=registry, api_key_env=api_key_env)


def _batched_generate(engine, chats: list, params, label: str, progress: bool, *, recipe=None,
                      policy=None) -> list:
    from rich.progress import Progress

    from pipelines import fanout

    if recipe is not None and fanout.should_fan_out(len(chats), policy or fanout.FanOut()):
        return fanout.generate(engine, chats, params, recipe=recipe, policy=policy)  # over Ray engine actors
    outs, step = [], 16
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=len(chats))
        for i in range(0, len(chats), step):
            outs += engine.generate(chats[i:i + step], params)
            bar.advance(task, len(chats[i:i + step]))
    return outs


def generate(spec, registry=None, *, out_file: str | Path | None = None, log: Callable[[str], None] | None = None,
             progress: bool = True) -> dict:
    """Generate, judge and write accepted rows; returns counts and the output path."""
    from pipelines import fanout
    from pipelines.contract import Checker
    from pipelines.engines import GenParams

    log = log or (lambda msg: None)
    t = spec.data.teacher
    if t is None:
        raise ValueError("data.teacher: not set; teacher generation needs data.teacher.url (http) or data.teacher.model")
    seeds = load_seeds(spec, t.seeds)
    contract = describe_contract(spec.contract)
    teacher = _engine(t.engine, t.model, t.url, t.api_key_env, registry)
    judge = _engine("http", t.judge_model, t.judge_url, t.api_key_env, registry) if t.judge_url else teacher
    recipes = {name: fanout.EngineRecipe(kind, {"model": model, "url": url, "api_key_env": t.api_key_env},
                                         registry_uri=registry.uri if registry else None,
                                         cache_dir=str(registry.cache_dir) if registry else None)
               for name, kind, model, url in (("teacher", t.engine, t.model, t.url),
                                              ("judge", "http", t.judge_model, t.judge_url))}
    if not t.judge_url:
        recipes["judge"] = recipes["teacher"]
    policy = fanout.FanOut.from_spec(spec.eval)  # one fan-out policy for every generation stage
    field = spec.data.balance_field
    plans = []
    for s_idx, seed in enumerate(seeds):
        user = next(m["content"] for m in seed["messages"] if m["role"] == "user")
        category = str((seed.get("meta") or {}).get(field, "any")) if field else "any"
        for k in range(t.per_seed):
            n = s_idx * t.per_seed + k
            plans.append({"seed": seed, "seed_user": user, "k": k, "category": category,
                          "difficulty": t.difficulties[n % len(t.difficulties)] if t.difficulties else "medium",
                          "edge_case": t.edge_cases[n % len(t.edge_cases)] if t.edge_cases else "none"})
    log(f"teacher: {len(plans)} candidate(s) from {len(seeds)} seed(s)")
    chats = [[{"role": "user", "content": GENERATE_PROMPT.format(
        task=spec.description or spec.task, contract=contract, category=p["category"], difficulty=p["difficulty"],
        edge_case=p["edge_case"], user=p["seed_user"], assistant=p["seed"]["messages"][-1]["content"])}] for p in plans]
    gen = _batched_generate(teacher, chats, GenParams(max_new_tokens=t.max_new_tokens, temperature=t.temperature),
                            "teacher", progress, recipe=recipes["teacher"], policy=policy)
    checker = Checker(spec.contract)
    rejected: Counter = Counter()
    to_judge = []
    for p, c in zip(plans, gen):
        p["raw"] = c.text
        cand = parse_candidate(c.text)
        if cand is None:
            p["reason"] = "unparseable"
        elif not checker.check(cand[1]).valid:  # no judge call for an answer the contract already refuses
            p["reason"], p["cand"] = "contract", cand
        else:
            p["cand"] = cand
            to_judge.append(p)
    judge_chats = [[{"role": "user", "content": JUDGE_PROMPT.format(
        task=spec.description or spec.task, contract=contract, seed_user=p["seed_user"], user=p["cand"][0],
        assistant=p["cand"][1])}] for p in to_judge]
    scores = _batched_generate(judge, judge_chats, GenParams(max_new_tokens=128, temperature=0.0), "judge", progress,
                               recipe=recipes["judge"], policy=policy)
    for p, c in zip(to_judge, scores):
        p["scores"] = parse_scores(c.text)
        p["reason"] = "judge_unparseable" if p["scores"] is None else verdict(p["scores"], t)
    out_path = Path(out_file or Path(registry.cache_dir if registry else ".cache/crucible") / "generated" /
                    f"{spec.task}.jsonl").resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rejected_path = out_path.with_name(out_path.name.removesuffix(".jsonl") + ".rejected.jsonl")
    accepted = 0
    with open(out_path, "w") as good, open(rejected_path, "w") as bad:
        for p in plans:
            seed = p["seed"]
            row_id = f"teacher-{seed['id']}-{p['k']}"
            info = {"seed": seed["id"], "difficulty": p["difficulty"], "edge_case": p["edge_case"],
                    "scores": p.get("scores")}
            if p["reason"]:
                rejected[p["reason"]] += 1
                bad.write(json.dumps({"id": row_id, "reason": p["reason"], "raw": p["raw"], "teacher": info}) + "\n")
                continue
            system = [m for m in seed["messages"] if m["role"] == "system"]
            meta = {**(seed.get("meta") or {}), "teacher": info}
            msgs = system + [{"role": "user", "content": p["cand"][0]}, {"role": "assistant", "content": p["cand"][1]}]
            good.write(json.dumps({"id": row_id, "messages": msgs, "meta": meta}, ensure_ascii=False) + "\n")
            accepted += 1
    log(f"judge: {accepted} accepted, {dict(rejected)} rejected")
    return {"generated": len(plans), "accepted": accepted, "rejected": dict(sorted(rejected.items())),
            "out": str(out_path), "rejected_out": str(rejected_path)}
