"""Drafters that exist only to exercise the engine: random, always wrong, and trees with a wrong first branch."""

from __future__ import annotations

import random

from drafters.base import EMPTY_DRAFT, Draft, TrackingDrafter
from drafters.reference import ReferenceDrafter


class RandomDrafter(TrackingDrafter):
    """Random chains, or random trees when tree=True.

    The draft is a function of the request's own tokens (and the seed), not of the order of calls, so a request
    gets the same drafts whether it runs alone or among others.
    """

    def __init__(self, vocab_size: int, seed: int = 0, tree: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.seed = seed
        self.tree = tree

    def propose(self, request_id, max_tokens):
        rng = random.Random(hash((self.seed, tuple(self.tokens[request_id]))))
        n = rng.randint(0, max_tokens)
        tokens = [rng.randrange(self.vocab_size) for _ in range(n)]
        if not self.tree:
            return Draft(tokens)
        return Draft(tokens, parents=[rng.randint(-1, i - 1) for i in range(n)])


class WrongDrafter(ReferenceDrafter):
    """The reference continuation shifted by one token id: wrong at every position."""

    def __init__(self, references, vocab_size: int):
        super().__init__(references)
        self.vocab_size = vocab_size

    def transform(self, tokens):
        return [(t + 1) % self.vocab_size for t in tokens]


class WrongFirstTreeDrafter(ReferenceDrafter):
    """At every level a wrong candidate first, then the right one carrying the next level.

    Under greedy the right branch is always the second child, so every accepted token forces a KV move in the cache.
    """

    def __init__(self, references, vocab_size: int):
        super().__init__(references)
        self.vocab_size = vocab_size

    def propose(self, request_id, max_tokens):
        chain = super().propose(request_id, max(1, max_tokens // 2)).token_ids
        if not chain:
            return EMPTY_DRAFT
        tokens, parents, right = [], [], -1
        for t in chain:
            tokens += [(t + 7) % self.vocab_size, t]
            parents += [right, right]
            right = len(tokens) - 1
        return Draft(tokens, parents)
