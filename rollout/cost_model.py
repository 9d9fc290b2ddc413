"""What a forward costs on this machine: measured once at start-up, corrected by what steps actually take.

`CostModel` is t(M, B), the seconds of a forward with M new tokens from B sequences, interpolated from a grid timed
at start-up (cached per machine and model). The probe times chain-shaped forwards at one context length; a run's
steps differ (tree masks, longer contexts, sampling and bookkeeping around the forward), so `StepCost` corrects it
online from the steps it observes: per batch-size bucket, a factor on the plain step and a factor on the extra
tokens a draft adds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


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


def batch_bucket(batch: int) -> int:
    """Batch sizes are pooled by powers of two: 1, 2-3, 4-7, ..."""
    return max(batch, 1).bit_length()


@dataclass
class StepCost:
    """Seconds of a real step: the cost model's plain step x a measured factor, plus what the draft adds.

    One decayed ridge regression per batch bucket, on every step observed (drafted or not), in units of the
    probe's plain step, learns
    - f: the plain step, as a factor on the probe's (a run's steps sample, and keep books, and run on a machine
      busier or quieter than the probe's);
    - d: what a step pays for drafting at all, as a fraction of a plain step (the split attention call per layer,
      the verification loop over draft depths);
    - a: a factor on the probe's price of the extra tokens (the probe times uniform chains; real steps verify
      trees and sample more rows);
    - c: a cost per sequence that verifies a draft, in plain per-sequence steps (its rows of attention in a split
      call, the copy of its cache slot, its verification bookkeeping). This is why a draft of 8 for one sequence
      is cheaper than drafts of 1 for eight.
    Fitted jointly, so the plain factor stays current while the budget mostly drafts (a stale plain factor would
    show up as a dear draft), with a ridge prior at (f, d, a, c) = (1, 0, 1, 0). A bucket without steps borrows
    the pooled fit.
    """

    model: CostModel
    decay: float = 0.95  # weight of a step's evidence after each later step of its bucket
    prior: float = 2.0  # steps' worth of evidence behind the prior
    _gram: dict[int, np.ndarray] = field(default_factory=dict)  # bucket -> [4, 4] decayed sum of x x^T
    _moment: dict[int, np.ndarray] = field(default_factory=dict)  # bucket -> [4] decayed sum of x y
    # bucket -> its solved fit until the next observation: a step's selection prices its draft several times
    _fits: dict[int, np.ndarray] = field(default_factory=dict)

    PRIOR = np.array([1.0, 0.0, 1.0, 0.0])  # (f, d, a, c)
    LOW = np.array([0.5, 0.0, 0.5, 0.0])  # clipped: a probe and a run differ, but not by 10x
    HIGH = np.array([8.0, 2.0, 8.0, 4.0])

    def fit(self, batch: int) -> np.ndarray:
        """(f, d, a, c) for a step of `batch` sequences; see the class docstring."""
        bucket = batch_bucket(batch)
        if bucket not in self._fits:
            self._fits[bucket] = self._solve(bucket)
        return self._fits[bucket]

    def _solve(self, bucket: int) -> np.ndarray:
        if bucket in self._gram:
            gram, moment = self._gram[bucket], self._moment[bucket]
        elif self._gram:
            gram, moment = sum(self._gram.values()), sum(self._moment.values())
        else:
            return self.PRIOR.copy()
        theta = np.linalg.solve(gram + self.prior * np.eye(4), moment + self.prior * self.PRIOR)
        return np.clip(theta, self.LOW, self.HIGH)

    def plain(self, batch: int) -> float:
        """Seconds of a step of `batch` sequences with one new token each."""
        return self.model(batch, batch) * float(self.fit(batch)[0])

    def unit_prices(self, batch: int, base_tokens: int | None = None) -> tuple[float, float]:
        """(seconds per extra token, seconds per drafting sequence) in a step of `batch` sequences that brings
        `base_tokens` besides its drafts (default: one each): the prices the selection orders nodes by. `extra`
        charges the same prices, with the extra tokens' curve in full."""
        a = self.fit(batch)[2]
        base = batch if base_tokens is None else base_tokens
        per_token = a * max(self.model(base + batch, batch) - self.model(base, batch), 1e-9) / batch
        return per_token, self._per_seq(batch)

    def _per_seq(self, batch: int) -> float:
        """Seconds a sequence adds by drafting at all (its share of attention rows, slot copy, bookkeeping)."""
        return float(self.fit(batch)[3]) * self.model(batch, batch) / batch

    def extra(self, tokens: np.ndarray, drafting: np.ndarray, batch: int) -> np.ndarray:
        """Seconds a draft adds to a plain step of `batch` sequences: `tokens` new tokens in all (>= batch), of
        which the drafts of `drafting` sequences."""
        _, d, a, _ = self.fit(batch)
        plain_model = self.model(batch, batch)
        drafting = np.asarray(drafting, dtype=np.float64)
        extra_tokens = np.maximum(self.model.times(tokens, batch) - plain_model, 0.0)
        return a * extra_tokens + self._per_seq(batch) * drafting + d * plain_model * (drafting > 0)

    def times(self, tokens: np.ndarray, batch: int, drafting: np.ndarray | int = 0) -> np.ndarray:
        """Seconds of steps of `batch` sequences bringing `tokens` new tokens in all, `drafting` of them drafting."""
        return self.plain(batch) + self.extra(tokens, drafting, batch)

    def observe(self, tokens: int, batch: int, seconds: float, drafting: int = 0) -> None:
        """A decoding step (no prompt tokens) of `batch` sequences that brought `tokens` new tokens in all, of
        which the drafts of `drafting` sequences, and took `seconds` (drafting itself excluded)."""
        bucket = batch_bucket(batch)
        plain_model = self.model(batch, batch)
        drafted = tokens > batch
        # Dimensionless: seconds over the probe's plain step, sequences over the batch.
        features = np.array(
            [
                1.0,
                float(drafted),
                (self.model(tokens, batch) - plain_model) / plain_model if drafted else 0.0,
                max(drafting, 1) / batch if drafted else 0.0,
            ]
        )
        self._fits.clear()  # a bucket without steps of its own reads the pooled fit, which this step changes
        gram = self._gram.setdefault(bucket, np.zeros((4, 4)))
        moment = self._moment.setdefault(bucket, np.zeros(4))
        gram *= self.decay
        moment *= self.decay
        gram += np.outer(features, features)
        moment += features * (seconds / plain_model)
