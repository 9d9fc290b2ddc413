"""Matrix products chosen by measurement, so that verifying a few drafted tokens costs little more than one.

What the 2-core EPYC showed (benchmarks/results/engine.json, "matmul"): for activations x [M, in] and a weight
W [out, in],
- `F.linear(x, W)` with a few rows takes MKL's skinny paths: one core, and for M=2 the 49152x576 lm_head costs
  13.5 ms against 6.8 ms for M=1;
- `W @ x.T` is a GEMM with few columns that streams W once on both cores: 2.3 ms at M=2 and 2.8 ms at M=4;
- with M=1 it falls back to a one-core matrix-vector product (6.8 ms), so a single row is padded to two (2.3 ms);
- from M of about 16 up, `F.linear` and `W @ x.T` trade places depending on the matrix.
So each weight shape gets, per bucket of M, the fastest of these kernels, measured once per machine and cached
under SPECROLLOUT_CACHE. Every kernel returns a contiguous [M, out]; activations stay token-major.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _linear(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _columns(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (w @ x.T).T.contiguous()


def _columns_pad2(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    m = x.shape[0]
    if m != 1:
        return _columns(w, x)
    return (w @ x.expand(2, -1).contiguous().T)[:, :1].T.contiguous()


KERNELS: dict[str, Kernel] = {"linear": _linear, "columns": _columns, "columns_pad2": _columns_pad2}

# Row counts at which kernels are compared; a product with M rows uses the decision of the smallest bucket >= M.
M_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def _time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


class MatmulPlan:
    """Per (weight shape, M bucket): the kernel to use. Untuned shapes use `columns` below 16 rows, else `linear`."""

    def __init__(self, device: torch.device, cache_file: Path | None = None):
        self.device = device
        self.cache_file = cache_file
        self.choice: dict[str, dict[int, str]] = {}
        self.timings: dict[str, dict[int, dict[str, float]]] = {}
        if cache_file is not None and cache_file.exists():
            saved = json.loads(cache_file.read_text())
            self.choice = {k: {int(m): n for m, n in v.items()} for k, v in saved["choice"].items()}
            self.timings = {k: {int(m): t for m, t in v.items()} for k, v in saved.get("timings", {}).items()}

    @staticmethod
    def _key(w: torch.Tensor) -> str:
        return f"{w.shape[0]}x{w.shape[1]}:{str(w.dtype).removeprefix('torch.')}"

    def tune(self, weights: list[list[torch.Tensor]]) -> None:
        """Time each kernel on each group of same-shaped weights (e.g. one projection of every layer).

        Running through the whole group matters: a lone 3.5 MB matrix stays in cache and makes the one-core
        matrix-vector path look fine, while in a real forward every layer's weights come from memory.
        """
        if self.device.type != "cpu":
            return  # GPU GEMMs have no skinny-matrix cliff worth a start-up measurement
        changed = False
        for group in weights:
            key = self._key(group[0])
            if key in self.choice:
                continue
            per_m: dict[int, str] = {}
            times: dict[int, dict[str, float]] = {}
            for m in M_BUCKETS:
                x = torch.randn(m, group[0].shape[1], dtype=group[0].dtype)
                names = ["linear", "columns"] + (["columns_pad2"] if m == 1 else [])
                times[m] = {
                    n: round(_time_ms(lambda n=n: [KERNELS[n](w, x) for w in group]) / len(group), 4) for n in names
                }
                per_m[m] = min(times[m], key=times[m].get)
            self.choice[key] = per_m
            self.timings[key] = times
            changed = True
        if changed and self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"choice": self.choice, "timings": self.timings}, indent=1))
            tmp.replace(self.cache_file)

    def kernel_for(self, w: torch.Tensor, m: int) -> str:
        per_m = self.choice.get(self._key(w))
        if per_m is None:
            return "columns" if m < 16 else "linear"
        return per_m[_bucket(m)]

    def mm(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ w[out, in].T -> contiguous [M, out]."""
        return KERNELS[self.kernel_for(w, x.shape[0])](w, x)
