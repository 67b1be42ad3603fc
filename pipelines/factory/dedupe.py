"""Exact and near-duplicate detection and eval leakage, over signatures computed by the workers.

This runs on the driver over the (small) signatures only — a hash and num_perm integers per row —
because clustering needs one consistent view of every row seen so far; it is linear in rows:
MinHash-LSH banding finds candidates through hash tables, and only candidates are compared (their
estimated Jaccard must reach the threshold). No all-pairs comparison.

Clustering is "first one wins": rows are visited in input order; a row that is an exact or near
duplicate of a kept row joins that row's cluster and is rejected as ``duplicate_of:<id>``. Every
rejected row therefore names a kept row it really resembles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band). Weighted towards recall: every candidate is verified afterwards."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.2, 0.8)


def hashvalues(sig: bytes) -> np.ndarray:
    return np.frombuffer(sig, dtype=np.uint64)


class LSHIndex:
    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.values: dict[int, np.ndarray] = {}

    def _keys(self, hv: np.ndarray) -> list[bytes]:
        r = self.rows
        return [hv[b * r:(b + 1) * r].tobytes() for b in range(self.bands)]

    def insert(self, key: int, hv: np.ndarray) -> None:
        self.values[key] = hv
        for table, k in zip(self.tables, self._keys(hv)):
            table.setdefault(k, []).append(key)

    def best_match(self, hv: np.ndarray) -> tuple[int, float] | None:
        """The most similar indexed row with estimated Jaccard >= threshold (ties: the earliest)."""
        cands: set[int] = set()
        for table, k in zip(self.tables, self._keys(hv)):
            cands.update(table.get(k, ()))
        best = None
        for c in sorted(cands):
            sim = float(np.mean(self.values[c] == hv))
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (c, sim)
        return best


@dataclass
class Duplicate:
    of: int  # index of the kept row
    kind: str  # "exact" or "near"
    similarity: float


def find_duplicates(rows: list[dict], *, exact: bool, near: bool, threshold: float, num_perm: int) -> dict[int, Duplicate]:
    """{row index: Duplicate} for every duplicate among ``rows`` (dicts with ``exact`` and ``minhash``)."""
    seen: dict[str, int] = {}
    index = LSHIndex(threshold, num_perm)
    dups: dict[int, Duplicate] = {}
    for i, row in enumerate(rows):
        if exact and row["exact"] in seen:
            dups[i] = Duplicate(seen[row["exact"]], "exact", 1.0)
            continue
        hv = hashvalues(row["minhash"])
        if near and (match := index.best_match(hv)) is not None:
            dups[i] = Duplicate(match[0], "near", match[1])
            continue
        seen.setdefault(row["exact"], i)
        if near:
            index.insert(i, hv)
    return dups


class EvalIndex:
    """Every eval set's rows, to find training rows that repeat them exactly or nearly."""

    def __init__(self, threshold: float, num_perm: int):
        self.exact: dict[str, tuple[str, str]] = {}
        self.prompt: dict[str, tuple[str, str]] = {}
        self.lsh = LSHIndex(threshold, num_perm)
        self.names: list[tuple[str, str]] = []

    def add(self, set_name: str, row_id: str, exact: str, prompt: str, minhash: bytes) -> None:
        self.exact.setdefault(exact, (set_name, row_id))
        self.prompt.setdefault(prompt, (set_name, row_id))
        self.lsh.insert(len(self.names), hashvalues(minhash))
        self.names.append((set_name, row_id))

    def match(self, row: dict) -> tuple[str, str, str] | None:
        """(eval set, eval row id, how) when ``row`` leaks an eval row; the same prompt counts too."""
        if row["exact"] in self.exact:
            return (*self.exact[row["exact"]], "exact")
        if row["prompt"] in self.prompt:
            return (*self.prompt[row["prompt"]], "same_prompt")
        if (m := self.lsh.best_match(hashvalues(row["minhash"]))) is not None:
            return (*self.names[m[0]], f"near:{m[1]:.2f}")
        return None
