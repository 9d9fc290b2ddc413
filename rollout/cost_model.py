"""What a step costs on this machine: `CostModel`, the curve probed once at start-up (rollout/engine/cost_probe.py;
the vLLM backend's `probe_cost`), and `StepClock`, which fits it to what the run's steps take."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CostModel:
    """t(M, B): seconds for a forward with M new tokens from B sequences, interpolated from a measured grid."""

    grid: dict[int, list[tuple[int, float]]]  # B -> [(M, seconds)] sorted by M

    def __post_init__(self):
        self.grid = {int(b): sorted((int(m), float(t)) for m, t in pts) for b, pts in self.grid.items()}
        self._bs, self._arrays = sorted(self.grid), {b: np.array(p, dtype=np.float64).T for b, p in self.grid.items()}

    def _curve(self, b: int, m: np.ndarray) -> np.ndarray:
        ms, ts = self._arrays[b]  # [P] tokens, [P] seconds (the budget asks several times per step: built once)
        if len(ms) == 1:
            return ts[0] * np.maximum(m, 1) / max(ms[0], 1)
        slope = (ts[-1] - ts[-2]) / max(ms[-1] - ms[-2], 1)
        # Below the first point: the first point's time; beyond the last: the last segment's slope.
        return np.where(m > ms[-1], ts[-1] + slope * (m - ms[-1]), np.interp(m, ms, ts))

    def times(self, m: np.ndarray, b: int) -> np.ndarray:
        """t(M, B) for an array of M: between measured batch sizes, interpolated in log B."""
        lo = max([x for x in self._bs if x <= b] or self._bs[:1])
        hi = min([x for x in self._bs if x >= b] or self._bs[-1:])
        w = (math.log(b) - math.log(lo)) / (math.log(hi) - math.log(lo)) if hi > lo else 0.0
        return (1 - w) * self._curve(lo, m) + w * self._curve(hi, m)

    def __call__(self, m: int, b: int) -> float:
        return float(self.times(np.array([m]), b)[0])

    def to_json(self) -> dict:
        return {str(b): pts for b, pts in self.grid.items()}

    @classmethod
    def from_json(cls, data: dict) -> "CostModel":
        return cls({int(b): [tuple(p) for p in pts] for b, pts in data.items()})

    @classmethod
    def from_timings(cls, seconds: dict[tuple[int, int], float]) -> "CostModel":
        """The grid from timed steps: (B sequences, k new tokens each) -> seconds. More tokens never cost less."""
        grid: dict[int, list[tuple[int, float]]] = {}
        for b, k in sorted(seconds):
            running = max([seconds[(b, k)]] + [t for _, t in grid.get(b, [])])
            grid.setdefault(b, []).append((b * k, running))
        return cls(grid)


def batch_bucket(batch: int) -> int:
    """Batch sizes are pooled by powers of two: 1, 2-3, 4-7, ..."""
    return max(batch, 1).bit_length()


@dataclass
class StepClock:
    """Seconds of a real step: the probe's plain step x (f + a x the extra tokens' price by the probe, in plain steps
    + g x the share of sequences drafted when drafts differ in length), per batch bucket by decayed least squares.

    The probe times equal chains on an idle machine; a run's steps verify other shapes and share the machine. One
    factor on the curve would change no decision (the budget maximises a ratio), so f and a are fitted apart. g prices
    unequal lengths: the embedded engine then splits attention and copies drafted sequences' caches (batch 64: 212
    tokens cost what 256 do in equal chains); vLLM's varlen attention leaves it at its prior, 0."""

    model: CostModel
    decay: float = 0.95  # weight of a step's evidence after each later step of its bucket
    prior: float = 2.0  # steps' worth of evidence behind the prior
    _sums: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # bucket -> (X'X [3, 3], X'y [3])

    def fit(self, batch: int) -> np.ndarray:
        """[3] (f, a, g) for a step of `batch` sequences, f and a within [0.5, 8], g within [0, 8]."""
        gram, moment = self._sums.get(batch_bucket(batch), (np.zeros((3, 3)), np.zeros(3)))
        coef = np.linalg.solve(gram + self.prior * np.eye(3), moment + self.prior * np.array([1.0, 1.0, 0.0]))
        return np.clip(coef, [0.5, 0.5, 0.0], 8.0)

    def features(self, tokens, batch: int, ragged=0.0) -> np.ndarray:
        """[3, T] a step's features in units of the probe's plain step; `ragged`: sequences drafted unequally."""
        plain = self.model(batch, batch)
        curve = self.model.times(np.atleast_1d(np.asarray(tokens, dtype=np.float64)), batch)
        extra, share = np.maximum(curve - plain, 0.0) / plain, np.broadcast_to(np.asarray(ragged) / batch, curve.shape)
        return np.stack([np.ones_like(curve), extra, share])

    def seconds(self, tokens, batch: int, ragged=0.0):
        """Seconds of steps of `batch` sequences bringing `tokens` new tokens in all (numbers or arrays)."""
        out = self.model(batch, batch) * (self.fit(batch) @ self.features(tokens, batch, ragged))
        return out if np.ndim(tokens) else float(out[0])

    def observe(self, tokens: int, batch: int, seconds: float, ragged: int = 0) -> None:
        """A decoding step of `batch` sequences that brought `tokens` new tokens and took `seconds`."""
        x, y = self.features(tokens, batch, ragged)[:, 0], seconds / self.model(batch, batch)
        gram, moment = self._sums.get(batch_bucket(batch), (np.zeros((3, 3)), np.zeros(3)))
        self._sums[batch_bucket(batch)] = (self.decay * gram + np.outer(x, x), self.decay * moment + x * y)
