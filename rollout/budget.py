"""How many drafted tokens each running sequence verifies, step by step.

Modes: `auto` (default) chooses per step from the measured step cost and measured acceptance; `fixed:K` verifies up
to K nodes of every draft; `off` verifies none (plain decoding through the same engine).

`auto`, in ten lines:
1. A step of B sequences bringing M new tokens costs f x t(B, B) + a x (t(M, B) - t(B, B)): t the step-cost curve
   probed at start-up (per machine and model, cached), f and a fitted to this run's steps (rollout/cost_model.py).
2. A draft node is accepted with chance ratio x p: p its path probability by the drafter, ratio the sequence's
   recent accepted / claimed nodes, shrunk towards the ratio over all sequences.
3. When no request waits for a slot, the longest rollouts set the makespan, so they come first: each sequence's
   nodes are ranked by chance x its expected remaining length (from its prompt's recorded rollouts) over the
   batch's mean, within [1/4, 4]; while requests queue, by chance alone.
4. Nodes are taken in that order (each draft as a prefix), and the step keeps the prefix that maximises expected
   tokens / step seconds. Where verifying costs more than it brings, nothing is verified.
5. The drafter is asked for twice what the bucket's last step kept (at least 4); prefill steps draft nothing.
The budget's state per step is an explicit `Selection`, handed back with the step's timing (`observe_step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from drafters.base import Draft
from rollout.cost_model import CostModel, StepClock, batch_bucket
from rollout.lengths import LengthClasses


@dataclass
class BudgetItem:
    """What the budget knows about one sequence in a forward."""

    request_id: str
    draft: Draft
    pending: int  # tokens the sequence feeds besides the draft (1 when decoding, the prompt when prefilling)
    prompt_key: str | None = None
    generated: int = 0


@dataclass(frozen=True)
class Selection:
    """What the budget chose for one step: the plan it is later told the outcome of."""

    counts: list[int]  # [B] nodes of each draft to verify (a prefix of its node list)
    new_tokens: int  # tokens in the forward: pending tokens plus the verified nodes
    prefill: bool  # a prompt is in the step: neither its cost nor its drafting is a decoding step's


class Budget(Protocol):
    """Per step: max_draft (nodes to ask the drafter for, per sequence; 0: none) -> select (nodes of each draft to
    verify; `waiting`: requests queued for a slot) -> feedback per verified draft (indices of its accepted nodes) and
    observe_step (the step's seconds, of which drafting). Per request: finished; per policy version: refresh."""

    def max_draft(self, batch: int, prefill: bool = False) -> int: ...

    def select(self, items: list[BudgetItem], waiting: int = 0) -> Selection: ...

    def feedback(self, request_id: str, draft: Draft, accepted: list[int]) -> None: ...

    def observe_step(self, selection: Selection, seconds: float, draft_seconds: float = 0.0) -> None: ...

    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None: ...

    def refresh(self, history) -> None: ...


def _selection(items: list[BudgetItem], counts: list[int]) -> Selection:
    return Selection(counts, sum(it.pending for it in items) + sum(counts), any(it.pending > 1 for it in items))


@dataclass
class FixedBudget:
    k: int

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        return self.k

    def select(self, items: list[BudgetItem], waiting: int = 0) -> Selection:
        return _selection(items, [min(self.k, len(it.draft)) for it in items])

    def feedback(self, request_id: str, draft: Draft, accepted: list[int]) -> None: ...

    def observe_step(self, selection: Selection, seconds: float, draft_seconds: float = 0.0) -> None: ...

    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None: ...

    def refresh(self, history) -> None: ...  # a fixed budget learns nothing


@dataclass
class Acceptance:
    """Accepted / claimed draft nodes (claimed: the drafter's path probabilities), per sequence and overall."""

    prior_ratio: float = 0.5  # drafters are overconfident until shown otherwise
    prior_claims: float = 8.0  # claimed nodes' worth of evidence behind the prior
    shrink: float = 2.0  # claimed nodes of a sequence's own evidence at which it counts half
    seq_decay: float = 0.7  # each verified draft scales a sequence's earlier evidence by this
    decay: float = 0.999  # and the overall evidence (a few thousand drafts' memory: acceptance drifts)
    total: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [accepted, claimed], decayed
    seqs: dict[str, list[float]] = field(default_factory=dict)  # request -> [accepted, claimed], decayed

    def overall(self) -> float:
        accepted, claimed = self.total
        return (accepted + self.prior_claims * self.prior_ratio) / (claimed + self.prior_claims)

    def ratio(self, request_id: str) -> float:
        accepted, claimed = self.seqs.get(request_id, (0.0, 0.0))
        return (accepted + self.shrink * self.overall()) / (claimed + self.shrink)

    def observe(self, request_id: str, claimed: float, accepted: int) -> None:
        seq = self.seqs.setdefault(request_id, [0.0, 0.0])
        for evidence, decay in ((seq, self.seq_decay), (self.total, self.decay)):
            evidence[0] = decay * evidence[0] + accepted
            evidence[1] = decay * evidence[1] + claimed


@dataclass
class AutoBudget:
    cost: CostModel
    max_nodes: int = 16  # per sequence and step
    length_aware: bool = True
    acceptance: Acceptance = field(default_factory=Acceptance)
    lengths: LengthClasses = field(default_factory=LengthClasses)
    clock: StepClock = field(init=False)
    _kept: dict[int, int] = field(default_factory=dict)  # batch bucket -> most nodes the last step there verified

    def __post_init__(self):
        self.clock = StepClock(self.cost)

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        # A prefill step is not drafted: a draft beside a prompt saves its sequence at most one decode step, while
        # the step it rides on is its batch's dearest (measured on the RL workload: +47% on the prefill step for
        # about two tokens per sequence).
        if prefill:
            return 0
        # Proposing costs time per node asked: twice what was last kept lets the selection grow, doubling per step.
        return min(self.max_nodes, max(4, 2 * self._kept.get(batch_bucket(batch), self.max_nodes // 2)))

    def node_chances(self, it: BudgetItem) -> np.ndarray:
        """Each node's chance of acceptance, in draft order."""
        claimed = np.asarray(it.draft.path_probs()[: self.max_nodes], dtype=np.float64)
        return np.clip(self.acceptance.ratio(it.request_id) * claimed, 0.0, 1.0)

    def select(self, items: list[BudgetItem], waiting: int = 0) -> Selection:
        b = len(items)
        if b == 0 or not any(len(it.draft) for it in items):
            return _selection(items, [0] * b)
        if self.length_aware and waiting == 0:
            remaining = np.array([self.lengths.remaining(it.prompt_key, it.generated) for it in items])
            weights = np.clip(remaining / remaining.mean(), 0.25, 4.0)
        else:  # requests queue: a sequence that ends hands its slot on, and every token counts the same
            weights = np.ones(b)
        chances = [self.node_chances(it) for it in items]
        owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(chances)])
        position = np.concatenate([np.arange(len(c)) for c in chances])
        # Best first by weighted chance; each draft's are capped by a running minimum so that it is taken as a prefix.
        priority = np.concatenate([np.minimum.accumulate(w * c) for w, c in zip(weights, chances)])
        order = np.lexsort((position, -priority))
        taken_gain = b + np.concatenate([[0.0], np.cumsum(np.concatenate(chances)[order])])
        base_tokens = sum(it.pending for it in items)
        best = int(np.argmax(taken_gain / self.clock.seconds(base_tokens + np.arange(len(order) + 1), b)))
        return _selection(items, np.bincount(owner[order[:best]], minlength=b).tolist())

    def feedback(self, request_id: str, draft: Draft, accepted: list[int]) -> None:
        self.acceptance.observe(request_id, float(np.sum(draft.path_probs())), len(accepted))

    def observe_step(self, selection: Selection, seconds: float, draft_seconds: float = 0.0) -> None:
        if selection.prefill or seconds <= 0:  # a prompt's step is neither a decoding step's cost nor its drafts'
            return
        batch = len(selection.counts)
        self.clock.observe(selection.new_tokens, batch, max(seconds - draft_seconds, 1e-6))
        self._kept[batch_bucket(batch)] = max(selection.counts, default=0)

    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None:
        self.acceptance.seqs.pop(request_id, None)
        self.lengths.add(prompt_key, length)

    def refresh(self, history) -> None:
        self.lengths.load(history)


def parse_budget(spec: str, cost: CostModel | Callable[[], CostModel] | None = None, max_nodes: int = 16) -> Budget:
    """'off' | 'fixed:K' | 'auto' (needs a cost model, or a function that measures one)."""
    text = str(spec).strip().lower()
    if text == "off" or (text.startswith("fixed:") and text[6:].isdigit()):
        return FixedBudget(0 if text == "off" else int(text[6:]))
    if text == "auto":
        if cost is None:
            raise ValueError("speculation.budget='auto' needs a cost model: build the engine with Engine.from_config")
        return AutoBudget(cost if isinstance(cost, CostModel) else cost(), max_nodes=max_nodes)
    raise ValueError(f"speculation.budget must be 'auto', 'off' or 'fixed:K' with K >= 0, got {spec!r}")
