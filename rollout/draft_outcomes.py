"""How every proposed draft would have fared, settled from the tokens its request emits afterwards.

A request emits the same tokens whatever was drafted (each output position draws with its own uniform: verify.py),
so a draft node is accepted exactly when it matches the emitted token at its place. The budget therefore learns
acceptance at every depth the drafter proposed, not only at the depths it chose to verify. Learning from verified
nodes alone, a budget that verifies one node per sequence at batch 64 never sees how the second fares there, and
prices it from the tail's few sequences (docs/budget.md has the figures). On vLLM's sampler, which accepts a
one-hot draft token with the target's probability of it, the match is an unbiased estimate of acceptance rather
than the outcome itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from drafters.base import Draft


@dataclass
class _Open:
    draft: Draft
    path: list[int] = field(default_factory=list)  # nodes matched so far, root first

    def feed(self, tokens: Sequence[int]) -> bool:
        """Match emitted tokens in order; True once the draft is settled (a miss, or a leaf reached)."""
        return any(self.advance(t) for t in tokens)

    def advance(self, token: int) -> bool:
        """Match the next emitted token; True once the draft is settled (a miss, or a leaf reached)."""
        d, at = self.draft, (self.path[-1] if self.path else -1)
        # Children of a node come after it, most likely first; in a chain, node i's only child is i + 1.
        children = (at + 1,) if d.is_chain else (i for i in range(at + 1, len(d)) if d.node_parents[i] == at)
        child = next((i for i in children if i < len(d) and d.token_ids[i] == token), None)
        if child is None:
            return True
        self.path.append(child)
        return len(self.path) == d.depth or child not in d.node_parents[child + 1 :]


@dataclass
class DraftOutcomes:
    """Per request, the drafts whose outcome is still open; `emitted` settles them as tokens arrive."""

    open: dict[str, list[_Open]] = field(default_factory=dict)  # request -> drafts proposed, oldest first

    def proposed(self, request_id: str, draft: Draft) -> None:
        """`draft` was proposed for the request's next tokens, whether or not any of it is verified."""
        if len(draft):
            self.open.setdefault(request_id, []).append(_Open(draft))

    def emitted(self, request_id: str, tokens: Sequence[int]) -> list[tuple[Draft, list[int]]]:
        """The request emitted `tokens`: the drafts they settle, each with the nodes it would have had accepted."""
        drafts = self.open.get(request_id)
        if not drafts or not len(tokens):
            return []
        settled, still = [], []
        for o in drafts:
            (settled if o.feed(tokens) else still).append(o)
        self.open[request_id] = still
        return [(o.draft, o.path) for o in settled]

    def end(self, request_id: str) -> None:
        """The request is done: drafts still open stay unjudged (what follows a stop token is never verified)."""
        self.open.pop(request_id, None)
