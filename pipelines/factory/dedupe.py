"""Exact and near-duplicate detection and eval leakage, over signatures computed by the workers.

This runs on the driver over the (small) signatures only — a hash and num_perm integers per row —
because clustering needs one consistent view of every row seen so far; it is linear in rows:
MinHash-LSH banding finds candidates through hash tables (bands chosen so that a pair at the
threshold is a candidate with probability >= 0.99), and only candidates are compared: by the exact
Jaccard of their shingle sets when rows carry them, else by the MinHash estimate. No all-pairs
comparison.

Clustering is single-link in input order: a row that is an exact or near duplicate of any row
seen so far (kept or not) joins that row's cluster, whose first row is its representative and the
only one kept; the others are rejected as ``duplicate_of:<representative id>``, and the detail
names the row actually matched. Rejected rows stay in the index because a third copy may resemble
a second one more than the first (two edits of one original are each close to it, not to each other).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def lsh_params(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band): the longest bands that still make a pair at ``threshold`` a
    candidate with probability >= ``recall``. Weighted towards recall on purpose: every candidate
    is verified afterwards, so extra candidates cost a comparison, never a wrong answer."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def hashvalues(sig: bytes) -> np.ndarray:
    return np.frombuffer(sig, dtype=np.uint64)


def shingle_set(data: bytes | None) -> np.ndarray | None:
    return np.frombuffer(data, dtype=np.uint32) if data else None


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted unique arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class LSHIndex:
    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.values: dict[int, np.ndarray] = {}
        self.sets: dict[int, np.ndarray] = {}

    def _keys(self, hv: np.ndarray) -> list[bytes]:
        r = self.rows
        return [hv[b * r:(b + 1) * r].tobytes() for b in range(self.bands)]

    def insert(self, key: int, hv: np.ndarray, shingles: np.ndarray | None = None) -> None:
        self.values[key] = hv
        if shingles is not None:
            self.sets[key] = shingles
        for table, k in zip(self.tables, self._keys(hv)):
            table.setdefault(k, []).append(key)

    def best_match(self, hv: np.ndarray, shingles: np.ndarray | None = None) -> tuple[int, float] | None:
        """The most similar indexed row with Jaccard >= threshold (ties: the earliest): exact
        Jaccard when both rows have shingle sets, else the MinHash estimate."""
        cands: set[int] = set()
        for table, k in zip(self.tables, self._keys(hv)):
            cands.update(table.get(k, ()))
        best = None
        for c in sorted(cands):
            other = self.sets.get(c)
            sim = jaccard(shingles, other) if shingles is not None and other is not None \
                else float(np.mean(self.values[c] == hv))
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (c, sim)
        return best


@dataclass
class Duplicate:
    of: int  # index of the cluster's representative (its first row, the one kept)
    kind: str  # "exact" or "near"
    similarity: float
    via: int  # index of the row this one matched (the representative or another member)


def find_duplicates(rows: list[dict], *, exact: bool, near: bool, threshold: float, num_perm: int) -> dict[int, Duplicate]:
    """{row index: Duplicate} for every duplicate among ``rows`` (dicts with ``exact``, ``minhash``
    and optionally ``shingles``)."""
    seen: dict[str, int] = {}  # normalised text hash -> first row with it
    index = LSHIndex(threshold, num_perm)
    dups: dict[int, Duplicate] = {}
    rep = lambda j: dups[j].of if j in dups else j
    for i, row in enumerate(rows):
        if exact and row["exact"] in seen:
            first = seen[row["exact"]]
            dups[i] = Duplicate(rep(first), "exact", 1.0, first)
            continue
        seen[row["exact"]] = i
        hv, sh = hashvalues(row["minhash"]), shingle_set(row.get("shingles"))
        if near and (match := index.best_match(hv, sh)) is not None:
            dups[i] = Duplicate(rep(match[0]), "near", match[1], match[0])
        if near:
            index.insert(i, hv, sh)
    return dups


class EvalIndex:
    """Every eval set's rows, to find training rows that repeat them exactly or nearly."""

    def __init__(self, threshold: float, num_perm: int):
        self.exact: dict[str, tuple[str, str]] = {}
        self.prompt: dict[str, tuple[str, str]] = {}
        self.lsh = LSHIndex(threshold, num_perm)
        self.names: list[tuple[str, str]] = []

    def add(self, set_name: str, row_id: str, exact: str, prompt: str, minhash: bytes,
            shingles: bytes | None = None) -> None:
        self.exact.setdefault(exact, (set_name, row_id))
        self.prompt.setdefault(prompt, (set_name, row_id))
        self.lsh.insert(len(self.names), hashvalues(minhash), shingle_set(shingles))
        self.names.append((set_name, row_id))

    def match(self, row: dict) -> tuple[str, str, str] | None:
        """(eval set, eval row id, how) when ``row`` leaks an eval row; the same prompt counts too."""
        if row["exact"] in self.exact:
            return (*self.exact[row["exact"]], "exact")
        if row["prompt"] in self.prompt:
            return (*self.prompt[row["prompt"]], "same_prompt")
        if (m := self.lsh.best_match(hashvalues(row["minhash"]), shingle_set(row.get("shingles")))) is not None:
            return (*self.names[m[0]], f"near:{m[1]:.2f}")
        return None
