"""Matrix products chosen by measurement, so that verifying a few drafted tokens costs little more than one.

What the 2-core EPYC showed for activations x [M, in] and a weight W [out, in] (the 49152x576 lm_head; figures in
benchmarks/results/engine.json, "matmul_timings_ms"):
- `F.linear(x, W)` (MKL) with a few rows takes skinny paths that use one core: 6.8 ms at M=1, 13.5 ms at M=2;
- `W @ x.T` is a GEMM with few columns that streams W once on both cores (2.3 ms at M=2), but at M=1 it falls back
  to a one-core matrix-vector product, so a single row is padded to two;
- oneDNN with the weight reordered once into its blocked layout (the path torch.compile's CPU backend takes) beats
  both almost everywhere: 1.7 ms at M=1, 2.4 ms at M=8, 3.4 ms at M=16, 9 ms at M=64 against MKL's 6.8/5.9/12/24.
So each weight shape gets, per bucket of M, the fastest of these kernels (decided as below), measured once per
machine (timed over all layers' weights, so caches are as cold as in a real forward) and cached under
SPECROLLOUT_CACHE. The oneDNN copies of the weights are rebuilt whenever the weights change. Every kernel returns a
contiguous [M, out].

Measuring on a busy machine. The plan is measured at engine start and kept, so one measurement taken beside another
job must not decide it: timed one kernel after the other, a 96-row lm_head once read 2248 / 111 / 1425 ms (linear /
columns / onednn; ~34 / 50 / 12 ms on an idle machine) and `columns` was kept for good. So:
- Kernels are timed in interleaved rounds (after one discarded warm-up call each): every round times each candidate
  once, in an order rotated from round to round, so that a burst of load falls on all candidates alike rather than on
  whichever happened to be measured then. Each candidate keeps its minimum over the rounds (load only ever adds time),
  and its spread: how far its second-best time lies above its best, a measure of how loaded its samples were.
- The timings are checked against a rule per shape class, the one the measurements above support: `onednn` wherever
  the weight can be reordered for it; else (matmul="mkl") `columns_pad2` at one row, `columns` below 16 rows and
  `linear` from 16. Another kernel replaces the rule's only if it is faster by more than RULE_MARGIN (10%): a smaller
  win is within what load or the next run changes, and the rule then keeps the plan, and with it the order in which
  logits are summed, the same from machine to machine.
- A decision is settled when it still stands with any single rival's time lowered by its own spread (its best divided
  by 1 + spread). In an unsettled bucket the kernels in doubt (the pick and the rivals that could change it) are timed
  again, EXTRA_ROUNDS more interleaved rounds at a time and at most MAX_RETRIES times; if it is still unsettled the
  rule's kernel is used, and the bucket is marked so that the next start measures it again. A settled bucket costs
  what a measurement cost before (one warm-up and three timed calls per kernel); tuning SmolLM2 on the 2-core
  machine at a load average of about 4, 16 of its 80 buckets needed more rounds (of two or three kernels).
- Processes sharing the cache measure one at a time (a lock file beside the plan; Ray workers starting together on
  one node would otherwise time each other), and a process that waited reads what the first one measured.
Plans from an older rule carry another CACHE_VERSION and are measured again. The decision is `decide`, a function of
the stored bests and spreads; the timing behind it can be replaced (`MatmulPlan.tune(..., sample=...)`), which is how
tests/test_matmul.py checks the decisions without a clock.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: processes sharing the cache may then measure at the same time
    fcntl = None

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


def _time_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call, in ms."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# How a bucket is measured and decided (see the module docstring).
ROUNDS = 3  # interleaved rounds of a first measurement, after one warm-up call per kernel
EXTRA_ROUNDS = 3  # rounds added each time a decision is unsettled
MAX_RETRIES = 2  # at most ROUNDS + MAX_RETRIES * EXTRA_ROUNDS rounds per bucket
RULE_MARGIN = 0.10  # a kernel replaces the rule's only when faster than it by more than this fraction
CACHE_VERSION = 2  # 1 (no version field): each kernel timed alone, best of 3, fastest kept without checks

Sampler = Callable[[str], float]  # kernel name -> ms of one call (one product per weight of the group)


def rule_kernel(m: int, names: Iterable[str]) -> str:
    """The kernel the measurements in the module docstring expect to be fastest for M rows, among `names`."""
    names = set(names)
    if "onednn" in names:
        return "onednn"
    if m == 1 and "columns_pad2" in names:
        return "columns_pad2"
    if m < 16 and "columns" in names:
        return "columns"
    return "linear" if "linear" in names else min(names)


def _pick(best: dict[str, float], m: int) -> str:
    rule = rule_kernel(m, best)
    winner = min(best, key=best.get)
    return winner if best[rule] > best[winner] * (1 + RULE_MARGIN) else rule


def _doubts(best: dict[str, float], spread: dict[str, float], m: int) -> tuple[str, set[str]]:
    """The pick, and the kernels that put it in doubt: a rival whose time lowered to best / (1 + spread) would change
    the pick, the pick itself and what it would change to (empty when the pick stands)."""
    pick = _pick(best, m)
    doubts: set[str] = set()
    for rival in best:
        if rival != pick:
            other = _pick({**best, rival: best[rival] / (1 + spread.get(rival, 0.0))}, m)
            if other != pick:
                doubts |= {pick, rival, other}
    return pick, doubts


def decide(best: dict[str, float], spread: dict[str, float], m: int) -> tuple[str, bool]:
    """The kernel for M rows given each candidate's best time (ms) and spread, and whether the timings settle it.

    The rule's kernel, unless another is faster by more than RULE_MARGIN. Settled when that pick still stands with
    any one rival's time lowered to best / (1 + spread); an unsettled decision falls back to the rule's kernel."""
    pick, doubts = _doubts(best, spread, m)
    return (pick, True) if not doubts else (rule_kernel(m, best), False)


def _spread(samples: list[float]) -> float:
    """How far the second-best sample lies above the best one, relative to the best."""
    if len(samples) < 2:
        return 0.0
    lo, second = sorted(samples)[:2]
    return (second - lo) / lo if lo > 0 else 0.0


def _doubts_in_any_mode(best: dict[str, float], spread: dict[str, float], m: int) -> set[str]:
    doubts: set[str] = set()
    for allowed in MATMUL_MODES.values():
        subset = {n: t for n, t in best.items() if n in allowed}
        if subset:
            doubts |= _doubts(subset, spread, m)[1]
    return doubts


def measure_bucket(
    candidates: list[str], sample: Sampler, m: int
) -> tuple[dict[str, float], dict[str, float], int, bool]:
    """Time the candidates for M rows in interleaved rounds until every mode's decision is settled (or retries run
    out); further rounds time only the kernels in doubt. Returns each candidate's best ms and spread (rounded as
    they are stored), the rounds run, and whether every mode's decision is settled."""
    for name in candidates:
        sample(name)  # warm-up, discarded
    samples: dict[str, list[float]] = {n: [] for n in candidates}
    timed, rounds, target, retries = list(candidates), 0, ROUNDS, 0
    while True:
        while rounds < target:
            shift = rounds % len(timed)
            for name in timed[shift:] + timed[:shift]:
                samples[name].append(sample(name))
            rounds += 1
        best = {n: round(min(t), 4) for n, t in samples.items()}
        spread = {n: round(_spread(t), 4) for n, t in samples.items()}
        doubts = _doubts_in_any_mode(best, spread, m)
        if not doubts or retries == MAX_RETRIES:
            return best, spread, rounds, not doubts
        timed = [n for n in candidates if n in doubts]
        retries += 1
        target += EXTRA_ROUNDS


