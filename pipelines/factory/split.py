"""Train/dev/test by cluster: seeded, stable, and never splitting a near-duplicate cluster.

A row's split is a pure function of (seed, its cluster's key), where the key is the normalised
text hash of the cluster's kept row. Reruns on the same input give the same splits, and adding
rows later never moves an existing row to another split (so a test row cannot drift into train).
Ratios are met in expectation, not exactly, which matters only for very small datasets.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "dev", "test")


def unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def assign(cluster_key: str, ratios: dict[str, float], seed: int) -> str:
    u, edge = unit(seed, cluster_key), 0.0
    for name in SPLITS:
        edge += ratios[name]
        if u < edge:
            return name
    return next(n for n in reversed(SPLITS) if ratios[n] > 0)


def cap_per_class(items: list[tuple[int, str, str]], cap: int, seed: int) -> set[int]:
    """Indices over the cap: ``items`` are (index, class, key); the kept ones are chosen by a seeded hash."""
    by_class: dict[str, list[tuple[float, int]]] = {}
    for idx, cls, key in items:
        by_class.setdefault(cls, []).append((unit(seed, "cap:" + key), idx))
    over: set[int] = set()
    for members in by_class.values():
        over.update(idx for _, idx in sorted(members)[cap:])
    return over
