"""Token-level constrained decoding for the HF engine, on top of ``pipelines.guide``.

At every step each row may only take tokens whose text keeps the output completable; greedy
decoding takes the best of them, sampling samples among them. Greedy decoding therefore returns
exactly the unconstrained output whenever the model never needed correcting, and ``interventions``
counts the steps where it did: a row with none is one the model got right on its own (its
unconstrained validity, measured in the same run).

The valid tokens of a state are found by walking a character trie of the vocabulary alongside the
automaton, so a dead prefix prunes every token that shares it; the mask is cached per state (inside
a free string the state does not change from character to character, so one walk serves a whole
string).
"""

from __future__ import annotations

from pipelines.guide import Guide

MAX_CACHED_STATES = 4000


class TokenTexts:
    """The text each token id adds to an output, and a character trie over those texts."""

    def __init__(self, tokenizer, vocab_size: int):
        special = set(tokenizer.all_special_ids)
        anchor = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a"))[:1] or [0]
        head = tokenizer.decode(anchor)
        n = min(len(tokenizer), vocab_size)
        # decoded after an anchor so tokenizers that drop a leading space on their own (sentencepiece) keep it
        decoded = tokenizer.batch_decode([anchor + [i] for i in range(n)], clean_up_tokenization_spaces=False)
        self.texts: list[str | None] = [None] * vocab_size
        self.trie: dict = {}  # char -> [ids ending here, children]
        for i, d in enumerate(decoded):
            t = d[len(head):] if d.startswith(head) else None
            if i in special or not t:
                continue
            self.texts[i] = t
            node = None
            children = self.trie
            for c in t:
                node = children.setdefault(c, ([], {}))
                children = node[1]
            node[0].append(i)
        self.vocab_size = vocab_size


class TokenGuide:
    """A ``Guide`` over one tokenizer's vocabulary, with per-state caches shared by all rows."""

    def __init__(self, guide: Guide, texts: TokenTexts):
        self.guide, self.texts = guide, texts
        self._masks: dict[tuple, object] = {}
        self._next: dict[tuple, dict[int, tuple | None]] = {}

    def valid_mask(self, state: tuple):
        """Bool mask over the vocabulary: tokens after which the output can still be completed."""
        mask = self._masks.get(state)
        if mask is None:
            import torch

            ids: list[int] = []
            todo = [(self.texts.trie, state)]
            while todo:
                children, st = todo.pop()
                for c, (ending, grand) in children.items():
                    nxt = self.guide.advance(st, c)
                    if nxt is None:
                        continue
                    ids += ending
                    if grand:
                        todo.append((grand, nxt))
            mask = torch.zeros(self.texts.vocab_size, dtype=torch.bool)
            mask[ids] = True
            if len(self._masks) < MAX_CACHED_STATES:
                self._masks[state] = mask
        return mask

    def next_state(self, state: tuple, token: int) -> tuple | None:
        cache = self._next.setdefault(state, {})
        if token not in cache:
            text = self.texts.texts[token] if token < self.texts.vocab_size else None
            cache[token] = None if text is None else self.guide.advance(state, text)
        return cache[token]


class GuidedLogits:
    """A transformers ``LogitsProcessor``: keeps each row's automaton state and masks its scores."""

    def __init__(self, token_guide: TokenGuide, batch: int, prompt_width: int, eos_ids: set[int], sample: bool):
        self.tg = token_guide
        self.width = prompt_width
        self.eos = sorted(eos_ids)
        self.sample = sample
        self.states: list[tuple | None] = [token_guide.guide.start] * batch
        self.finished = [False] * batch
        self.interventions = [0] * batch

    def __call__(self, input_ids, scores):
        import torch

        if input_ids.shape[1] > self.width:  # fold in the token chosen at the previous step
            for r, tok in enumerate(input_ids[:, -1].tolist()):
                if self.finished[r]:
                    continue
                if tok in self.eos:
                    self.finished[r] = True
                elif self.states[r] is not None:
                    self.states[r] = self.tg.next_state(self.states[r], tok)
        out = torch.full_like(scores, float("-inf"))
        for r in range(len(self.states)):
            keep = self._allowed(r, scores[r])
            out[r, keep] = scores[r, keep]
        return out

    def _allowed(self, r: int, row_scores):
        """Token ids row ``r`` may take (a list, or a bool mask over the vocabulary)."""
        state = self.states[r]
        best = int(row_scores.argmax())
        if self.finished[r] or state is None:
            return self.eos or [best]
        if Guide.closed(state):  # complete: only the end may follow
            text = self.tg.texts.texts[best]
            if best not in self.eos and not (text and text.isspace()):  # trailing blank space stays valid
                self.interventions[r] += 1
            return self.eos or [best]
        mask = self.tg.valid_mask(state)[: row_scores.shape[0]].clone()
        if Guide.done(state):  # a complete output may also end here
            mask[self.eos] = True
        if not bool(mask.any()):  # nothing completes the output (a vocabulary without the needed text)
            self.interventions[r] += 1
            return self.eos or [best]
        if not self.sample and not bool(mask[best]):
            self.interventions[r] += 1
        return mask
