"""The embedded engine's step-cost probe: time forwards of B sequences bringing k new tokens each, once per machine
and model (cached), for the budget's cost model (rollout/cost_model.py)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch

from rollout.config import EngineConfig
from rollout.cost_model import CostModel

RAGGED = 5  # the probe's unequal drafts bring 1 to this many new tokens (auto's batch-64 steps: ~3, padded to ~6)


def cached(cache_file: Path | None, measure: Callable[[], CostModel], log: Callable[[str], None] = print) -> CostModel:
    """The cost model cached in `cache_file` (per machine and model), else `measure()`d once and cached there."""
    if cache_file is not None and cache_file.exists():
        return CostModel(json.loads(cache_file.read_text()))
    log("measuring the step cost model on this machine (once; cached)")
    cost = measure()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cost.to_json(), indent=1))
    return cost


def cost_model_file(folder, config: EngineConfig) -> Path:
    """Where this machine's cost model for this model (and kernels) is cached."""
    from rollout.checkpoint import cache_dir
    from rollout.engine.hardware import fingerprint

    # |ragged: caches from before the padded-row price was probed are measured again
    text = (Path(folder) / "config.json").read_text() + f"|{config.dtype}|{config.matmul}|{config.device}|ragged"
    model_id = hashlib.sha1(text.encode()).hexdigest()[:10]
    return cache_dir() / "cost" / f"{fingerprint(torch.device(config.device))}-{model_id}.json"


def measure_cost_model(
    model, max_batch: int, cache_file: Path | None = None, context: int = 128, log: Callable[[str], None] = print
) -> CostModel:
    """Time forwards on this machine: B sequences with a `context`-token cache, each bringing k new tokens."""
    return cached(cache_file, lambda: _probe(model, max_batch, context), log)


def _probe(model, max_batch: int, context: int) -> CostModel:
    batches = [b for b in (1, 4, 16, 64, 256) if b <= max_batch] or [1]
    ks = (1, 2, 4, 8, 16)
    # A short max_model_len must still hold the probe's context plus its largest draft.
    context = max(1, min(context, model.max_model_len - max(ks) - 1))
    ks = tuple(k for k in ks if context + k <= model.max_model_len) or (1,)
    equal = [(b, k) for b in batches for k in ks if b * k <= 2048]
    # Drafts of unequal length side by side: 1 to RAGGED new tokens, which the engine pads to the longest.
    ragged = [(b, tuple(1 + i % RAGGED for i in range(b))) for b in batches if b >= 4 and (b, 8) in equal]
    seconds = time_forwards(model, equal + ragged, context)
    cost = CostModel.from_timings({shape: seconds[shape] for shape in equal})
    for b, counts in ragged:
        tokens, padded = cost(sum(counts), b), cost(b * RAGGED, b)  # equal chains of as many tokens, and as many rows
        cost.padded[b] = min(max((seconds[(b, counts)] - tokens) / max(padded - tokens, 1e-9), 0.0), 1.0)
    return cost


def time_forwards(
    model, shapes: list[tuple[int, int | tuple[int, ...]]], context: int, rounds: int = 3, pick: Callable = min
) -> dict[tuple, float]:
    """Seconds of a forward of B sequences with a `context`-token cache, each bringing k new tokens (or the k of each
    sequence, a tuple), per (B, k) in `shapes`: the fastest of `rounds` (or `pick` of them)."""
    from rollout.engine.batch import SeqInput, build_batch
    from rollout.engine.hardware import synchronize

    counts = {(b, k): k if isinstance(k, tuple) else (k,) * b for b, k in shapes}  # new tokens per sequence
    widest = max(b for b, _ in shapes)
    cache = model.new_cache(widest)
    filler = [1] * (context + max(max(c) for c in counts.values()))
    model.forward(build_batch([SeqInput(0, filler[:context], None, context - 1)] * widest, 0, model.device), cache)
    forwards = {
        shape: build_batch([SeqInput(context, filler[:k], None, 0) for k in c], 0, model.device)
        for shape, c in counts.items()
    }
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    # Rounds over the whole grid, keeping each point's fastest (by default): a burst of load elsewhere on the machine
    # then spoils one round of a point, not the point.
    for _ in range(rounds):
        for shape in shapes:
            synchronize(model.device)
            t0 = time.perf_counter()
            model.forward(forwards[shape], cache)
            synchronize(model.device)  # a GPU forward returns at launch; time its work
            times[shape].append(time.perf_counter() - t0)
    return {shape: pick(t) for shape, t in times.items()}
