"""How many drafted tokens each running sequence verifies, step by step.

Modes: `auto` (default) chooses per step from a measured cost model and per-sequence acceptance estimates;
`fixed:K` verifies up to K nodes of every draft; `off` verifies none (plain decoding through the same engine).

`auto`, in one step:
- the cost model gives t(M, B), the time of a forward with M new tokens from B sequences, measured on this machine
  for this model at start-up (cached under SPECROLLOUT_CACHE/cost/);
- each draft node's chance of acceptance is the drafter's path probability (best-first trees list nodes in falling
  path probability), scaled by how this sequence's drafts have fared so far: a running ratio of accepted to
  predicted tokens, shrunk towards the ratio over all sequences;
- each sequence's tokens are weighted by its length class: the expected number of tokens it still has to go, from
  the lengths recorded for its prompt, relative to the other running sequences. The longest rollouts set the
  makespan, so their tokens are worth more;
- nodes are taken in order of weighted gain, and the prefix that maximises (weighted expected tokens emitted) /
  t(M, B) is kept. Where verifying costs more than it brings, nothing is drafted;
- whether to draft at all at a batch size (drafting itself takes time the cost model does not see) is measured:
  see max_draft().
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from drafters.base import Draft


@dataclass
class BudgetItem:
    """What the budget knows about one sequence in a forward."""

    request_id: str
    draft: Draft
    pending: int  # tokens the sequence feeds besides the draft (1 when decoding, the prompt when prefilling)
    prompt_key: str | None = None
    generated: int = 0


class Budget(Protocol):
    def select(self, items: list[BudgetItem]) -> list[int]:
        """Nodes of each draft to verify (a prefix of the draft's node list)."""
        ...

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        """How many nodes to ask a drafter for, per sequence, in a step of `batch` sequences (0: do not draft)."""
        ...

    def feedback(self, request_id: str, predicted: float, accepted: int) -> None: ...

    def observe_step(self, seconds: float, tokens: int) -> None: ...

    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None: ...

    def refresh(self, history) -> None: ...


class _NoFeedback:
    def feedback(self, request_id: str, predicted: float, accepted: int) -> None:
        pass

    def observe_step(self, seconds: float, tokens: int) -> None:
        pass

    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None:
        pass

    def refresh(self, history) -> None:
        pass


@dataclass
class FixedBudget(_NoFeedback):
    k: int

    def select(self, items: list[BudgetItem]) -> list[int]:
        return [min(self.k, len(it.draft)) for it in items]

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        return self.k


# ---------------------------------------------------------------------------------------------- cost model


@dataclass
class CostModel:
    """t(M, B): seconds for a forward with M new tokens from B sequences, interpolated from a measured grid."""

    grid: dict[int, list[tuple[int, float]]]  # B -> [(M, seconds)] sorted by M

    def __post_init__(self):
        self.grid = {int(b): sorted((int(m), float(t)) for m, t in pts) for b, pts in self.grid.items()}
        self._bs = sorted(self.grid)

    def _curve(self, b: int, m: np.ndarray) -> np.ndarray:
        pts = self.grid[b]
        ms = np.array([p[0] for p in pts], dtype=np.float64)
        ts = np.array([p[1] for p in pts], dtype=np.float64)
        m = np.asarray(m, dtype=np.float64)
        if len(pts) == 1:
            return ts[0] * np.maximum(m, 1) / max(ms[0], 1)
        slope = (ts[-1] - ts[-2]) / max(ms[-1] - ms[-2], 1)
        # Below the first point: the first point's time; beyond the last: the last segment's slope.
        return np.where(m > ms[-1], ts[-1] + slope * (m - ms[-1]), np.interp(m, ms, ts))

    def times(self, m: np.ndarray, b: int) -> np.ndarray:
        """t(M, B) for many M at once."""
        bs = self._bs
        if b <= bs[0]:
            return self._curve(bs[0], m)
        if b >= bs[-1]:
            return self._curve(bs[-1], m)
        hi = next(x for x in bs if x >= b)
        lo = max(x for x in bs if x <= b)
        if hi == lo:
            return self._curve(lo, m)
        w = (math.log(b) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (1 - w) * self._curve(lo, m) + w * self._curve(hi, m)

    def __call__(self, m: int, b: int) -> float:
        return float(self.times(np.array([m]), b)[0])

    @classmethod
    def from_function(cls, fn: Callable[[int, int], float], batches=(1, 4, 16, 64), ks=(1, 2, 4, 8, 16)) -> "CostModel":
        return cls({b: [(b * k, fn(b * k, b)) for k in ks] for b in batches})

    def to_json(self) -> dict:
        return {str(b): pts for b, pts in self.grid.items()}

    @classmethod
    def from_json(cls, data: dict) -> "CostModel":
        return cls({int(b): [tuple(p) for p in pts] for b, pts in data.items()})


def measure_cost_model(
    model, max_batch: int, cache_file: Path | None = None, context: int = 128, log: Callable[[str], None] = print
) -> CostModel:
    """Time forwards on this machine: B sequences with a `context`-token cache, each bringing k new tokens."""
    if cache_file is not None and cache_file.exists():
        return CostModel.from_json(json.loads(cache_file.read_text()))
    log("measuring the step cost model on this machine (once; cached)")
    from rollout.engine.batch import SeqInput, build_batch
    from rollout.engine.hardware import synchronize

    batches = [b for b in (1, 4, 16, 64, 256) if b <= max_batch] or [1]
    ks = (1, 2, 4, 8, 16)
    # A short max_model_len must still hold the probe's context plus its largest draft.
    context = max(1, min(context, model.max_model_len - max(ks) - 1))
    ks = tuple(k for k in ks if context + k <= model.max_model_len) or (1,)
    cache = model.new_cache(max(batches))
    filler = [1] * context
    model.forward(build_batch([SeqInput(0, filler, None, context - 1)] * max(batches), 0, model.device), cache)
    shapes = [(b, k) for b in batches for k in ks if b * k <= 2048]
    forwards = {(b, k): build_batch([SeqInput(context, filler[:k], None, 0)] * b, 0, model.device) for b, k in shapes}
    best = {shape: float("inf") for shape in shapes}
    # Rounds over the whole grid, keeping each point's fastest: a burst of load elsewhere on the machine then
    # spoils one round of a point, not the point.
    for _ in range(3):
        for shape in shapes:
            synchronize(model.device)
            t0 = time.perf_counter()
            model.forward(forwards[shape], cache)
            synchronize(model.device)  # a GPU forward returns at launch; time its work
            best[shape] = min(best[shape], time.perf_counter() - t0)
    grid: dict[int, list[tuple[int, float]]] = {}
    for b in batches:
        running = 0.0
        for k in ks:
            if (b, k) in best:
                running = max(running, best[(b, k)])  # more tokens never cost less
                grid.setdefault(b, []).append((b * k, running))
    cost = CostModel(grid)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cost.to_json(), indent=1))
    return cost


