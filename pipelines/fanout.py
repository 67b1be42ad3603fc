"""Generation that fans out over Ray for large sets (eval, predict, the judge), one process for small ones.

``generate(engine, chats, params, recipe=..., policy=...)`` returns the same ``Completion`` list in
the same order either way. Fanning out, Ray Data ``map_batches`` sends shards of chats to a pool
of engine actors, each building its own engine from an ``EngineRecipe`` (``get_engine``'s
arguments plus the registry URI, so actors load the model from the registry themselves). Actors
ask for a fraction of a CPU (``cpus_per_actor``, default 0.5): with one whole CPU each on a small
node the read tasks never get a CPU and the job hangs silently (STACK-NOTES, hang #1).

When: ``mode: auto`` fans out at ``min_rows`` rows or more, or when a cluster is attached
(``RAY_ADDRESS`` set) and there is more than one shard of work; ``always`` / ``never`` force it.
Results match the one-process path row for row when each shard is batched the same way
(``shard_rows`` a multiple of the engine's batch size, no padding differences: batch size 1, or
greedy decoding with one prompt length per batch).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.engines import Chat, Completion, GenParams


@dataclass(frozen=True)
class EngineRecipe:
    """How to build an engine anywhere: ``get_engine(name, registry=Registry.open(registry_uri), **kwargs)``."""
    name: str
    kwargs: dict = field(default_factory=dict)
    registry_uri: str | None = None
    cache_dir: str | None = None

    def build(self):
        from pipelines.engines import get_engine

        registry = None
        if self.registry_uri:
            from infra.registry import Registry

            registry = Registry.open(self.registry_uri, cache_dir=self.cache_dir)
        return get_engine(self.name, registry=registry, **self.kwargs)


@dataclass(frozen=True)
class FanOut:
    mode: str = "auto"  # auto | always | never
    min_rows: int = 2000
    actors: int | None = None  # default: the cluster's CPUs / cpus_per_actor, at most one per shard
    cpus_per_actor: float = 0.5
    shard_rows: int = 64

    @classmethod
    def from_spec(cls, ev) -> "FanOut":
        """From a spec's ``eval`` section (its ``fan_out`` block)."""
        f = ev.fan_out
        return cls(mode=f.mode, min_rows=f.min_rows, actors=f.actors, cpus_per_actor=f.cpus_per_actor,
                   shard_rows=f.shard_rows)


def cluster_attached() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))


def should_fan_out(n_rows: int, policy: FanOut) -> bool:
    if policy.mode in ("always", "never"):
        return policy.mode == "always" and n_rows > 0
    return n_rows >= policy.min_rows or (cluster_attached() and n_rows > policy.shard_rows)


def generate(engine, chats: list[Chat], params: GenParams, *, recipe: EngineRecipe | None = None,
             policy: FanOut | None = None) -> list[Completion]:
    """``engine.generate(chats, params)``, or the same over a pool of Ray actors (see the module doc).

    ``engine`` may be None when the caller only has a recipe (it is built here for small sets)."""
    policy = policy or FanOut()
    if recipe is None or not should_fan_out(len(chats), policy):
        return (engine or recipe.build()).generate(chats, params)
    return _fan_out(recipe, chats, params, policy)


class _GenActor:
    """One engine per actor, built once; a batch is ``{"i": [...], "chat": [json, ...]}``."""

    def __init__(self, recipe: EngineRecipe, params: dict):
        self.engine = recipe.build()
        self.params = GenParams(**{**params, "stop": tuple(params.get("stop") or ())})

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        outs = self.engine.generate([json.loads(c) for c in batch["chat"]], self.params)
        return {"i": list(batch["i"]), "text": [o.text for o in outs],
                "prompt_tokens": [o.prompt_tokens for o in outs],
                "completion_tokens": [o.completion_tokens for o in outs],
                "finish_reason": [o.finish_reason for o in outs], "latency_s": [o.latency_s for o in outs],
                "extra": [json.dumps(o.extra, default=str) for o in outs]}


def _fan_out(recipe: EngineRecipe, chats: list[Chat], params: GenParams, policy: FanOut) -> list[Completion]:
    from infra.ray_env import ensure_ray

    ray = ensure_ray()
    import ray.data
    from ray.data import ActorPoolStrategy

    shards = -(-len(chats) // policy.shard_rows)
    size = policy.actors or max(1, int(ray.cluster_resources().get("CPU", 1) // policy.cpus_per_actor))
    size = max(1, min(size, shards))
    ds = ray.data.from_items([{"i": i, "chat": json.dumps(c, ensure_ascii=False)} for i, c in enumerate(chats)],
                             override_num_blocks=shards)
    out = ds.map_batches(_GenActor, fn_constructor_args=(recipe, asdict(params)), batch_size=policy.shard_rows,
                         batch_format="numpy", num_cpus=policy.cpus_per_actor,
                         compute=ActorPoolStrategy(size=size)).take_all()
    results: list[Completion | None] = [None] * len(chats)
    for r in out:
        results[int(r["i"])] = Completion(text=str(r["text"]), prompt_tokens=int(r["prompt_tokens"]),
                                          completion_tokens=int(r["completion_tokens"]),
                                          finish_reason=str(r["finish_reason"]), latency_s=float(r["latency_s"]),
                                          extra=json.loads(str(r["extra"])))
    missing = [i for i, c in enumerate(results) if c is None]
    if missing:  # never hand back a shorter list than was asked for
        raise RuntimeError(f"fan-out lost {len(missing)} of {len(chats)} rows (first: {missing[:5]})")
    return results  # type: ignore[return-value]
