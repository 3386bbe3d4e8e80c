"""Synthetic prompts of a given length in tokens, for an external endpoint.

A learner's text never goes to the endpoint: every prompt is common English words drawn from
`WORDS`, afresh for each run (the lengths and arrivals are the seeded ones): a deployment's prefix
cache, on by default in vLLM, must not find one run's prompts, or another learner's, already
computed, which would cut TTFT to a fraction of a real first request's. Where the endpoint counts tokens (vLLM's POST /tokenize), the words are measured
once per page process: the tokens each adds after the opening word. Tokenizers split text at
spaces before merging (byte-level BPE and SentencePiece alike), so a prompt made of one-token
words has exactly as many tokens as the opening word's count plus one per word. The first prompt
of each run is counted again to check it. Without /tokenize, a word is taken as one token, and
the page says the lengths are approximate.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

OPENING = "The"
WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
         "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
         "have", "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her",
         "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no", "time",
         "day", "way", "man", "new", "good", "old", "long", "great", "little", "own", "other")


@dataclass(frozen=True)
class Vocabulary:
    """The words a prompt is made of, and what the opening word costs in tokens."""

    words: tuple[str, ...]
    opening_tokens: int
    counted: bool  # True: lengths measured by the endpoint's tokenizer; False: one per word


APPROXIMATE = Vocabulary(WORDS, opening_tokens=1, counted=False)


def measure(count: Callable[[str], int | None]) -> Vocabulary:
    """The one-token words under the endpoint's tokenizer (`count` is its /tokenize)."""
    opening = count(OPENING)
    if opening is None:
        return APPROXIMATE
    single = []
    for word in WORDS:
        n = count(f"{OPENING} {word}")
        if n is not None and n - opening == 1:
            single.append(word)
    if len(single) < 4:  # too few to vary the prompts: fall back, and say so
        return APPROXIMATE
    return Vocabulary(tuple(single), opening_tokens=opening, counted=True)


class PromptMaker:
    """Builds prompts for one endpoint; measures its vocabulary the first time it is asked."""

    def __init__(self, count: Callable[[str], int | None] | None) -> None:
        self._count = count
        self._vocab: Vocabulary | None = None
        self._lock = threading.Lock()

    def vocabulary(self) -> Vocabulary:
        with self._lock:
            if self._vocab is None:
                self._vocab = measure(self._count) if self._count is not None else APPROXIMATE
            return self._vocab

    def prompts(self, lengths: list[int], seed: int | None = None
                ) -> tuple[list[str], Vocabulary]:
        """One prompt per length, different from each other from the second word (fresh words
        unless a `seed` is given, as tests do)."""
        vocab = self.vocabulary()
        rng = np.random.default_rng(seed)
        out = []
        for n in lengths:
            picks = rng.integers(0, len(vocab.words), size=max(n - vocab.opening_tokens, 0))
            out.append(" ".join([OPENING, *(vocab.words[i] for i in picks)]))
        return out, vocab

    def check(self, prompt: str, expected: int) -> int | None:
        """The endpoint's count of `prompt` when it differs from `expected` (None: it agrees, or
        nothing can count it)."""
        if self._count is None or not self.vocabulary().counted:
            return None
        n = self._count(prompt)
        return n if n is not None and n != expected else None
