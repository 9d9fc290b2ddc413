"""Drafters that exist only to exercise the engine: random, always wrong, and trees with a wrong first branch."""

from __future__ import annotations

import random

from drafters.base import EMPTY_DRAFT, BaseDrafter, Draft, TrackingDrafter
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


def assert_same_draft(got: Draft, want: Draft, where: str = "") -> None:
    """Identical drafts: token ids and parents equal, probabilities within 1e-6 (an empty draft equals any
    other empty draft, whatever its parents field)."""
    assert got.token_ids == want.token_ids, f"{where}: tokens {got.token_ids} != {want.token_ids}"
    if not want.token_ids:
        return
    assert got.parent_list() == want.parent_list(), f"{where}: parents {got.parent_list()} != {want.parent_list()}"
    assert (got.probs is None) == (want.probs is None), where
    if want.probs is not None:
        assert max(abs(a - b) for a, b in zip(got.probs, want.probs)) <= 1e-6, f"{where}: {got.probs} {want.probs}"


class LockstepDrafter(BaseDrafter):
    """Drives a drafter and its reference with the same calls and checks that every draft is the same.

    Behaves as the drafter under test (its drafts are the ones returned), so it can stand in a replay or an engine.
    """

    def __init__(self, drafter, reference):
        from drafters.base import propose_all

        self.drafter, self.reference = drafter, reference
        self._propose_all = propose_all
        self.compared = 0

    def begin(self, request_id, prompt_ids, group):
        self.drafter.begin(request_id, prompt_ids, group)
        self.reference.begin(request_id, prompt_ids, group)

    def observe(self, request_id, token_ids, logprobs=None):
        self.observe_batch([request_id], [token_ids], None if logprobs is None else [logprobs])

    def observe_batch(self, request_ids, token_ids, logprobs=None):
        self.drafter.observe_batch(request_ids, token_ids, logprobs)
        self.reference.observe_batch(request_ids, token_ids, logprobs)

    def end(self, request_id):
        self.drafter.end(request_id)
        self.reference.end(request_id)

    def refresh(self, history, policy_version):
        self.drafter.refresh(history, policy_version)
        self.reference.refresh(history, policy_version)

    def propose(self, request_id, max_tokens):
        return self.propose_batch([request_id], [max_tokens])[0]

    def propose_batch(self, request_ids, max_tokens):
        got = self._propose_all(self.drafter, request_ids, max_tokens)
        want = [self.reference.propose(r, k) for r, k in zip(request_ids, max_tokens)]
        for rid, k, g, w in zip(request_ids, max_tokens, got, want):
            assert_same_draft(g, w, f"request {rid}, max_tokens {k}, draft #{self.compared}")
            self.compared += 1
        return got


def cost_from_function(fn, batches=(1, 4, 16, 64), ks=(1, 2, 4, 8, 16)):
    """A step-cost model whose grid is fn(M, B) at B sequences bringing k tokens each (M = B k)."""
    from rollout.cost_model import CostModel

    return CostModel({b: [(b * k, fn(b * k, b)) for k in ks] for b in batches})
