"""Prompt lookup: the baseline retrieval drafter, looking only at the request's own prompt and output.

Find the most recent earlier occurrence of the last n tokens (n from max_n down to min_n) and propose what followed
it. The same idea as transformers' `prompt_lookup_num_tokens` and vLLM's `ngram` method.

`NgramDrafter` keeps each request's tokens in the compiled core (drafters/csrc/ngram_core.h) and drafts the whole
batch in one call; `lookup` below, and `NgramReferenceDrafter` built on it, are the reference the tests hold it to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from drafters.base import EMPTY_DRAFT, BaseDrafter, Draft, TrackingDrafter, register_drafter
from drafters.native import load_native
from drafters.options import DrafterOptions, build_options


def lookup(tokens: np.ndarray, max_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Continuation of the most recent earlier occurrence of the longest matching tail n-gram."""
    n_tok = len(tokens)
    for n in range(min(max_n, n_tok - 1), min_n - 1, -1):
        tail = tokens[n_tok - n :]
        # Windows starting at i < n_tok - n (the tail itself excluded) that equal the tail.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: n_tok - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + max_tokens].tolist()
    return []


@dataclass
class NgramConfig(DrafterOptions):
    drafter: ClassVar[str] = "ngram"

    min_n: int = 1  # the shortest tail n-gram looked up
    max_n: int = 4  # the longest, tried first

    def validate(self) -> None:
        n, m = self.min_n, self.max_n
        if isinstance(n, int) and isinstance(m, int) and not 1 <= n <= m:
            raise ValueError(f"ngram drafter needs 1 <= min_n <= max_n, got min_n={n}, max_n={m}")


@register_drafter("ngram")
class NgramDrafter(BaseDrafter):
    def __init__(self, **options):
        self.config = build_options(NgramConfig, options)
        self.min_n, self.max_n = self.config.min_n, self.config.max_n
        self.core = load_native().NgramCore(self.min_n, self.max_n, Draft, EMPTY_DRAFT)
        self.slots: dict[str, int] = {}  # request id -> the core's slot

    def begin(self, request_id, prompt_ids, group):
        if request_id in self.slots:
            raise ValueError(f"ngram drafter: request {request_id!r} began twice (end it first)")
        self.slots[request_id] = self.core.begin(np.asarray(prompt_ids, dtype=np.int32))

    def observe(self, request_id, token_ids, logprobs=None):
        self.observe_batch([request_id], [token_ids])

    def observe_batch(self, request_ids: Sequence[str], token_ids: Sequence[Sequence[int]], logprobs=None) -> None:
        slots = self.slots
        self.core.observe([slots[r] for r in request_ids], token_ids)

    def end(self, request_id):
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.core.end(slot)

    def propose(self, request_id, max_tokens):
        return self.propose_batch([request_id], [max_tokens])[0]

    def propose_batch(self, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[Draft]:
        slots = self.slots
        return self.core.propose([slots[r] for r in request_ids], max_tokens)


@register_drafter("ngram_reference")
class NgramReferenceDrafter(TrackingDrafter):
    """`ngram` in Python over each request's token list: the reference the compiled one is tested against."""

    def __init__(self, **options):
        super().__init__()
        self.config = build_options(NgramConfig, options)
        self.min_n, self.max_n = self.config.min_n, self.config.max_n

    def propose(self, request_id, max_tokens):
        if max_tokens <= 0:
            return Draft([])
        arr = np.asarray(self.tokens[request_id], dtype=np.int64)
        return Draft(lookup(arr, max_tokens, self.min_n, self.max_n))
