"""When two short messages are the same message: the prompt-level rules behind dedupe and leakage.

Word-shingle Jaccard over a whole record fails on support messages (3-15 words): one appended
"please" moves it below any useful threshold. Prompts are therefore also judged on their own,
after a stronger normalisation (case, punctuation, apostrophes), by rules that say what an edit
is rather than by one similarity number:

- ``same_message``: the two differ only by typos (words within one or two character edits, or the
  whole strings within two), by courtesy words (please, thanks, hi …) and by at most one other
  inserted word (none under four words, two from ten words on). Replacing a word by a different word is *not* an edit:
  templated variations with the same intent ("check the fee" / "see the fee") stay distinct, and
  so do messages whose numbers differ (order numbers, amounts).
- ``contains``: a longer message embeds the other — its words verbatim or with at most two typos,
  or (from ``SHARE_MIN_WORDS`` words, where a replaced word no longer hides in the share) most of
  its character 4-grams with its numbers present: the benchmark-decontamination rule for leakage.

Long prompts (over ``SHORT_WORDS`` words) fall back to character 4-gram Jaccard.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np

SHORT_WORDS = 40
SHARE_MIN_WORDS = 20  # the 4-gram share rule of containment applies from this many words
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


_NUMBER = re.compile(r"\S*\d\S*")


def numbers(words: list[str]) -> list[str]:
    return sorted(_NUMBER.findall(" ".join(words)))


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


@lru_cache(maxsize=1 << 16)
def _typo(a: str, b: str) -> bool:
    """Two words that are one word mistyped: one edit up to 6 letters, two beyond; never digits,
    and the first letter kept (or swapped with the second) — "unsubscribe" is not "subscribe"."""
    if a == b:
        return True
    if min(len(a), len(b)) < 3 or any(c.isdigit() for c in a + b):
        return False
    if a[0] != b[0] and not (a[0] == b[1] and a[1] == b[0]):
        return False
    cap = 1 if max(len(a), len(b)) <= 6 else 2
    return edit_distance(a, b, cap) <= cap


_INF = 10**6


def _align(a: list[str], b: list[str]) -> tuple[int, int, int, int]:
    """(courtesy words inserted, other words only in a, other words only in b, typo pairs) of the
    cheapest alignment in which words only match themselves or their typos (no substitution)."""
    lead = 0  # the common prefix and suffix align for free: the table covers only the middle
    while lead < min(len(a), len(b)) and a[lead] == b[lead]:
        lead += 1
    a, b = a[lead:], b[lead:]
    while a and b and a[-1] == b[-1]:
        a, b = a[:-1], b[:-1]
    n, m = len(a), len(b)
    # cost tuples: (other words in a + in b, courtesy, typos, other in a, other in b)
    best = [[(_INF,)] * (m + 1) for _ in range(n + 1)]
    best[0][0] = (0, 0, 0, 0, 0)
    for i in range(n + 1):
        for j in range(m + 1):
            cur = best[i][j]
            if cur[0] >= _INF:
                continue
            o, c, t, oa, ob = cur
            if i < n:
                step = (o, c + 1, t, oa, ob) if a[i] in COURTESY else (o + 1, c, t, oa + 1, ob)
                best[i + 1][j] = min(best[i + 1][j], step)
            if j < m:
                step = (o, c + 1, t, oa, ob) if b[j] in COURTESY else (o + 1, c, t, oa, ob + 1)
                best[i][j + 1] = min(best[i][j + 1], step)
            if i < n and j < m and _typo(a[i], b[j]):
                best[i + 1][j + 1] = min(best[i + 1][j + 1], (o, c, t + (a[i] != b[j]), oa, ob))
    o, c, t, oa, ob = best[n][m]
    return c, oa, ob, t


def _plausible(wa: list[str], wb: list[str], budget: int) -> bool:
    """A cheap necessary condition for the edit rules (most candidate pairs fail it)."""
    if abs(len(wa) - len(wb)) > budget + 3:
        return False
    sa, sb = set(wa) - COURTESY, set(wb) - COURTESY
    return min(len(sa - sb), len(sb - sa)) <= 2  # the shorter side may differ only by typos


def same_message(a: str, b: str, threshold: float = 0.8) -> str | None:
    """Why the normalised messages ``a`` and ``b`` are one message with edits, or None.

    Short messages by the edit rules above (words added on one side only: a word replaced by
    another is a different message); long ones by character 4-gram Jaccard >= ``threshold``."""
    if a == b:
        return "same text"
    wa, wb = a.split(), b.split()
    if abs(len(wa) - len(wb)) > 5 and max(len(wa), len(wb)) <= SHORT_WORDS:
        return None  # more than the edit rules allow (cheap test first: most candidates end here)
    if sorted(_NUMBER.findall(a)) != sorted(_NUMBER.findall(b)):
        return None
    if max(len(wa), len(wb)) > SHORT_WORDS:
        ga, gb = char_grams(a), char_grams(b)
        inter = len(np.intersect1d(ga, gb, assume_unique=True))
        j = inter / (len(ga) + len(gb) - inter)
        return f"prompt 4-gram Jaccard {j:.2f}" if j >= threshold else None
    if a.replace(" ", "") == b.replace(" ", ""):
        return "words joined or split"
    shorter = min(len(wa), len(wb))
    budget = 0 if shorter < 4 else 1 if shorter < 10 else 2  # "edit account" / "edit pro account" differ
    if not _plausible(wa, wb, budget):
        return None
    courtesy, only_a, only_b, typos = _align(wa, wb)
    added = max(only_a, only_b)
    if min(only_a, only_b) == 0 and added <= budget and courtesy <= 3 and typos <= 2:
        parts = [f"{k} {what}" for k, what in ((typos, "typo(s)"), (courtesy, "courtesy word(s)"),
                                                (added, "word(s) added")) if k]
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
    # The share rule needs a long inner message: on short ones 80% of the 4-grams survive a
    # replaced word ("editing data on premium account" / "changing data on premium account").
    if hit >= share and len(wi) >= SHARE_MIN_WORDS:
        return f"contains {hit:.0%} of its 4-grams"
    if hit < 0.5:
        return None
    # Embedded with typos: some window of the outer words is the inner message with <= 2 typos.
    wo, n, inner_set = outer.split(), len(wi), set(wi)
    for size in (n, n - 1, n + 1):
        for start in range(0, len(wo) - size + 1):
            window = wo[start:start + size]
            if len(inner_set - set(window)) > 2:
                continue
            courtesy, only_window, only_inner, typos = _align(window, wi)
            if only_window == only_inner == 0 and typos <= 2:
                return f"contains it with {typos} typo(s)"
    return None
