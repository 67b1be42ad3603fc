"""When two short messages are the same message: the prompt-level rules behind dedupe and leakage.

Word-shingle Jaccard over a whole record fails on support messages (3-15 words): one appended
"please" moves it below any useful threshold. Prompts are therefore also judged on their own,
after a stronger normalisation (case, punctuation, apostrophes), by rules that say what an edit
is rather than by one similarity number:

- ``same_message``: the two differ only by typos (words within one or two character edits, or the
  whole strings within two), by courtesy words (please, thanks, hi …) and by at most one other
  inserted word (two from ten words on). Replacing a word by a different word is *not* an edit:
  templated variations with the same intent ("check the fee" / "see the fee") stay distinct, and
  so do messages whose numbers differ (order numbers, amounts).
- ``contains``: a longer message embeds the other (as normalised words, or most of its character
  4-grams with its numbers present) — the benchmark-decontamination rule for leakage.

Long prompts (over ``SHORT_WORDS`` words) fall back to character 4-gram Jaccard.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

SHORT_WORDS = 40
COURTESY = frozenset("please pls plz kindly thanks thank thx ty you hi hello hey dear asap urgently urgent now "
                     "again ok okay sir madam team guys folks".split())
_APOS = re.compile(r"['’`´]")
_PUNCT = re.compile(r"[^\w\s]|_")


def norm_message(text: str) -> str:
    """Case, width, punctuation and apostrophes removed, whitespace collapsed: ``"Don't!!"`` -> ``"dont"``."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", _APOS.sub("", text)).split())


def char_grams(norm: str) -> np.ndarray:
    """Sorted unique byte 4-grams of ``" norm "`` as uint32 (exact, no hashing: a 4-gram is 4 bytes)."""
    b = np.frombuffer(f" {norm} ".encode(), dtype=np.uint8).astype(np.uint32)
    if len(b) < 4:
        b = np.concatenate([b, np.zeros(4 - len(b), dtype=np.uint32)])
    g = b[:-3] | (b[1:-2] << 8) | (b[2:-1] << 16) | (b[3:] << 24)
    return np.unique(g)


def numbers(words: list[str]) -> list[str]:
    return sorted(w for w in words if any(c.isdigit() for c in w))


def edit_distance(a: str, b: str, cap: int) -> int:
    """Optimal-string-alignment distance (insert, delete, substitute, swap neighbours), or cap+1
    as soon as it must exceed ``cap`` (banded, so long strings cost O(len * cap))."""
    if abs(len(a) - len(b)) > cap:
        return cap + 1
    prev2: list[int] | None = None
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [cap + 1] * len(b)
        lo, hi = max(1, i - cap), min(len(b), i + cap)
        for j in range(lo, hi + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                v = min(v, prev2[j - 2] + 1)
            cur[j] = v
        if min(cur[max(0, lo - 1):hi + 1]) > cap:
            return cap + 1
        prev2, prev = prev, cur
    return min(prev[len(b)], cap + 1)


def _typo(a: str, b: str) -> bool:
    """Two words that are one word mistyped: one edit up to 6 letters, two beyond; never digits."""
    if a == b:
        return True
    if min(len(a), len(b)) < 3 or any(c.isdigit() for c in a + b):
        return False
    cap = 1 if max(len(a), len(b)) <= 6 else 2
    return edit_distance(a, b, cap) <= cap


def _align(a: list[str], b: list[str]) -> tuple[int, int, int]:
    """(courtesy words inserted, other words inserted, typo pairs) of the cheapest alignment of two
    word lists in which words only match themselves or their typos; a substitution is not allowed."""
    inf = (10**6, 10**6, 10**6)
    n, m = len(a), len(b)
    # cost tuples compare by (other insertions, courtesy insertions, typos)
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    best[0][0] = (0, 0, 0)
    for i in range(n + 1):
        for j in range(m + 1):
            o, c, t = best[i][j]
            if o >= 10**6:
                continue
            if i < n:  # a word of a not in b
                step = (o, c + 1, t) if a[i] in COURTESY else (o + 1, c, t)
                best[i + 1][j] = min(best[i + 1][j], step)
            if j < m:
                step = (o, c + 1, t) if b[j] in COURTESY else (o + 1, c, t)
                best[i][j + 1] = min(best[i][j + 1], step)
            if i < n and j < m and _typo(a[i], b[j]):
                best[i + 1][j + 1] = min(best[i + 1][j + 1], (o, c, t + (a[i] != b[j])))
    o, c, t = best[n][m]
    return c, o, t


def same_message(a: str, b: str, threshold: float = 0.8) -> str | None:
    """Why the normalised messages ``a`` and ``b`` are one message with edits, or None.

    Short messages by the edit rules above; long ones by character 4-gram Jaccard >= ``threshold``."""
    if a == b:
        return "same text"
    wa, wb = a.split(), b.split()
    if numbers(wa) != numbers(wb):
        return None
    if max(len(wa), len(wb)) > SHORT_WORDS:
        ga, gb = char_grams(a), char_grams(b)
        inter = len(np.intersect1d(ga, gb, assume_unique=True))
        j = inter / (len(ga) + len(gb) - inter)
        return f"prompt 4-gram Jaccard {j:.2f}" if j >= threshold else None
    if min(len(a), len(b)) >= 10 and edit_distance(a, b, 2) <= 2:
        return "typo"
    courtesy, other, typos = _align(wa, wb)
    budget = 1 if min(len(wa), len(wb)) < 10 else 2
    if other <= budget and courtesy <= 3 and typos <= 2 and min(len(wa), len(wb)) > other:
        parts = [f"{k} {what}" for k, what in ((typos, "typo(s)"), (courtesy, "courtesy word(s)"),
                                                (other, "word(s) added")) if k]
        return ", ".join(parts) or "same words"
    return None


def contains(outer: str, inner: str, outer_grams: np.ndarray, inner_grams: np.ndarray,
             share: float = 0.8, min_words: int = 3) -> str | None:
    """Why the normalised message ``outer`` embeds ``inner`` (at least ``min_words`` words), or None:
    its words verbatim, or >= ``share`` of its character 4-grams with every number of it present."""
    wi = inner.split()
    if len(wi) < min_words or len(inner) < 12:
        return None
    if f" {inner} " in f" {outer} ":
        return "contains it verbatim"
    if not set(numbers(wi)) <= set(outer.split()):
        return None
    hit = len(np.intersect1d(inner_grams, outer_grams, assume_unique=True)) / len(inner_grams)
    if hit >= share:
        return f"contains {hit:.0%} of its 4-grams"
    if hit < 0.5:
        return None
    # Embedded with typos: some window of the outer words is the inner message with <= 2 typos.
    wo, n = outer.split(), len(wi)
    for size in (n, n - 1, n + 1):
        for start in range(0, len(wo) - size + 1):
            courtesy, other, typos = _align(wo[start:start + size], wi)
            if other == 0 and typos <= 2:
                return f"contains it with {typos} typo(s)"
    return None
