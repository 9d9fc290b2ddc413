"""How many drafted tokens each running sequence verifies, step by step.

Modes: `auto` (default) chooses per step from a measured step cost and calibrated acceptance estimates;
`fixed:K` verifies up to K nodes of every draft; `off` verifies none (plain decoding through the same engine).

`auto`, in one step:
- the step cost t(M, B), seconds of a step with M new tokens from B sequences, is the cost model measured on this
  machine at start-up (rollout/cost_model.py), corrected online by what this run's steps actually take;
- each draft node's chance of acceptance is the drafter's path probability passed through a calibration table
  learnt from every verified node, times a recency-weighted ratio of how this sequence's drafts have fared;
- in the tail (no request waiting for a slot), each sequence's tokens are weighted by its length class: the expected
  number of tokens it still has to go, from the lengths recorded for its prompt, relative to the other running
  sequences. The longest rollouts set the makespan, so their tokens are worth more. While requests queue, a
  sequence that ends hands its slot to the next and throughput is what counts: every token weighs the same;
- nodes are taken in order of weighted gain, and the prefix that maximises (weighted expected tokens emitted) /
  t(M, B) is kept. Where verifying costs more than it brings, nothing is drafted;
- whether to draft at all at a batch size (drafting itself takes time) is measured: see DraftGate. How many nodes
  to ask the drafter for follows what verification has recently kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from drafters.base import Draft
from rollout.cost_model import CostModel, StepCost, batch_bucket


@dataclass
class BudgetItem:
    """What the budget knows about one sequence in a forward."""

    request_id: str
    draft: Draft
    pending: int  # tokens the sequence feeds besides the draft (1 when decoding, the prompt when prefilling)
    prompt_key: str | None = None
    generated: int = 0


class Budget(Protocol):
    def select(self, items: list[BudgetItem], waiting: int = 0) -> list[int]:
        """Nodes of each draft to verify (a prefix of the draft's node list); `waiting`: requests queued for a
        slot."""
        ...

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        """How many nodes to ask a drafter for, per sequence, in a step of `batch` sequences (0: do not draft)."""
        ...

    def feedback(self, request_id: str, draft: Draft, accepted: list[int]) -> None:
        """A verified draft and the indices of its accepted nodes (the accepted path)."""
        ...

    def observe_step(self, seconds: float, tokens: int, draft_seconds: float = 0.0) -> None:
        """The step just run: its seconds (of which `draft_seconds` drafting) and the tokens it emitted."""
        ...

    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None: ...

    def refresh(self, history) -> None: ...


class _NoFeedback:
    def feedback(self, request_id: str, draft: Draft, accepted: list[int]) -> None:
        pass

    def observe_step(self, seconds: float, tokens: int, draft_seconds: float = 0.0) -> None:
        pass

    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None:
        pass

    def refresh(self, history) -> None:
        pass


@dataclass
class FixedBudget(_NoFeedback):
    k: int

    def select(self, items: list[BudgetItem], waiting: int = 0) -> list[int]:
        return [min(self.k, len(it.draft)) for it in items]

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        return self.k


# ---------------------------------------------------------------------------------------------- auto


@dataclass
class AcceptanceModel:
    """The chance that a draft node is accepted, from the drafter's path probability, calibrated on outcomes.

    Retrieval drafters are overconfident where their evidence is thin (one long match reads as certainty) and the
    policy's novel text is where rollouts run longest, so the raw path probability is only a feature: a table over
    its bins keeps how often nodes of that bin were accepted (every verified node is one outcome: on the accepted
    path or not), and each sequence keeps a recency-weighted ratio of accepted to predicted tokens for what the
    table cannot see (a sequence that has wandered off the recorded text).
    """

    bins: int = 10
    prior: float = 8.0  # pseudo-outcomes per bin at prior_ratio x the drafter's estimate
    prior_ratio: float = 0.5  # drafters are overconfident until shown otherwise
    memory: float = 4000.0  # outcomes a bin keeps: older ones fade, as the policy (and so acceptance) drifts
    seq_decay: float = 0.7  # each verified draft scales a sequence's earlier evidence by this
    seq_shrink: float = 2.0  # predicted tokens of evidence at which a sequence's own ratio counts half
    _accepted: np.ndarray = field(init=False)
    _outcomes: np.ndarray = field(init=False)
    _seq: dict[str, list[float]] = field(default_factory=dict)  # request -> [accepted, predicted], decayed

    def __post_init__(self):
        self._accepted = np.zeros(self.bins)
        self._outcomes = np.zeros(self.bins)

    def _bin(self, raw: np.ndarray) -> np.ndarray:
        return np.minimum((np.clip(raw, 0.0, 1.0) * self.bins).astype(np.int64), self.bins - 1)

    def _table(self, raw: np.ndarray) -> np.ndarray:
        b = self._bin(raw)
        return (self._accepted[b] + self.prior * self.prior_ratio * raw) / (self._outcomes[b] + self.prior)

    def probs(self, request_id: str, raw: np.ndarray) -> np.ndarray:
        """Calibrated acceptance chance of each node, given the drafter's path probabilities."""
        if not len(raw):
            return np.zeros(0)
        accepted, predicted = self._seq.get(request_id, (0.0, 0.0))
        ratio = (accepted + self.seq_shrink) / (predicted + self.seq_shrink)
        return np.clip(self._table(np.asarray(raw, dtype=np.float64)) * ratio, 0.0, 1.0)

    def observe(self, request_id: str, raw: np.ndarray, on_path: np.ndarray) -> None:
        """Verified nodes of one draft: their path probabilities and which were accepted."""
        raw = np.asarray(raw, dtype=np.float64)
        predicted = float(self._table(raw).sum())
        b = self._bin(raw)
        np.add.at(self._accepted, b, on_path)
        np.add.at(self._outcomes, b, 1.0)
        full = self._outcomes > self.memory
        if full.any():
            self._accepted[full] *= self.memory / self._outcomes[full]
            self._outcomes[full] = self.memory
        seq = self._seq.setdefault(request_id, [0.0, 0.0])
        seq[0] = self.seq_decay * seq[0] + float(np.sum(on_path))
        seq[1] = self.seq_decay * seq[1] + predicted

    def forget(self, request_id: str) -> None:
        self._seq.pop(request_id, None)


@dataclass
class DraftGate:
    """How boldly to draft at a batch size, settled by measurement.

    The selection prices a draft from the step cost and the calibrated acceptance, and either can be off for this
    workload: drafting takes time neither prices (the drafter itself), acceptance drifts within a batch (siblings in
    flight early, novel tails late), and a node rated just below break-even may still pay. So per batch bucket
    (decoding steps: auto drafts no prefill) the gate plays arms that scale the price the selection puts on draft
    tokens: 0 drafts nothing, 1 trusts the estimates, 2 (4) drafts as if verification cost half (a quarter) as
    much. An arm's figure is its efficiency: tokens per second per sequence, relative to the cost model's plain
    step at that batch size (so steps at different batch sizes within one bucket compare fairly).

    Arms are chosen by discounted UCB (a bandit whose rewards drift): each arm keeps discounted sums of its plays'
    efficiency, weighted by the plays' length in plain steps, and the gate plays the arm with the best figure plus
    `explore` x sqrt(ln(plays) / its plays). Every play discounts every arm's evidence of the bucket, so an arm
    left alone grows uncertain and is re-checked: the workload changes as the batch drains (siblings early, novel
    tails late) and a loser's two unlucky first plays must not bench it for the rest of the batch. A bucket first
    played starts from the figures of the nearest bucket already played (the batch shrinks through the buckets one
    by one), worth `borrowed` plays per arm, so the tail's short buckets do not spend their few steps exploring.
    """

    scales: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)  # in order of boldness
    first: float = 1.0  # the arm tried first where nothing is known
    discount: float = 0.95  # evidence kept per play of the bucket: about 20 plays' memory
    explore: float = 0.05  # width of the confidence bonus, in units of efficiency (0.1 re-checked losers too often)
    borrowed: float = 0.5  # plays' worth of evidence a new bucket takes over per arm from its nearest neighbour
    # bucket -> arm -> [discounted sum of weight x efficiency, discounted sum of weight, discounted plays]
    _arms: dict[int, dict[float, list[float]]] = field(default_factory=dict)

    def _open(self, bucket: int) -> dict[float, list[float]]:
        if bucket not in self._arms:
            arms = {s: [0.0, 0.0, 0.0] for s in self.scales}
            known = [b for b, a in self._arms.items() if any(n > 0 for _, _, n in a.values())]
            if known:
                near = self._arms[min(known, key=lambda b: (abs(b - bucket), -b))]
                for s, (value, weight, n) in near.items():
                    if n > 0:
                        keep = min(1.0, self.borrowed / n)
                        arms[s] = [value * keep, weight * keep, n * keep]
            self._arms[bucket] = arms
        return self._arms[bucket]

    @staticmethod
    def _figure(arm: list[float]) -> float:
        return arm[0] / arm[1] if arm[1] > 0 else 0.0

    def choose(self, bucket: int) -> float:
        """The price scale for a step of this bucket (0: do not draft)."""
        arms = self._open(bucket)
        untried = [s for s in self.scales if arms[s][2] == 0]
        if untried:  # nothing known at all: the trusted arm first, then outward from it
            return min(untried, key=lambda s: abs(s - self.first))
        total = sum(n for _, _, n in arms.values())
        width = self.explore * math.sqrt(math.log(max(total, math.e)))
        return max(self.scales, key=lambda s: self._figure(arms[s]) + width / math.sqrt(arms[s][2]))

    def record(self, bucket: int, scale: float, efficiency: float, weight: float = 1.0) -> None:
        """A played step's efficiency; `weight`: its length in plain steps (longer steps are more evidence)."""
        arms = self._open(bucket)
        for arm in arms.values():
            for i in range(3):
                arm[i] *= self.discount
        arm = arms[scale]
        arm[0] += weight * efficiency
        arm[1] += weight
        arm[2] += 1.0

    def summary(self) -> dict[int, dict[float, tuple[float, float]]]:
        """bucket -> arm -> (efficiency, discounted plays), for benchmarks and stats."""
        return {
            b: {s: (round(self._figure(a), 4), round(a[2], 2)) for s, a in arms.items()}
            for b, arms in self._arms.items()
        }