# ---------------------------------------------------------------------------------------------- auto


@dataclass
class AutoBudget:
    cost: CostModel
    max_nodes: int = 16  # per sequence and step
    shrink: float = 4.0  # predicted tokens of evidence before a sequence's own ratio outweighs the global one
    length_aware: bool = True
    default_length: float = 256.0  # expected length of a rollout whose prompt has no recorded lengths
    _pred: dict[str, float] = field(default_factory=dict)
    _acc: dict[str, float] = field(default_factory=dict)
    _global_pred: float = 1.0
    _global_acc: float = 0.5  # drafters are overconfident until shown otherwise
    _lengths: dict[str, list[int]] = field(default_factory=dict)
    # Whether drafting pays at all at a batch size is settled by measurement: per batch-size bucket (powers of two;
    # prefill steps apart), the running tokens-per-second of steps that drafted and of steps that did not. The
    # better arm is played; the other again at the bucket's 2^k-th play, so a losing arm costs O(log steps).
    # Drafting time is inside these figures, which the cost model alone cannot see.
    _arms: dict[tuple[bool, int], dict[bool, list[float]]] = field(default_factory=dict)  # arm -> [ema, count]
    _plays: dict[tuple[bool, int], int] = field(default_factory=dict)
    _arm: tuple[tuple[bool, int], bool] | None = None
    # Seconds per sequence a step spends outside the forward the cost model times (processing logits, sampling,
    # bookkeeping), learnt from steps without drafts. It is paid whatever is drafted, so it makes drafting cheaper
    # in relative terms: it belongs in the denominator.
    per_seq: float = 0.0
    _plain_steps: int = 0
    _plain_batch: int = 0

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        bucket = (prefill, max(batch, 1).bit_length())
        arms = self._arms.setdefault(bucket, {True: [0.0, 0], False: [0.0, 0]})
        plays = self._plays[bucket] = self._plays.get(bucket, 0) + 1
        if arms[True][1] < 2 or arms[False][1] < 2:
            # Try both arms before judging; a prefill starts plain (drafts beside a long prompt are a gamble the
            # first measurement should not take on the whole batch).
            draft = arms[True][1] < arms[False][1] or (arms[True][1] == arms[False][1] and not prefill)
        else:
            best = arms[True][0] >= arms[False][0]
            draft = (not best) if plays & (plays - 1) == 0 else best
        self._arm = (bucket, draft)
        return self.max_nodes if draft else 0

    def observe_step(self, seconds: float, tokens: int) -> None:
        """A step's duration and tokens: update the throughput of the arm (drafting or not) it played, and from
        plain steps the per-sequence time a step spends outside the forward (sampling, bookkeeping)."""
        if self._plain_batch and seconds > 0:
            b = self._plain_batch
            overhead = max(0.0, seconds - float(self.cost.times(np.array([b]), b)[0])) / b
            self.per_seq = overhead if self._plain_steps == 0 else 0.9 * self.per_seq + 0.1 * overhead
            self._plain_steps += 1
        self._plain_batch = 0
        if self._arm is not None and seconds > 0:
            bucket, draft = self._arm
            ema, count = self._arms[bucket][draft]
            rate = tokens / seconds
            self._arms[bucket][draft] = [rate if count == 0 else 0.7 * ema + 0.3 * rate, count + 1]
            self._arm = None

    def _ratio(self, rid: str) -> float:
        glob = self._global_acc / self._global_pred
        return (self._acc.get(rid, 0.0) + self.shrink * glob) / (self._pred.get(rid, 0.0) + self.shrink)

    def _expected_remaining(self, it: BudgetItem) -> float:
        lengths = self._lengths.get(it.prompt_key or "", [])
        total = float(np.mean(lengths)) if lengths else self.default_length
        # Beyond the recorded mean, a sequence is in the tail: expect it to run about as long again as it has.
        return max(total - it.generated, 0.5 * max(it.generated, 1.0), 1.0)

    def node_probs(self, it: BudgetItem) -> np.ndarray:
        """Calibrated path probabilities of the draft's nodes, in draft order (non-increasing for best-first)."""
        if not len(it.draft):
            return np.zeros(0)
        return np.clip(np.asarray(it.draft.path_probs()) * self._ratio(it.request_id), 0.0, 1.0)

    def select(self, items: list[BudgetItem]) -> list[int]:
        if not items:
            return []
        b = len(items)
        if all(it.pending == 1 for it in items) and not any(len(it.draft) for it in items):
            self._plain_batch = b
        base_tokens = sum(it.pending for it in items)
        if self.length_aware:
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
        # Keep each draft's own order (a prefix per sequence), then merge by gain: sort by (gain desc) but never
        # put a node before an earlier node of the same draft, by taking the running minimum along each draft.
        position = np.concatenate([np.arange(len(g)) for g in gains])
        capped = np.concatenate([np.minimum.accumulate(g) if len(g) else g for g in gains])
        order = np.lexsort((position, -capped))
        base = float(weights.sum())  # every sequence emits one token per step whatever is drafted
        taken_gain = base + np.concatenate([[0.0], np.cumsum(capped[order])])
        times = self.cost.times(base_tokens + np.arange(len(order) + 1), b) + self.per_seq * b
        best = int(np.argmax(taken_gain / times))
        counts = np.bincount(owner[order[:best]], minlength=b)
        return counts.tolist()

    def feedback(self, request_id: str, predicted: float, accepted: int) -> None:
        self._pred[request_id] = self._pred.get(request_id, 0.0) + predicted
        self._acc[request_id] = self._acc.get(request_id, 0.0) + accepted
        self._global_pred += predicted
        self._global_acc += accepted

    def finished(self, request_id: str, prompt_key: str | None, length: int) -> None:
        self._pred.pop(request_id, None)
        self._acc.pop(request_id, None)
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
