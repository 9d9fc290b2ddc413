"""Matrix products chosen by measurement, so that verifying a few drafted tokens costs little more than one.

What the 2-core EPYC showed for activations x [M, in] and a weight W [out, in] (the 49152x576 lm_head; figures in
benchmarks/results/engine.json, "matmul_timings_ms"):
- `F.linear(x, W)` (MKL) with a few rows takes skinny paths that use one core: 6.8 ms at M=1, 13.5 ms at M=2;
- `W @ x.T` is a GEMM with few columns that streams W once on both cores (2.3 ms at M=2), but at M=1 it falls back
  to a one-core matrix-vector product, so a single row is padded to two;
- oneDNN with the weight reordered once into its blocked layout (the path torch.compile's CPU backend takes) beats
  both almost everywhere: 1.7 ms at M=1, 2.4 ms at M=8, 3.4 ms at M=16, 9 ms at M=64 against MKL's 6.8/5.9/12/24.
So each weight shape gets, per bucket of M, the fastest of these kernels, measured once per machine (timed over all
layers' weights, so caches are as cold as in a real forward) and cached under SPECROLLOUT_CACHE. The oneDNN copies
of the weights are rebuilt whenever the weights change. Every kernel returns a contiguous [M, out].
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _linear(w: torch.Tensor, x: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w)


def _columns(w: torch.Tensor, x: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    return (w @ x.T).T.contiguous()


def _columns_pad2(w: torch.Tensor, x: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    if x.shape[0] != 1:
        return _columns(w, x, packed)
    return (w @ x.expand(2, -1).contiguous().T)[:, :1].T.contiguous()


def _onednn(w: torch.Tensor, x: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")


KERNELS: dict[str, Kernel] = {
    "linear": _linear,
    "columns": _columns,
    "columns_pad2": _columns_pad2,
    "onednn": _onednn,
}

# Row counts at which kernels are compared; a product with M rows uses the decision of the smallest bucket >= M.
M_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PACK_HINT = 64  # the batch size oneDNN is told to expect when reordering; one layout serves all M well


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


def onednn_pack(w: torch.Tensor) -> torch.Tensor | None:
    """The weight reordered for oneDNN, or None where this torch/CPU cannot do it."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT)
        probe = torch.zeros(1, w.shape[1], dtype=w.dtype)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [None], "")
        return packed
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


MATMUL_MODES = {
    # Fastest measured kernel per shape and row count. Logits stay within fp32 rounding of transformers', but
    # oneDNN sums in another order than MKL: max |logit difference| ~1.5e-4 on SmolLM2, against ~0.8e-4 between
    # transformers' own fp32 forward and an fp64 one (tests/test_model_parity.py).
    "fast": ("linear", "columns", "columns_pad2", "onednn"),
    # MKL only, as transformers uses on CPU: logits within 1e-4 of transformers', at ~1.8x the cost per step.
    "mkl": ("linear", "columns", "columns_pad2"),
}


class MatmulPlan:
    """Per (weight shape, M bucket): the fastest allowed kernel.

    Untuned shapes use `columns` below 16 rows, else `linear`; on a GPU every product is `linear`."""

    def __init__(self, device: torch.device, cache_file: Path | None = None, mode: str = "fast"):
        if mode not in MATMUL_MODES:
            raise ValueError(f"engine.matmul must be one of {sorted(MATMUL_MODES)}, got {mode!r}")
        self.device = device
        self.cache_file = cache_file
        self.mode = mode
        self.allowed = MATMUL_MODES[mode]
        self.timings: dict[str, dict[int, dict[str, float]]] = {}  # shape key -> M bucket -> kernel -> ms
        self.choice: dict[str, dict[int, str]] = {}
        self._packed: dict[int, torch.Tensor] = {}  # weight data_ptr -> oneDNN layout
        if cache_file is not None and cache_file.exists():
            saved = json.loads(cache_file.read_text())
            self.timings = {k: {int(m): t for m, t in v.items()} for k, v in saved.get("timings", {}).items()}
            self._choose()

    @staticmethod
    def _key(w: torch.Tensor) -> str:
        return f"{w.shape[0]}x{w.shape[1]}:{str(w.dtype).removeprefix('torch.')}"

    def _choose(self) -> None:
        self.choice = {}
        for key, per_m in self.timings.items():
            choice = {}
            for m, times in per_m.items():
                allowed = {n: t for n, t in times.items() if n in self.allowed}
                choice[m] = min(allowed, key=allowed.get)
            self.choice[key] = choice

    def uses_onednn(self) -> bool:
        return any(n == "onednn" for per_m in self.choice.values() for n in per_m.values())

    def pack(self, weights: list[torch.Tensor]) -> None:
        """(Re)build the oneDNN copies; call after the weights change."""
        if self.device.type != "cpu" or "onednn" not in self.allowed:
            return
        for w in weights:
            packed = onednn_pack(w)
            if packed is not None:
                self._packed[w.data_ptr()] = packed

    def tune(self, weights: list[list[torch.Tensor]]) -> None:
        """Time each kernel on each group of same-shaped weights (e.g. one projection of every layer).

        Running through the whole group matters: a lone 3.5 MB matrix stays in cache and makes the one-core
        matrix-vector path look fine, while in a real forward every layer's weights come from memory. Timings
        of every kernel are cached, so switching modes needs no new measurement.
        """
        if self.device.type != "cpu":
            return  # GPU GEMMs have no skinny-matrix cliff worth a start-up measurement
        changed = False
        for group in weights:
            key = self._key(group[0])
            packed = [self._packed[w.data_ptr()] if w.data_ptr() in self._packed else onednn_pack(w) for w in group]
            names = ["linear", "columns"] + (["onednn"] if all(p is not None for p in packed) else [])
            known = self.timings.get(key)
            if known is not None and all(n in known[M_BUCKETS[0]] for n in names):
                continue
            times: dict[int, dict[str, float]] = {}
            for m in M_BUCKETS:
                x = torch.randn(m, group[0].shape[1], dtype=group[0].dtype)
                candidates = names + (["columns_pad2"] if m == 1 else [])
                times[m] = {
                    n: round(_time_ms(lambda n=n: [KERNELS[n](w, x, p) for w, p in zip(group, packed)]) / len(group), 4)
                    for n in candidates
                }
            self.timings[key] = times
            changed = True
        self._choose()
        if changed and self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"timings": self.timings}, indent=1))
            tmp.replace(self.cache_file)

    def kernel_for(self, w: torch.Tensor, m: int) -> str:
        if self.device.type != "cpu":
            # The skinny-product cliffs above are MKL's on CPU; on a GPU, F.linear is the cuBLAS call transformers
            # makes too, and `columns` would only add a transposed copy.
            return "linear"
        per_m = self.choice.get(self._key(w))
        if per_m is None:
            return "columns" if m < 16 else "linear"
        name = per_m[_bucket(m)]
        if name == "onednn" and w.data_ptr() not in self._packed:
            return "columns" if m < 16 else "linear"  # weights not packed (model loaded without tuning)
        return name

    def mm(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ w[out, in].T -> contiguous [M, out]."""
        return KERNELS[self.kernel_for(w, x.shape[0])](w, x, self._packed.get(w.data_ptr()))
