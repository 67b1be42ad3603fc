"""Where an eval's inputs come from: the eval sets, and the systems compared (model and baselines)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.evaluate.rows import Example, read_examples


def eval_sets(spec, registry, *, dataset: str | None = None, model_manifest=None,
              limit: int | None = None) -> tuple[dict[str, list[Example]], str | None, list[Example]]:
    """({set name: examples}, dataset id or None, train examples for few-shot).

    From a dataset artifact — the one named, else the one the model was trained on
    (``inputs.dataset``), else the task's newest — its ``test.jsonl`` and every ``eval/<name>.jsonl``.
    Without any dataset artifact, the spec's ``data.eval`` files.
    """
    from infra.registry import parse_id

    ref = dataset
    if ref is None and model_manifest is not None:
        cand = model_manifest.inputs.get("dataset")
        ref = cand if isinstance(cand, str) and (parse_id(cand) or "@" in cand) else None
    if ref is None:
        found = registry.list("dataset", spec.task)
        ref = found[-1].id if found else None
    sets: dict[str, list[Example]] = {}
    train: list[Example] = []
    if ref is not None:
        m = registry.get(ref)
        folder = registry.materialize(m.id)
        if (folder / "test.jsonl").exists():
            sets["test"] = read_examples(folder / "test.jsonl")
        for p in sorted((folder / "eval").glob("*.jsonl")) if (folder / "eval").is_dir() else []:
            sets[p.stem] = read_examples(p)
        if (folder / "train.jsonl").exists():
            train = read_examples(folder / "train.jsonl")
        ref = m.id
    else:
        for name, path in spec.data.eval.items():
            sets[name] = read_examples(path)
    sets = {k: (v[:limit] if limit else v) for k, v in sets.items() if v}
    if not sets:
        raise ValueError(f"task {spec.task}: nothing to evaluate — no dataset artifact with test.jsonl or eval/*.jsonl "
                         "(run `crucible factory`), and no data.eval files in the spec")
    return sets, ref, train


def contract_instruction(spec) -> str:
    """A plain instruction describing the contract, for the prompted baseline."""
    c = spec.contract
    if c.type == "label":
        return "Answer with exactly one of these labels and nothing else: " + ", ".join(c.labels or []) + "."
    if c.type == "json":
        return ("Answer with one JSON object and nothing else, valid against this JSON Schema: "
                + json.dumps(spec.json_schema_doc(), separators=(",", ":")))
    if c.type == "tool_call":
        tools = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in c.tools]
        return ('Answer with the tool call(s) as JSON, {"name": ..., "arguments": {...}} or a list of them, and '
                "nothing else. Tools: " + json.dumps(tools, separators=(",", ":")))
    return ""


@dataclass
class System:
    """One thing evaluated: the model or a baseline, with how its prompts are built."""

    name: str
    engine_name: str
    model: str | None = None
    url: str | None = None
    system_prompt: str | None = None  # added where a row has no system message
    force_system: bool = False  # replace the row's system message with ``system_prompt``
    strip_system: bool = False
    fewshot: list[Example] = field(default_factory=list)
    describe: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def base_of(spec, registry, model_ref: str) -> str:
    """The base model a candidate was tuned from: the manifest's ``inputs.base_model``, the
    adapter's ``base_model_name_or_path``, else the spec's ``model.base``."""
    from pipelines.engines.loading import is_registry_ref, resolve_model

    if is_registry_ref(model_ref):
        m = registry.get(model_ref)
        if m.inputs.get("base_model"):
            return untuned(registry, m.inputs["base_model"])
    try:
        r = resolve_model(model_ref, registry)
        if r.adapter and r.base_path:
            return r.base_path
    except (FileNotFoundError, ValueError):
        pass
    return spec.model.base


def untuned(registry, base: str) -> str:
    """``base``, or where it is a tuned model merged into its base (a repair round's ``continue``
    retrain, DPO after SFT) the base that one was tuned from, and so on up: the baselines compare
    with the model nobody tuned, not with the previous round."""
    from pipelines.engines.loading import is_registry_ref

    seen = set()
    while is_registry_ref(base) and base not in seen:
        seen.add(base)
        m = registry.get(base)
        if not (m.inputs.get("merged_from") and m.inputs.get("base_model")):
            break
        base = m.inputs["base_model"]
    return base


def baseline_system(name: str, spec, registry, model_ref: str, train: list[Example]) -> System:
    """``base``, ``prompted-base``, an ``http(s)://URL[#MODEL]``, or any model ref/folder."""
    engine = spec.eval.engine if spec.eval.engine != "http" else "auto"
    if name == "base":
        b = base_of(spec, registry, model_ref)
        return System("base", engine, model=b, strip_system=True, describe=f"{b} (no system prompt)")
    if name == "prompted-base":
        b = base_of(spec, registry, model_ref)
        prompt = "\n\n".join(p for p in (spec.model.system_prompt, contract_instruction(spec)) if p) or None
        shots = train[: spec.eval.fewshot]
        return System("prompted-base", engine, model=b, system_prompt=prompt, force_system=True, fewshot=shots,
                      describe=f"{b} + system prompt/contract instruction + {len(shots)} few-shot")
    if name.startswith(("http://", "https://")):
        url, _, model = name.partition("#")
        api_key_env = spec.eval.judge.api_key_env if spec.eval.judge else None
        return System(name, "http", model=model or None, url=url, describe=f"{model or 'default'} at {url}",
                      extra={"api_key_env": api_key_env})
    return System(name, engine, model=name, describe=name)


def candidate_system(spec, registry, model_ref: str) -> System:
    if spec.eval.engine == "http":
        return System("model", "http", model=model_ref, url=spec.eval.url, system_prompt=spec.model.system_prompt,
                      describe=f"{model_ref} at {spec.eval.url}")
    return System("model", spec.eval.engine, model=model_ref, system_prompt=spec.model.system_prompt,
                  describe=model_ref)


def engine_key(system: System, spec, registry) -> str:
    """Equal for systems one engine can generate for (same engine, weights and settings)."""
    r = engine_recipe(system, spec, registry, progress=False)
    return json.dumps([r.name, r.kwargs], sort_keys=True, default=str)


def engine_recipe(system: System, spec, registry, *, progress: bool = True):
    """``get_engine``'s arguments for ``system``, buildable in this process or in a Ray actor."""
    from pipelines.fanout import EngineRecipe

    if system.engine_name == "http":
        return EngineRecipe("http", {"model": system.model, "url": system.url,
                                     "api_key_env": system.extra.get("api_key_env")})
    gguf = spec.model.gguf_file if system.model == spec.model.base else None
    return EngineRecipe(system.engine_name, {"model": system.model, "batch_size": spec.eval.batch_size,
                                             "dtype": spec.model.dtype, "gguf_file": gguf,
                                             "trust_remote_code": spec.model.trust_remote_code, "progress": progress},
                        registry_uri=registry.uri, cache_dir=str(registry.cache_dir))


def open_engine(system: System, spec, registry, *, progress: bool = True):
    from pipelines.engines import get_engine

    r = engine_recipe(system, spec, registry, progress=progress)
    return get_engine(r.name, registry=registry if r.registry_uri else None, **r.kwargs)

