"""Prompt lookup: the baseline retrieval drafter, looking only at the request's own prompt and output.

Find the most recent earlier occurrence of the last n tokens (n from max_n down to min_n) and propose what followed
it. The same idea as transformers' `prompt_lookup_num_tokens` and vLLM's `ngram` method.
"""

from __future__ import annotations

import numpy as np

from drafters.base import Draft, TrackingDrafter, register_drafter


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


@register_drafter("ngram")
class NgramDrafter(TrackingDrafter):
    def __init__(self, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram drafter needs 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        super().__init__()
        self.min_n, self.max_n = int(min_n), int(max_n)

    def propose(self, request_id, max_tokens):
        if max_tokens <= 0:
            return Draft([])
        arr = np.asarray(self.tokens[request_id], dtype=np.int64)
        return Draft(lookup(arr, max_tokens, self.min_n, self.max_n))
