"""A drafter that knows the answer: it proposes the next tokens of a given reference continuation.

Used to measure the engine's ceiling (every draft right, `oracle_speedup` in benchmarks/engine.py) and, in the
tests, to check that correct, wrong and random drafts all leave the output unchanged. While the generated tokens
match the reference it proposes the reference's next tokens; once they diverge it proposes nothing.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from drafters.base import EMPTY_DRAFT, BaseDrafter, Draft


class ReferenceDrafter(BaseDrafter):
    """references: prompt -> continuation; by_request: request id -> continuation (GRPO siblings share a prompt but
    not a rollout: the engine's oracle mode keys by request). A request named in by_request uses that one.
    certainty: the acceptance probability each drafted node claims (None: no claim). The oracle claims 1.0, so a
    budget that weighs drafts by their claimed probability verifies as much of it as the step's cost allows."""

    def __init__(
        self,
        references: Mapping[tuple[int, ...], Sequence[int]] | None = None,
        by_request: Mapping[str, Sequence[int]] | None = None,
        certainty: float | None = None,
    ):
        self.references = {tuple(k): list(v) for k, v in (references or {}).items()}
        self.by_request = {k: list(v) for k, v in (by_request or {}).items()}
        self.certainty = certainty
        self._state: dict[str, tuple[list[int], list[int]]] = {}  # request -> (reference, generated)

    def begin(self, request_id, prompt_ids, group):
        reference = self.by_request.get(request_id)
        if reference is None:
            reference = self.references.get(tuple(prompt_ids), [])
        self._state[request_id] = (reference, [])

    def observe(self, request_id, token_ids, logprobs=None):
        self._state[request_id][1].extend(token_ids)

    def propose(self, request_id, max_tokens):
        reference, generated = self._state[request_id]
        n = len(generated)
        if reference[:n] != generated:
            return EMPTY_DRAFT
        tokens = self.transform(reference[n : n + max_tokens])
        return Draft(tokens, probs=None if self.certainty is None else [self.certainty] * len(tokens))

    def transform(self, tokens: list[int]) -> list[int]:
        """Hook for test drafters that corrupt the reference."""
        return tokens

    def end(self, request_id):
        self._state.pop(request_id, None)
