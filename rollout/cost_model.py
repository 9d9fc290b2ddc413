"""What a step costs on this machine: a curve probed once at start-up, fitted to what the run's steps take.

`CostModel` is t(M, B), the seconds of a forward with M new tokens from B sequences, interpolated from the probe's
grid (rollout/engine/cost_probe.py; the vLLM backend's `probe_cost`). `StepClock` corrects it online.
"""

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
        """t(M, B) for many M at once: between measured batch sizes, interpolated in log B."""
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
    """Seconds of a real step: f x (the probe's plain step) + a x (what the probe says the extra tokens add).

    The probe times uniform chains at one context length on an idle machine; a run's steps verify trees at other
    contexts, sample, keep books and share the machine. A factor on the whole curve would not change any decision
    (the budget maximises tokens per second), so per batch bucket (f, a) are fitted separately: by least squares,
    decayed, on every decoding step observed, in units of the probe's plain step, with a prior of (1, 1).
    """

    model: CostModel
    decay: float = 0.95  # weight of a step's evidence after each later step of its bucket
    prior: float = 2.0  # steps' worth of evidence behind the prior
    _sums: dict[int, np.ndarray] = field(default_factory=dict)  # bucket -> [x0 x0, x0 x1, x1 x1, x0 y, x1 y]
    PRIOR = np.array([1.0, 0.0, 1.0, 1.0, 1.0])  # (f, a) = (1, 1), as those sums

    def fit(self, batch: int) -> tuple[float, float]:
        """(f, a) for a step of `batch` sequences, each within [0.5, 8] (a probe and a run differ, not by 10x)."""
        g00, g01, g11, m0, m1 = self._sums.get(batch_bucket(batch), np.zeros(5)) + self.prior * self.PRIOR
        f, a = np.linalg.solve([[g00, g01], [g01, g11]], [m0, m1])
        return float(np.clip(f, 0.5, 8.0)), float(np.clip(a, 0.5, 8.0))

    def seconds(self, tokens, batch: int):
        """Seconds of steps of `batch` sequences bringing `tokens` new tokens in all (a number or an array)."""
        f, a = self.fit(batch)
        plain = self.model(batch, batch)
        curve = self.model.times(np.atleast_1d(np.asarray(tokens, dtype=np.float64)), batch)
        out = f * plain + a * np.maximum(curve - plain, 0.0)
        return out if np.ndim(tokens) else float(out[0])

    def observe(self, tokens: int, batch: int, seconds: float) -> None:
        """A decoding step of `batch` sequences that brought `tokens` new tokens and took `seconds`."""
        plain = self.model(batch, batch)
        extra = max(self.model(tokens, batch) - plain, 0.0) / plain
        y = seconds / plain
        sums = self._sums.setdefault(batch_bucket(batch), np.zeros(5))
        sums *= self.decay
        sums += np.array([1.0, extra, extra * extra, y, extra * y])
