"""Exact and near-duplicate detection and eval leakage, over signatures computed by the workers.

This runs on the driver over the (small) signatures only — a hash and num_perm integers per row —
because clustering needs one consistent view of every row seen so far; it is linear in rows:
MinHash-LSH banding finds candidates through hash tables (bands chosen so that a pair at the
threshold is a candidate with probability >= 0.99), and only candidates are compared: by the exact
Jaccard of their shingle sets when rows carry them, else by the MinHash estimate. No all-pairs
comparison.

Prompts are judged on their own as well (``pipelines.factory.similar``): a row whose prompt is
another row's prompt with edits (typos, courtesy words, one added word, case, punctuation) and
whose answer is the same is a near duplicate. Candidates come from a second LSH over the prompts'
character 4-grams, banded per answer hash (only rows with the same answer can be candidates), at a
low threshold because the rules, not the MinHash, decide; and from an exact key of the prompt
without its courtesy words.

Leakage adds containment: a training prompt that embeds an eval prompt (verbatim, with typos, or
most of its 4-grams) leaks it, whatever their symmetric similarity.

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

    def _keys(self, hv: np.ndarray, salt: bytes = b"") -> list[bytes]:
        r = self.rows
        return [salt + hv[b * r:(b + 1) * r].tobytes() for b in range(self.bands)]

    def insert(self, key: int, hv: np.ndarray, shingles: np.ndarray | None = None, salt: bytes = b"") -> None:
        self.values[key] = hv
        if shingles is not None:
            self.sets[key] = shingles
        for table, k in zip(self.tables, self._keys(hv, salt)):
            table.setdefault(k, []).append(key)

    def candidates(self, hv: np.ndarray, salt: bytes = b"") -> list[int]:
        """Indexed keys sharing a band with ``hv`` (under the same ``salt``), in insertion order."""
        cands: set[int] = set()
        for table, k in zip(self.tables, self._keys(hv, salt)):
            cands.update(table.get(k, ()))
        return sorted(cands)

    def best_match(self, hv: np.ndarray, shingles: np.ndarray | None = None) -> tuple[int, float] | None:
        """The most similar indexed row with Jaccard >= threshold (ties: the earliest): exact
        Jaccard when both rows have shingle sets, else the MinHash estimate."""
        best = None
        for c in self.candidates(hv):
            other = self.sets.get(c)
            sim = jaccard(shingles, other) if shingles is not None and other is not None \
                else float(np.mean(self.values[c] == hv))
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (c, sim)
        return best


PROMPT_CANDIDATE_THRESHOLD = 0.4  # low on purpose: the edit rules verify every candidate


@dataclass
class Duplicate:
    of: int  # index of the cluster's representative (its first row, the one kept)
    kind: str  # "exact" or "near"
    similarity: float
    via: int  # index of the row this one matched (the representative or another member)
    why: str = ""  # for a prompt-level match: the edits (``similar.same_message``)


def courtesy_key(pnorm: str) -> str:
    from pipelines.factory.similar import COURTESY

    return " ".join(w for w in pnorm.split() if w not in COURTESY)


def quick_key(pnorm: str) -> tuple[int, tuple[str, ...], frozenset]:
    """(word count, numbers, words but courtesy words): messages far apart in these are never one
    message, and comparing them is a few C-level set operations (``similar.same_message`` is not)."""
    from pipelines.factory.similar import _NUMBER, COURTESY

    words = pnorm.split()
    return len(words), tuple(sorted(_NUMBER.findall(pnorm))), frozenset(words) - COURTESY


class PromptIndex:
    """Prompts (normalised text, 4-gram MinHash) to find rows whose prompt is another's with edits;
    ``by_answer`` restricts candidates to rows with the same answer hash."""

    def __init__(self, num_perm: int, by_answer: bool):
        self.lsh = LSHIndex(PROMPT_CANDIDATE_THRESHOLD, num_perm)
        self.by_answer = by_answer
        self.texts: dict[int, str] = {}
        self.quick: dict[int, tuple] = {}
        self.plain: dict[tuple[str, str], list[int]] = {}  # (answer, prompt without courtesy words)

    def _salt(self, row: dict) -> str:
        return row["answer"] if self.by_answer else ""

    def insert(self, key: int, row: dict) -> None:
        if not row.get("pminhash"):
            return
        self.texts[key] = row["pnorm"]
        self.quick[key] = quick_key(row["pnorm"])
        self.lsh.insert(key, hashvalues(row["pminhash"]), salt=self._salt(row).encode())
        self.plain.setdefault((self._salt(row), courtesy_key(row["pnorm"])), []).append(key)

    def match(self, row: dict, threshold: float) -> tuple[int, str] | None:
        """(earliest indexed key whose prompt is this row's with edits, why) or None."""
        from pipelines.factory.similar import SHORT_WORDS, same_message

        if not row.get("pminhash"):
            return None
        cands = set(self.lsh.candidates(hashvalues(row["pminhash"]), self._salt(row).encode()))
        cands.update(self.plain.get((self._salt(row), courtesy_key(row["pnorm"])), ()))
        words, nums, content = quick_key(row["pnorm"])
        for c in sorted(cands):
            cw, cn, cc = self.quick[c]
            if cn != nums:
                continue  # what same_message would refuse first, without its cost
            if max(cw, words) <= SHORT_WORDS and (abs(cw - words) > 5 or min(len(cc - content), len(content - cc)) > 2):
                continue
            if (why := same_message(row["pnorm"], self.texts[c], threshold)) is not None:
                return c, why
        return None


def find_duplicates(rows: list[dict], *, exact: bool, near: bool, threshold: float, num_perm: int) -> dict[int, Duplicate]:
    """{row index: Duplicate} for every duplicate among ``rows`` (dicts with ``exact``, ``minhash``
    and optionally ``shingles``, and the prompt features ``pnorm``, ``pminhash``, ``answer``)."""
    seen: dict[str, int] = {}  # normalised text hash -> first row with it
    index = LSHIndex(threshold, num_perm)
    prompts = PromptIndex(num_perm, by_answer=True)
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
        elif near and (pm := prompts.match(row, threshold)) is not None:
            dups[i] = Duplicate(rep(pm[0]), "near", 0.0, pm[0], why=f"same answer, prompt with edits: {pm[1]}")
        if near:
            index.insert(i, hv, sh)
            prompts.insert(i, row)
    return dups


CONTAIN_MAX_POSTING = 24  # a 4-gram in more eval prompts than this is too common to find candidates by


class EvalIndex:
    """Every eval set's rows, to find training rows that repeat them exactly or nearly, or whose
    prompt repeats or embeds an eval prompt (whatever the answer: the prompt is what leaks)."""

    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        self.exact: dict[str, tuple[str, str]] = {}
        self.prompt: dict[str, tuple[str, str]] = {}
        self.lsh = LSHIndex(threshold, num_perm)
        self.prompts = PromptIndex(num_perm, by_answer=False)
        self.names: list[tuple[str, str]] = []
        self.pnorm: list[str] = []
        self.pgrams: list[np.ndarray] = []
        self.postings: dict[int, list[int]] = {}
        self.rare: list[int] = []

    def add(self, set_name: str, row_id: str, exact: str, prompt: str, minhash: bytes,
            shingles: bytes | None = None, pnorm: str = "", pgrams: bytes = b"", pminhash: bytes = b"",
            answer: str = "") -> None:
        key = len(self.names)
        self.exact.setdefault(exact, (set_name, row_id))
        self.prompt.setdefault(prompt, (set_name, row_id))
        self.lsh.insert(key, hashvalues(minhash), shingle_set(shingles))
        self.prompts.insert(key, {"pnorm": pnorm, "pminhash": pminhash, "answer": answer})
        self.names.append((set_name, row_id))
        grams = np.frombuffer(pgrams, dtype=np.uint32)
        self.pnorm.append(pnorm)
        self.pgrams.append(grams)
        for g in grams.tolist():
            self.postings.setdefault(g, []).append(key)

    def _contained(self, row: dict) -> tuple[int, str] | None:
        """An eval prompt the row's prompt embeds: candidates share at least half of the eval
        prompt's (not too common) 4-grams, then ``similar.contains`` decides."""
        from pipelines.factory.similar import contains

        grams = np.frombuffer(row.get("pgrams") or b"", dtype=np.uint32)
        hits: dict[int, int] = {}
        for g in grams.tolist():
            post = self.postings.get(g)
            if post is not None and len(post) <= CONTAIN_MAX_POSTING:
                for k in post:
                    hits[k] = hits.get(k, 0) + 1
        if len(self.rare) != len(self.names):  # how many of each eval prompt's 4-grams are not too common
            self.rare = [sum(1 for g in grams.tolist() if len(self.postings[g]) <= CONTAIN_MAX_POSTING)
                         for grams in self.pgrams]
        for k in sorted(hits):
            if hits[k] * 2 >= max(1, self.rare[k]) and (why := contains(row["pnorm"], self.pnorm[k], grams, self.pgrams[k])):
                return k, why
        return None

    def match(self, row: dict) -> tuple[str, str, str] | None:
        """(eval set, eval row id, how) when ``row`` leaks an eval row; the same prompt counts too."""
        if row["exact"] in self.exact:
            return (*self.exact[row["exact"]], "exact")
        if row["prompt"] in self.prompt:
            return (*self.prompt[row["prompt"]], "same_prompt")
        if (m := self.lsh.best_match(hashvalues(row["minhash"]), shingle_set(row.get("shingles")))) is not None:
            return (*self.names[m[0]], f"near:{m[1]:.2f}")
        if (p := self.prompts.match(row, self.threshold)) is not None:
            return (*self.names[p[0]], f"near_prompt: {p[1]}")
        if (c := self._contained(row)) is not None:
            return (*self.names[c[0]], f"contains_prompt: {c[1]}")
        return None
