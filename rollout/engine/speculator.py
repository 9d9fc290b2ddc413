"""Speculation for one engine: the drafter and the budget, turned into an explicit plan per step.

Per step: `plan` asks the drafter for a draft per sequence (one batched call) and lets the budget choose how much
of each to verify; the runner verifies what the plan says; `learn` hands the outcome back: to the budget, how each
draft settled by the emitted tokens would have fared, verified or not (rollout/draft_outcomes.py), and the step's
timing; to the drafter, the emitted tokens (one batched call).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from drafters.base import EMPTY_DRAFT, Draft, Drafter, NoDrafter, propose_all
from rollout.budget import Budget, BudgetItem, Selection
from rollout.draft_outcomes import DraftOutcomes
from rollout.engine.sequence import Sequence


@dataclass(frozen=True)
class StepPlan:
    drafts: list[Draft]  # [B] what each sequence verifies this step
    draft_seconds: float  # host time spent proposing
    selection: Selection | None  # the budget's choice, handed back to it with the step's timing (None: plain)

    @classmethod
    def plain(cls, batch: int) -> "StepPlan":
        return cls([EMPTY_DRAFT] * batch, 0.0, None)


@dataclass(frozen=True)
class StepOutcome:
    """What one verification step did, per sequence of the batch."""

    paths: list[list[int]]  # [B] accepted draft node indices, root first
    next_tokens: list[int]  # [B] the token drawn after each accepted path
    committed: list[list[int]]  # [B] tokens appended (emitted tokens up to a stop or the length limit)
    committed_logprobs: list[list[float]]  # [B] their logprobs
    finished: list[Sequence]

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.committed)


class Speculator:
    def __init__(self, drafter: Drafter, budget: Budget, max_draft_tokens: int, vocab_size: int):
        self.drafter = drafter
        self.budget = budget
        self.max_draft_tokens = max_draft_tokens
        self.vocab_size = vocab_size
        # Without a drafter there is nothing to plan or learn: the engine decodes plainly at no per-sequence cost.
        self.active = not isinstance(drafter, NoDrafter)
        self.outcomes = DraftOutcomes()

    def begin(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            self.drafter.begin(s.request_id, s.prompt, s.request.group)

    def end(self, seq: Sequence) -> None:
        self.drafter.end(seq.request_id)
        self.outcomes.end(seq.request_id)
        self.budget.finished(seq.request_id, seq.prompt_key, len(seq.output))

    def refresh(self, history, policy_version: int) -> None:
        self.drafter.refresh(history, policy_version)
        self.budget.refresh(history)

    def plan(self, seqs: list[Sequence], waiting: int) -> StepPlan:
        """Each sequence's draft, cut to what the budget verifies."""
        prefill = any(s.cache_len == 0 for s in seqs)
        ask = min(self.max_draft_tokens, self.budget.max_draft(len(seqs), prefill))
        rooms = [s.draft_room() for s in seqs]
        wanted = [i for i, room in enumerate(rooms) if min(ask, room) > 0]
        started = time.perf_counter()
        proposed = propose_all(self.drafter, [seqs[i].request_id for i in wanted], [min(ask, rooms[i]) for i in wanted])
        draft_seconds = time.perf_counter() - started
        drafts = [EMPTY_DRAFT] * len(seqs)
        for i, d in zip(wanted, proposed):
            if d is None or not len(d):
                continue
            if min(d.token_ids) < 0 or max(d.token_ids) >= self.vocab_size:
                raise RuntimeError(f"drafter {type(self.drafter).__name__} proposed a token outside the vocabulary")
            k = min(ask, rooms[i])
            drafts[i] = d.truncated(k, k)
            self.outcomes.proposed(seqs[i].request_id, drafts[i])
        items = [
            BudgetItem(s.request_id, d, len(s.tokens) - s.cache_len, s.prompt_key, len(s.output))
            for s, d in zip(seqs, drafts)
        ]
        selection = self.budget.select(items, waiting=waiting)
        chosen = [d if n >= len(d) else d.truncated(n, n) for d, n in zip(drafts, selection.counts)]
        return StepPlan(chosen, draft_seconds, selection)

    def learn(self, seqs: list[Sequence], plan: StepPlan, outcome: StepOutcome, seconds: float) -> None:
        """Feed the step's outcome back: to the budget per draft, to the drafter the committed tokens."""
        for s, committed in zip(seqs, outcome.committed):
            for draft, path in self.outcomes.emitted(s.request_id, committed):
                self.budget.feedback(s.request_id, draft, path)
        started = time.perf_counter()
        self.drafter.observe_batch([s.request_id for s in seqs], outcome.committed, outcome.committed_logprobs)
        observed = time.perf_counter() - started  # drafting's host cost includes observing
        if plan.selection is not None:
            self.budget.observe_step(plan.selection, seconds + observed, plan.draft_seconds + observed)