@contextlib.contextmanager
def _exclusive(cache_file: Path | None) -> Iterator[None]:
    """Hold the lock beside the cache file, so that processes sharing it measure one at a time."""
    if cache_file is None or fcntl is None:
        yield
        return
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    """Per (weight shape, M bucket): the allowed kernel that `decide` picks from the measured timings.

    Untuned shapes use `columns` below 16 rows, else `linear`; on a GPU every product is `linear`."""

    def __init__(self, device: torch.device, cache_file: Path | None = None, mode: str = "fast"):
        if mode not in MATMUL_MODES:
            raise ValueError(f"engine.matmul must be one of {sorted(MATMUL_MODES)}, got {mode!r}")
        self.device = device
        self.cache_file = cache_file
        self.mode = mode
        self.allowed = MATMUL_MODES[mode]
        self.timings: dict[str, dict[int, dict[str, float]]] = {}  # shape key -> M bucket -> kernel -> best ms
        self.spread: dict[str, dict[int, dict[str, float]]] = {}  # shape key -> M bucket -> kernel -> spread
        self.rounds: dict[str, dict[int, int]] = {}  # shape key -> M bucket -> interleaved rounds timed
        self.unsettled: dict[str, list[int]] = {}  # shape key -> buckets to measure again at the next tune
        self.choice: dict[str, dict[int, str]] = {}
        self._packed: dict[int, torch.Tensor] = {}  # weight data_ptr -> oneDNN layout
        self._load()
        self._choose()

    @staticmethod
    def _key(w: torch.Tensor) -> str:
        return f"{w.shape[0]}x{w.shape[1]}:{str(w.dtype).removeprefix('torch.')}"

    def _load(self) -> None:
        """Read the cached plan; one of another CACHE_VERSION (or unreadable) counts as none, to be measured again."""
        self.timings, self.spread, self.rounds, self.unsettled = {}, {}, {}, {}
        if self.cache_file is None or not self.cache_file.exists():
            return
        try:
            saved = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(saved, dict) or saved.get("version") != CACHE_VERSION:
            return

        def per_bucket(table: dict) -> dict:
            return {k: {int(m): t for m, t in v.items()} for k, v in table.items()}

        self.timings = per_bucket(saved.get("timings", {}))
        self.spread = per_bucket(saved.get("spread", {}))
        self.rounds = per_bucket(saved.get("rounds", {}))
        self.unsettled = {k: [int(m) for m in v] for k, v in saved.get("unsettled", {}).items()}

    def _save(self) -> None:
        if self.cache_file is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(".tmp")
        payload = {
            "version": CACHE_VERSION,
            "timings": self.timings,
            "spread": self.spread,
            "rounds": self.rounds,
            "unsettled": {k: v for k, v in self.unsettled.items() if v},
        }
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.cache_file)

    def _choose(self) -> None:
        self.choice = {}
        for key, per_m in self.timings.items():
            choice = {}
            for m, times in per_m.items():
                allowed = {n: t for n, t in times.items() if n in self.allowed}
                choice[m] = decide(allowed, self.spread.get(key, {}).get(m, {}), m)[0]
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

    def _to_measure(self, key: str, names: list[str]) -> list[int]:
        known = self.timings.get(key)
        if known is None or any(m not in known for m in M_BUCKETS) or not all(n in known[M_BUCKETS[0]] for n in names):
            return list(M_BUCKETS)
        return [m for m in M_BUCKETS if m in self.unsettled.get(key, [])]

    def tune(self, weights: list[list[torch.Tensor]], sample: Callable[[str, int, str], float] | None = None) -> None:
        """Time each kernel on each group of same-shaped weights (e.g. one projection of every layer).

        Running through the whole group matters: a lone 3.5 MB matrix stays in cache and makes the one-core
        matrix-vector path look fine, while in a real forward every layer's weights come from memory. Timings
        of every kernel are cached, so switching modes needs no new measurement. `sample(shape key, M, kernel)`,
        if given, replaces the clock: it returns the ms of one call per weight (tests/test_matmul.py).
        """
        if self.device.type != "cpu":
            return  # GPU GEMMs have no skinny-matrix cliff worth a start-up measurement
        plans = []
        for group in weights:
            packed = [self._packed[w.data_ptr()] if w.data_ptr() in self._packed else onednn_pack(w) for w in group]
            names = ["linear", "columns"] + (["onednn"] if all(p is not None for p in packed) else [])
            plans.append((self._key(group[0]), group, packed, names))
        if not any(self._to_measure(key, names) for key, _, _, names in plans):
            self._choose()
            return
        with _exclusive(self.cache_file):
            self._load()  # another process may have measured while this one waited for the lock
            changed = False
            for key, group, packed, names in plans:
                buckets = self._to_measure(key, names)
                if not buckets:
                    continue
                if len(buckets) == len(M_BUCKETS):
                    self.timings[key], self.spread[key], self.rounds[key] = {}, {}, {}
                unsettled = []
                for m in buckets:
                    candidates = names + (["columns_pad2"] if m == 1 else [])
                    if sample is None:
                        x = torch.randn(m, group[0].shape[1], dtype=group[0].dtype)

                        def one(n: str, x=x, group=group, packed=packed) -> float:
                            return _time_ms(lambda: [KERNELS[n](w, x, p) for w, p in zip(group, packed)]) / len(group)
                    else:

                        def one(n: str, key=key, m=m) -> float:
                            return sample(key, m, n)

                    best, spread, rounds, settled = measure_bucket(candidates, one, m)
                    self.timings.setdefault(key, {})[m] = best
                    self.spread.setdefault(key, {})[m] = spread
                    self.rounds.setdefault(key, {})[m] = rounds
                    if not settled:
                        unsettled.append(m)
                self.unsettled[key] = unsettled
                changed = True
            if changed:
                self._save()
        self._choose()

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