@dataclass
class _Step:
    """What the budget decided for the step in flight, for observe_step to learn from."""

    batch: int
    prefill: bool
    scale: float  # the gate's arm: the factor on the price of draft tokens (0: no drafting)
    tokens_in: int = 0  # new tokens in the forward
    drafting: int = 0  # sequences that verify a draft


@dataclass
class AutoBudget:
    cost: CostModel
    max_nodes: int = 16  # per sequence and step
    length_aware: bool = True
    default_length: float = 256.0  # expected length of a rollout whose prompt has no recorded lengths
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)
    gate: DraftGate = field(default_factory=DraftGate)
    step_cost: StepCost = field(init=False)
    _lengths: dict[str, list[int]] = field(default_factory=dict)
    _ask: dict[int, float] = field(default_factory=dict)  # batch bucket -> running p90 of nodes verified per draft
    _step: _Step | None = None

    def __post_init__(self):
        self.step_cost = StepCost(self.cost)

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        # A prefill step is not drafted: a draft beside a prompt saves its sequence at most one decode step, while
        # the step it rides on is its batch's dearest, and (with share_prompts) the sequences prefilled are the
        # first copy of each prompt, whose siblings join one step later and keep the batch going anyway. Measured
        # on the RL workload: +47% on the prefill step for about two tokens per sequence.
        scale = 0.0 if prefill else self.gate.choose(batch_bucket(batch))
        self._step = _Step(batch, prefill, scale)
        if scale == 0:
            return 0
        # Proposing costs time per node asked: ask for about twice what verification has recently kept, so the
        # selection can grow (doubling per step) without paying for 16 nodes where 2 are verified.
        kept = self._ask.get(batch_bucket(batch), self.max_nodes / 2)
        return int(min(self.max_nodes, max(4, math.ceil(2 * kept))))

    def observe_step(self, seconds: float, tokens: int, draft_seconds: float = 0.0) -> None:
        """A step's duration (`draft_seconds` of it spent drafting) and the tokens it emitted."""
        step, self._step = self._step, None
        if step is None or seconds <= 0:
            return
        if step.prefill:  # neither a decoding step's cost nor either arm's evidence
            return
        if step.tokens_in:
            self.step_cost.observe(step.tokens_in, step.batch, max(seconds - draft_seconds, 1e-6), step.drafting)
        # Drafting time stays in the gate's figure: it is what the gate is there to weigh.
        plain = self.cost(step.batch, step.batch)
        efficiency = tokens * plain / (seconds * step.batch)
        self.gate.record(batch_bucket(step.batch), step.scale, efficiency, weight=seconds / plain)

    def _expected_remaining(self, it: BudgetItem) -> float:
        lengths = self._lengths.get(it.prompt_key or "", [])
        total = float(np.mean(lengths)) if lengths else self.default_length
        # Beyond the recorded mean, a sequence is in the tail: expect it to run about as long again as it has.
        return max(total - it.generated, 0.5 * max(it.generated, 1.0), 1.0)

    def node_probs(self, it: BudgetItem) -> np.ndarray:
        """Calibrated acceptance chances of the draft's nodes, in draft order."""
        return self.acceptance.probs(it.request_id, np.asarray(it.draft.path_probs(), dtype=np.float64))

    def select(self, items: list[BudgetItem], waiting: int = 0) -> list[int]:
        if not items:
            return []
        b = len(items)
        base_tokens = sum(it.pending for it in items)
        if self._step is not None:
            self._step.tokens_in = base_tokens
        if self.length_aware and waiting == 0:
            # The tail: nothing waits for a slot, so the longest rollouts set the makespan. While requests queue,
            # a sequence that ends frees its slot for the next one and every token counts the same.
            remaining = np.array([self._expected_remaining(it) for it in items])
            weights = np.clip(remaining / remaining.mean(), 0.25, 4.0)
        else:
            weights = np.ones(b)
        gains, owners = [], []
        for i, it in enumerate(items):
            probs = self.node_probs(it)[: self.max_nodes]
            # A node's gain only counts once its parent is taken; best-first order guarantees that for a prefix.
            gains.append(weights[i] * probs)
            owners.append(np.full(len(probs), i))
        if not any(len(g) for g in gains):
            return [0] * b
        owner = np.concatenate(owners)
        position = np.concatenate([np.arange(len(g)) for g in gains])
        # Nodes are merged across drafts by gain per second. A sequence's first node also carries the cost of
        # drafting that sequence at all, so its later nodes are cheaper than another sequence's first: each
        # draft's densities are capped by a running minimum so a draft is always taken as a prefix.
        per_token, per_seq = self.step_cost.unit_prices(b, base_tokens)
        density = np.concatenate(
            [np.minimum.accumulate(g / (per_token + per_seq * (np.arange(len(g)) == 0))) for g in gains if len(g)]
        )
        order = np.lexsort((position, -density))
        gain = np.concatenate(gains)[order]
        first = (position[order] == 0).astype(np.float64)
        base = float(weights.sum())  # every sequence emits one token per step whatever is drafted
        taken_gain = base + np.concatenate([[0.0], np.cumsum(gain)])
        drafting = np.concatenate([[0.0], np.cumsum(first)])
        # The gate's arm scales what the draft is priced at (the order of nodes does not change, only how many).
        scale = self._step.scale if self._step is not None and self._step.scale > 0 else 1.0
        extra = self.step_cost.extra(base_tokens + np.arange(len(order) + 1), drafting, b)
        times = self.step_cost.plain(b) + extra / scale
        best = int(np.argmax(taken_gain / times))
        counts = np.bincount(owner[order[:best]], minlength=b)
        if self._step is not None:
            self._step.tokens_in += best
            self._step.drafting = int(np.count_nonzero(counts))
            drafted = counts[[len(g) > 0 for g in gains]]
            kept = float(np.percentile(drafted, 90)) if len(drafted) else 0.0
            bucket = batch_bucket(b)
            old = self._ask.get(bucket)
            self._ask[bucket] = kept if old is None else 0.7 * old + 0.3 * kept
        return counts.tolist()

    def feedback(self, request_id: str, draft: Draft, accepted: list[int]) -> None:
        """A verified draft and the indices of its nodes that were accepted (the accepted path)."""
        on_path = np.zeros(len(draft))
        on_path[list(accepted)] = 1.0
        self.acceptance.observe(request_id, np.asarray(draft.path_probs(), dtype=np.float64), on_path)

    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None:
        self.acceptance.forget(request_id)
        if prompt_key is not None:
            self._lengths.setdefault(prompt_key, []).append(length)
            del self._lengths[prompt_key][:-64]

    def refresh(self, history) -> None:
        """Length classes from the recorded rollouts (the history's window)."""
        if history is None or not len(history):
            return
        table = history.table().select(["prompt_key", "length"]).to_pydict()
        lengths: dict[str, list[int]] = {}
        for key, n in zip(table["prompt_key"], table["length"]):
            lengths.setdefault(key, []).append(n)
        self._lengths = {k: v[-64:] for k, v in lengths.items()}


def parse_budget(spec: str, cost: CostModel | Callable[[], CostModel] | None = None, max_nodes: int = 16) -> Budget:
    """'off' | 'fixed:K' | 'auto' (needs a cost model, or a function that measures one)."""
    text = str(spec).strip().lower()
    if text == "off":
        return FixedBudget(0)
    if text.startswith("fixed:"):
        value = text.split(":", 1)[1]
        if value.isdigit():
            return FixedBudget(int(value))
    if text == "auto":
        if cost is None:
            raise ValueError("speculation.budget='auto' needs a cost model: build the engine with Engine.from_config")
        return AutoBudget(cost if isinstance(cost, CostModel) else cost(), max_nodes=max_nodes)
    raise ValueError(f"speculation.budget must be 'auto', 'off' or 'fixed:K' with K >= 0, got {spec!r}")
