"""How many drafted tokens each running sequence verifies, step by step: `auto` (default) from the measured step
cost and acceptance, `fixed:K` up to K nodes of every draft, `off` none (plain decoding through the same engine).

`auto`, in ten lines:
1. A step of B sequences bringing M new tokens, M' with the rows padded to the longest draft at the probe's price,
   costs t(B, B) x (f + a x (t(M', B) / t(B, B) - 1)): t probed at start-up, f and a fitted to the run's steps.
2. A draft node is accepted with chance p x r x s: p its path probability by the drafter, r the accepted / claimed
   ratio at its depth (overconfidence grows with depth), s its sequence's recent accepted / predicted, shrunk to 1;
   learned from every proposed draft, verified or not, as the tokens emitted after it settle it.
3. When no request waits for a slot, the longest rollouts set the makespan: nodes rank by chance x their sequence's
   expected remaining length (its prompt's past rollouts) / the batch mean, within [1/4, 4]; else by chance alone.
4. Nodes are taken in that order, each draft as a prefix. The step keeps the prefix of that order that maximises
   expected tokens / step seconds: none, where verifying costs more than it brings.
5. The drafter is asked for twice the mean nodes per sequence the bucket's last step kept (at least 4); prefill
   steps draft nothing. The state per step is an explicit `Selection`, handed back with its timing (`observe_step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
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
    """Per step: max_draft (nodes to ask for, per sequence) -> select (`waiting`: requests queued) -> observe_step (its
    seconds, of which drafting); feedback per draft once emitted tokens settle it. Per request: finished; refresh."""

    def max_draft(self, batch: int, prefill: bool = False) -> int: ...
    def select(self, items: list[BudgetItem], waiting: int = 0) -> Selection: ...
    def feedback(self, request_id: str, draft: Draft, accepted: list[int]) -> None: ...
    def observe_step(self, selection: Selection, seconds: float, draft_seconds: float = 0.0) -> None: ...
    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None: ...
    def refresh(self, history) -> None: ...


def _selection(items: list[BudgetItem], counts: list[int]) -> Selection:
    return Selection(counts, sum(it.pending for it in items) + sum(counts), any(it.pending > 1 for it in items))


@dataclass
class FixedBudget(Budget):  # learns nothing: the protocol's empty feedback, observe_step, finished and refresh
    k: int

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        return self.k

    def select(self, items: list[BudgetItem], waiting: int = 0) -> Selection:
        return _selection(items, [min(self.k, len(it.draft)) for it in items])


@dataclass
class Acceptance:
    """Accepted / claimed draft nodes per draft depth (claimed: the drafter's path probabilities), and per sequence
    accepted / predicted (predicted: claimed x its depth's ratio). Drafters are overconfident, more so deep down."""

    prior_ratio: float = 0.5  # drafters are overconfident until shown otherwise
    prior_claims: float = 4.0  # claimed nodes' worth of evidence behind the prior, per depth
    shrink: float = 2.0  # predicted nodes of a sequence's own evidence at which it counts half
    seq_decay: float = 0.7  # each settled draft scales a sequence's earlier evidence by this
    decay: float = 0.999  # and the depths' evidence (a few thousand drafts' memory: acceptance drifts)
    depths: np.ndarray = field(default_factory=lambda: np.zeros((2, 65)))  # [accepted; claimed] at depth d, decayed
    seqs: dict[str, list[float]] = field(default_factory=dict)  # request -> [accepted, predicted], decayed

    def ratio(self, depth: np.ndarray) -> np.ndarray:
        """[N] accepted / claimed at each depth of `depth` [N], with the prior's evidence."""
        accepted, claimed = self.depths[:, np.minimum(depth, self.depths.shape[1] - 1)]
        return (accepted + self.prior_claims * self.prior_ratio) / (claimed + self.prior_claims)

    def batch_chances(self, request_ids: list[str], drafts: list[Draft], nodes: int) -> tuple[np.ndarray, np.ndarray]:
        """Each node's chance of acceptance (its prediction scaled by how its sequence beat predictions), for the first
        `nodes` nodes of every draft at once, in few numpy calls: [P] draft after draft, and [B] nodes each."""
        counts = np.array([min(len(d), nodes) for d in drafts], dtype=np.intp)  # [B]
        depth = np.fromiter(chain.from_iterable(d.node_depths[:nodes] for d in drafts), np.intp)  # [P]
        claimed = np.fromiter(chain.from_iterable(d.path_probs()[:nodes] for d in drafts), np.float64)  # [P]
        seq = np.array([self.seqs.get(r, (0.0, 0.0)) for r in request_ids], dtype=np.float64) + self.shrink  # [B, 2]
        beat, expected = np.repeat(seq, counts, axis=0).T  # [P] each
        return np.minimum(np.maximum(self.ratio(depth) * claimed * beat / expected, 0.0), 1.0), counts

    def observe(self, request_id: str, draft: Draft, accepted: int) -> None:
        """`draft` had (or would have had) its first `accepted` depths accepted."""
        depth = np.asarray(draft.node_depths, dtype=np.intp)
        claimed = np.asarray(draft.path_probs(), dtype=np.float64)
        seq = self.seqs.setdefault(request_id, [0.0, 0.0])
        seq[:] = self.seq_decay * seq[0] + accepted, self.seq_decay * seq[1] + (self.ratio(depth) * claimed).sum()
        self.depths *= self.decay
        self.depths[0, 1 : accepted + 1] += 1.0
        np.add.at(self.depths[1], np.minimum(depth, self.depths.shape[1] - 1), claimed)


@dataclass
class AutoBudget:
    cost: CostModel
    max_nodes: int = 16  # per sequence and step
    length_aware: bool = True  # rank by length class (3. above)
    acceptance: Acceptance = field(default_factory=Acceptance)
    lengths: LengthClasses = field(default_factory=LengthClasses)
    clock: StepClock = field(init=False)
    _kept: dict[int, int] = field(default_factory=dict)  # batch bucket -> nodes per sequence the last step verified

    def __post_init__(self):
        self.clock = StepClock(self.cost)

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        # Beside a prompt a draft saves at most one decode step, on the batch's dearest step. Else twice the mean last
        # kept: proposing costs per node asked, and the selection can still grow, doubling per step (docs/budget.md).
        kept = self._kept.get(batch_bucket(batch), self.max_nodes // 2)
        return 0 if prefill else min(self.max_nodes, max(4, 2 * kept))

    def select(self, items: list[BudgetItem], waiting: int = 0) -> Selection:
        if not any(len(it.draft) for it in items):
            return _selection(items, [0] * len(items))
        b = len(items)
        # While requests queue, a sequence that ends hands its slot on: every token counts the same (all weights 1).
        by_length = self.length_aware and waiting == 0
        remaining = np.array(
            [self.lengths.remaining(it.prompt_key, it.generated) if by_length else 1.0 for it in items]
        )
        weights = np.clip(remaining / remaining.mean(), 0.25, 4.0)  # [B]
        ids, drafts = [it.request_id for it in items], [it.draft for it in items]
        chances, lengths = self.acceptance.batch_chances(ids, drafts, self.max_nodes)  # [P], [B]
        owner = np.repeat(np.arange(b), lengths)  # [P] the draft of each node
        position = np.arange(len(chances)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # [P] within its draft
        table = np.zeros((b, int(lengths.max())))  # [B, N] chances, 0 past a draft's end
        table[owner, position] = chances
        # Best first by weighted chance; each draft's are capped by a running minimum so that it is taken as a prefix.
        priority = np.minimum.accumulate(weights[:, None] * table, axis=1)[owner, position]  # [P]
        order = np.lexsort((position, -priority))
        base = sum(it.pending for it in items)
        gain = b + np.concatenate([[0.0], np.cumsum(chances[order])])  # [P + 1] per prefix
        longest = np.maximum.accumulate(np.concatenate([[0], position[order] + 1]))  # [P + 1] attention pads to it
        rate = gain / self.clock.seconds(base + np.arange(len(order) + 1), b, rows=b * (1 + longest))
        return _selection(items, np.bincount(owner[order[: int(np.argmax(rate))]], minlength=b).tolist())

    def feedback(self, request_id: str, draft: Draft, accepted: list[int]) -> None:
        self.acceptance.observe(request_id, draft, len(accepted))

    def observe_step(self, selection: Selection, seconds: float, draft_seconds: float = 0.0) -> None:
        if selection.prefill or seconds <= 0:  # a prompt's step is neither a decoding step's cost nor its drafts'
            return
        batch = len(selection.counts)
        rows = batch * (1 + max(selection.counts))
        self.clock.observe(selection.new_tokens, batch, max(seconds - draft_seconds, 1e-6), rows)
        self._kept[batch_bucket(batch)] = -(-sum(selection.counts) // max(batch, 1))  # rounded up

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
