"""The budget's per-draft, per-query formulation, kept as the reference for rollout/budget.py's batched `select`
and rollout/cost_model.py's cached `StepClock` (tests/test_budget.py holds them equal over random runs).

It reads the live budget's state (acceptance per depth and per sequence, the clock's sums) and recomputes every
number the straightforward way: each draft's chances on its own, the clock's fit by np.linalg.solve on every query,
the curve interpolated on every query.
"""

from __future__ import annotations

import numpy as np

from rollout.budget import Acceptance, AutoBudget, BudgetItem
from rollout.cost_model import StepClock, batch_bucket


def reference_fit(clock: StepClock, batch: int) -> np.ndarray:
    gram, moment = clock._sums.get(batch_bucket(batch), (np.zeros((2, 2)), np.zeros(2)))
    return np.clip(np.linalg.solve(gram + clock.prior * np.eye(2), moment + clock.prior), 0.5, 8.0)


def reference_padded_price(clock: StepClock, batch: int) -> float:
    """The probe's padded-row price, interpolated in log B between the nearest measured batch sizes."""
    sizes = sorted(clock.model.grid)
    lo, hi = max([x for x in sizes if x <= batch] or sizes[:1]), min([x for x in sizes if x >= batch] or sizes[-1:])
    w = 0.0 if hi == lo else (np.log(batch) - np.log(lo)) / (np.log(hi) - np.log(lo))
    return (1 - w) * clock.model.padded.get(lo, 0.0) + w * clock.model.padded.get(hi, 0.0)


def reference_features(clock: StepClock, tokens, batch: int, rows=None) -> np.ndarray:
    """[2, T]"""
    tokens = np.atleast_1d(np.asarray(tokens, dtype=np.float64))
    if rows is not None:  # each padded row costs the padded price of a token, rounded to whole tokens
        tokens = tokens + np.rint(reference_padded_price(clock, batch) * np.maximum(np.asarray(rows) - tokens, 0))
    plain = clock.model(batch, batch)
    curve = clock.model.times(tokens, batch)
    return np.stack([np.ones_like(curve), np.maximum(curve - plain, 0.0) / plain])


def reference_seconds(clock: StepClock, tokens, batch: int, rows=None) -> np.ndarray:
    return clock.model(batch, batch) * (reference_fit(clock, batch) @ reference_features(clock, tokens, batch, rows))


def reference_predicted(acceptance: Acceptance, draft, nodes: int) -> np.ndarray:
    depth = np.minimum(np.asarray(draft.node_depths[:nodes], dtype=np.intp), acceptance.depths.shape[1] - 1)
    accepted, claimed = acceptance.depths[:, depth]
    ratio = (accepted + acceptance.prior_claims * acceptance.prior_ratio) / (claimed + acceptance.prior_claims)
    return ratio * np.asarray(draft.path_probs()[:nodes], dtype=np.float64)


def reference_chances(acceptance: Acceptance, request_id: str, draft, nodes: int) -> np.ndarray:
    predicted = reference_predicted(acceptance, draft, nodes)
    seq_accepted, seq_predicted = acceptance.seqs.get(request_id, (0.0, 0.0))
    return np.clip(predicted * (seq_accepted + acceptance.shrink) / (seq_predicted + acceptance.shrink), 0.0, 1.0)


def reference_select(budget: AutoBudget, items: list[BudgetItem], waiting: int = 0) -> list[int]:
    """The counts `budget.select` must pick, computed one draft at a time."""
    b = len(items)
    if b == 0 or not any(len(it.draft) for it in items):
        return [0] * b
    if budget.length_aware and waiting == 0:
        remaining = np.array([budget.lengths.remaining(it.prompt_key, it.generated) for it in items])
        weights = np.clip(remaining / remaining.mean(), 0.25, 4.0)
    else:
        weights = np.ones(b)
    chances = [reference_chances(budget.acceptance, it.request_id, it.draft, budget.max_nodes) for it in items]
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(chances)])
    position = np.concatenate([np.arange(len(c)) for c in chances])
    priority = np.concatenate([np.minimum.accumulate(w * c) for w, c in zip(weights, chances)])
    order = np.lexsort((position, -priority))
    base = sum(it.pending for it in items)
    gain = b + np.concatenate([[0.0], np.cumsum(np.concatenate(chances)[order])])
    counts, longest = np.zeros(b, dtype=int), [0]  # the longest draft kept, prefix by prefix
    for i in order:
        counts[owner[i]] += 1
        longest.append(counts.max())
    rows = b * (1 + np.array(longest))  # every sequence padded to the longest
    rate = gain / reference_seconds(budget.clock, base + np.arange(len(order) + 1), b, rows)
    return np.bincount(owner[order[: int(np.argmax(rate))]], minlength=b).tolist()


def reference_observe(acceptance: Acceptance, request_id: str, draft, accepted: int) -> None:
    """Acceptance.observe, with np.add.at for every draft."""
    seq = acceptance.seqs.setdefault(request_id, [0.0, 0.0])
    predicted = reference_predicted(acceptance, draft, len(draft)).sum()
    seq[:] = acceptance.seq_decay * seq[0] + accepted, acceptance.seq_decay * seq[1] + predicted
    depth = np.minimum(np.asarray(draft.node_depths, dtype=np.intp), acceptance.depths.shape[1] - 1)
    acceptance.depths *= acceptance.decay
    acceptance.depths[0, 1 : accepted + 1] += 1.0
    np.add.at(acceptance.depths[1], depth, draft.path_probs())
