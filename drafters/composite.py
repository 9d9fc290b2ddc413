"""The composite drafter: the parametric drafter's chain and the suffix drafter's tree merged into one tree.

Retrieval is right where the policy repeats itself (siblings, earlier rollouts, copied spans) and silent where it
writes something new; the parametric drafter (drafters/model.py) guesses everywhere but is less sure. Merging the
two as tries keyed by token paths keeps every path either proposes; a node both propose is one node, with the
higher of the two estimates of its path probability. The max_tokens nodes with the highest path probability are
kept: a child's estimate never exceeds its parent's within one source, so the kept nodes form a tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from drafters.base import (
    EMPTY_DRAFT,
    BaseDrafter,
    Draft,
    make_drafter,
    propose_all,
    register_drafter,
    wanted_top_logprobs,
)
from drafters.options import DrafterOptions, build_options


@dataclass
class CompositeConfig(DrafterOptions):
    """Each part is a drafter name and its keyword options, built by make_drafter as any drafter is."""

    drafter: ClassVar[str] = "composite"

    retrieval: str = "suffix"
    retrieval_options: dict[str, Any] = field(default_factory=dict)
    model: str = "model"
    model_options: dict[str, Any] = field(default_factory=dict)


def merge_drafts(drafts: Sequence[Draft], max_tokens: int) -> Draft:
    """Union of the drafts' paths, best max_tokens nodes by estimated path probability, parents first."""
    if max_tokens <= 0:
        return EMPTY_DRAFT
    best: dict[tuple[int, ...], float] = {}  # token path -> estimated probability of reaching and accepting it
    for d in drafts:
        if not len(d):
            continue
        paths: list[tuple[int, ...]] = []
        for t, p, pp in zip(d.token_ids, d.parent_list(), d.path_probs()):
            path = (paths[p] if p >= 0 else ()) + (int(t),)
            paths.append(path)
            best[path] = max(best.get(path, 0.0), pp)
    if not best:
        return EMPTY_DRAFT
    # Highest probability first; a parent ties with its child at most, and the shorter path wins the tie.
    kept = sorted(best, key=lambda path: (-best[path], len(path)))[:max_tokens]
    index = {path: i for i, path in enumerate(kept)}
    parents = [index[path[:-1]] if len(path) > 1 else -1 for path in kept]
    probs = [best[path] / (best[path[:-1]] if len(path) > 1 else 1.0) for path in kept]
    return Draft([path[-1] for path in kept], parents, [min(1.0, p) for p in probs])


@register_drafter("composite")
class CompositeDrafter(BaseDrafter):
    def __init__(self, **options):
        self.config = build_options(CompositeConfig, options)
        self.retrieval = make_drafter(self.config.retrieval, **self.config.retrieval_options)
        self.model = make_drafter(self.config.model, **self.config.model_options)
        self.parts = (self.model, self.retrieval)

    @property
    def top_logprobs(self) -> int:
        return max(wanted_top_logprobs(part) for part in self.parts)

    def begin(self, request_id, prompt_ids, group):
        for part in self.parts:
            part.begin(request_id, prompt_ids, group)

    def observe(self, request_id, token_ids, logprobs=None):
        for part in self.parts:
            part.observe(request_id, token_ids, logprobs)

    def observe_batch(self, request_ids, token_ids, logprobs=None) -> None:
        for part in self.parts:
            part.observe_batch(request_ids, token_ids, logprobs)

    def end(self, request_id):
        for part in self.parts:
            part.end(request_id)

    def bind_target(self, folder: str) -> None:
        for part in self.parts:
            part.bind_target(folder)

    def refresh(self, history, policy_version: int) -> None:
        for part in self.parts:
            part.refresh(history, policy_version)

    def propose(self, request_id: str, max_tokens: int) -> Draft:
        return self.propose_batch([request_id], [max_tokens])[0]

    def propose_batch(self, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[Draft]:
        learned = propose_all(self.model, request_ids, max_tokens)
        retrieved = propose_all(self.retrieval, request_ids, max_tokens)
        return [merge_drafts((a, b), k) for a, b, k in zip(learned, retrieved, max_tokens)]
