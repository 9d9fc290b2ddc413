"""What a step costs on this machine: `CostModel`, the curve probed once at start-up (rollout/engine/cost_probe.py;
the vLLM backend's `probe_cost`), and `StepClock`, which fits it to what the run's steps take."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CostModel:
    """t(M, B): seconds for a forward with M new tokens from B sequences, interpolated from a measured grid; and the
    price of a padded row, where drafts of unequal length are padded to the longest, as a fraction of a token's."""

    grid: dict  # B -> [(M, seconds)] sorted by M (also read from `to_json`'s form, which carries "padded")
    padded: dict[int, float] = field(default_factory=dict)  # B -> that fraction (0 where not measured)

    def __post_init__(self):
        grid = dict(self.grid)
        self.padded = {int(b): float(p) for b, p in {**grid.pop("padded", {}), **self.padded}.items()}
        self.grid = {int(b): sorted((int(m), float(t)) for m, t in pts) for b, pts in grid.items()}
        # A lone point is a line through the origin: time in proportion to tokens.
        arrays = {b: np.array(p if len(p) > 1 else [(0, 0.0)] + p, dtype=np.float64).T for b, p in self.grid.items()}
        self._bs, self._arrays = sorted(self.grid), arrays

    def _curve(self, b: int, m: np.ndarray) -> np.ndarray:
        ms, ts = self._arrays[b]  # [P] tokens, [P] seconds (the budget asks several times per step: built once)
        slope = (ts[-1] - ts[-2]) / max(ms[-1] - ms[-2], 1)
        # Below the first point: the first point's time; beyond the last: the last segment's slope.
        return np.where(m > ms[-1], ts[-1] + slope * (m - ms[-1]), np.interp(m, ms, ts))

    def times(self, m: np.ndarray, b: int) -> np.ndarray:
        """t(M, B) for an array of M: between measured batch sizes, interpolated in log B (as `padded_price`)."""
        return self._between(b, lambda x: self._curve(x, m))

    def padded_price(self, b: int) -> float:
        return self._between(b, lambda x: self.padded.get(x, 0.0))

    def _between(self, b: int, at):
        lo = max([x for x in self._bs if x <= b] or self._bs[:1])
        hi = min([x for x in self._bs if x >= b] or self._bs[-1:])
        w = (math.log(b) - math.log(lo)) / (math.log(hi) - math.log(lo)) if hi > lo else 0.0
        return (1 - w) * at(lo) + w * at(hi)

    def __call__(self, m: int, b: int) -> float:
        return float(self.times(np.array([m]), b)[0])

    def to_json(self) -> dict:
        return {**{str(b): pts for b, pts in self.grid.items()}, "padded": {str(b): p for b, p in self.padded.items()}}

    @classmethod
    def from_timings(cls, seconds: dict[tuple[int, int], float]) -> "CostModel":
        """The grid from timed steps: (B sequences, k new tokens each) -> seconds. More tokens never cost less."""
        grid: dict[int, list[tuple[int, float]]] = {}
        for b, k in sorted(seconds):
            grid.setdefault(b, []).append((b * k, max([seconds[(b, k)]] + [t for _, t in grid.get(b, [])])))
        return cls(grid)


def batch_bucket(batch: int) -> int:
    return max(batch, 1).bit_length()  # batch sizes pooled by powers of two: 1, 2-3, 4-7, ...


@dataclass
class StepClock:
    """Seconds of a real step: the probe's plain step x (f + a x the extra tokens' price by the probe, in plain steps),
    per batch bucket by decayed least squares. The probe times an idle machine; a run shares it, at longer contexts.
    One factor on the curve would change no decision (the budget maximises a ratio): f and a are fitted apart."""

    model: CostModel
    decay: float = 0.95  # weight of a step's evidence after each later step of its bucket
    prior: float = 2.0  # steps' worth of evidence behind the prior
    _sums: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # bucket -> (X'X [2, 2], X'y [2])
    _fits: dict[int, tuple[float, float]] = field(default_factory=dict)  # bucket -> (f, a), fitted at each step
    _curves: dict[int, np.ndarray] = field(default_factory=dict)  # B -> [M + 1] t(M, B), M = 0, 1, ... (host cost)

    def fit(self, batch: int) -> tuple[float, float]:
        """(f, a) for a step of `batch` sequences, each within [0.5, 8]; the probe's (1, 1) until steps are seen."""
        return self._fits.get(batch_bucket(batch), (1.0, 1.0))

    def extra(self, tokens, batch: int, rows=None) -> tuple[float, np.ndarray]:
        """The probe's plain step t(B, B), and its price of `tokens` [T] new tokens beyond it, in plain steps [T]; a
        padded row (tokens padded to `rows` [T] attention rows; none by default) at the probe's padded price."""
        tokens = np.atleast_1d(np.asarray(tokens, dtype=np.intp))
        if rows is not None:
            tokens = tokens + np.rint(self.model.padded_price(batch) * np.maximum(rows - tokens, 0)).astype(np.intp)
        curve = self._curves.get(batch)
        if curve is None or len(curve) <= max(tokens.max(initial=0), batch):  # grown by doubling
            size = max(int(tokens.max(initial=0)) + 1, 2 * len(curve) if curve is not None else 2 * batch + 2)
            curve = self._curves[batch] = self.model.times(np.arange(size, dtype=np.float64), batch)
        plain = curve[batch]
        return plain, np.maximum(curve[tokens] - plain, 0.0) / plain

    def seconds(self, tokens, batch: int, rows=None):
        """Seconds of steps of `batch` sequences bringing `tokens` new tokens, padded to `rows` (numbers or arrays)."""
        f, a = self.fit(batch)
        plain, extra = self.extra(tokens, batch, rows)
        out = plain * (f + a * extra)
        return out if np.ndim(tokens) else float(out[0])

    def observe(self, tokens: int, batch: int, seconds: float, rows: int | None = None) -> None:
        """A decoding step of `batch` sequences that brought `tokens` new tokens (padded to `rows`), took `seconds`."""
        plain, extra = self.extra(tokens, batch, rows)
        x, y = np.array([1.0, float(extra[0])]), seconds / plain  # [2] as seconds()
        gram, moment = self._sums.get(bucket := batch_bucket(batch), (np.zeros((2, 2)), np.zeros(2)))
        gram, moment = self._sums[bucket] = (self.decay * gram + np.outer(x, x), self.decay * moment + x * y)
        coef = np.linalg.solve(gram + self.prior * np.eye(2), moment + self.prior)
        self._fits[bucket] = tuple(min(max(c, 0.5), 8.0) for c in coef.tolist())
