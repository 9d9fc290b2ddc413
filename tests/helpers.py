"""Drafters that exist only to exercise the engine: random, always wrong, and trees with a wrong first branch."""

from __future__ import annotations

import random

from drafters.base import EMPTY_DRAFT, BaseDrafter, Draft
from drafters.reference import ReferenceDrafter


class RandomDrafter(BaseDrafter):
    """Random chains, or random trees when tree=True.

    The draft is a function of the request's own tokens (and the seed), not of the order of calls, so a request
    gets the same drafts whether it runs alone or among others.
    """

    def __init__(self, vocab_size: int, seed: int = 0, tree: bool = False):
        self.vocab_size = vocab_size
        self.seed = seed
        self.tree = tree
        self.tokens: dict[str, list[int]] = {}

    def begin(self, request_id, prompt_ids, group):
        self.tokens[request_id] = list(prompt_ids)

    def observe(self, request_id, token_ids, logprobs=None):
        self.tokens[request_id].extend(token_ids)

    def end(self, request_id):
        del self.tokens[request_id]

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
