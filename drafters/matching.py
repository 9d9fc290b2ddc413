"""Where has the current context been seen before, and what came next? Shared by the retrieval drafters.

A *candidate* is a position in some stored token array whose preceding tokens equal the tail of the current
context; its *continuation* is what the array holds from there on. Candidates are weighted (recency of the policy
version that wrote them, length of the match, which source they came from) and merged into a trie of
continuations, whose best-first expansion is the draft tree.

Two ways to find candidates:
- `match_in_array`: a vectorised scan of one array. Used for the few arrays of one GRPO group (the in-flight
  siblings, earlier rollouts of the same prompt, the request itself), which change every step.
- `TokenIndex` (token_index.py): a hashed index over many finished rollouts, for the global window.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from drafters.base import Draft


@dataclass
class Candidates:
    """Matches of the context's tail in one array."""

    array: np.ndarray  # int32 tokens
    starts: np.ndarray  # [n] continuation start indices into array
    match_lens: np.ndarray  # [n] how many tokens before each start equal the context's tail
    weight: float  # weight of a match of length 1 from this array (source x recency)
    end: int  # continuations stop here (exclusive)
    probs: np.ndarray | None = None  # the policy's probability of each stored token when it was sampled (NaN: unknown)


def match_lengths(array: np.ndarray, starts: np.ndarray, context: np.ndarray, max_len: int) -> np.ndarray:
    """For each start s, the largest L <= max_len with array[s-L:s] == context[-L:] (0 if even L=1 fails)."""
    limit = min(max_len, len(context))
    if len(starts) == 0 or limit == 0:
        return np.zeros(len(starts), dtype=np.int64)
    # All depths at once ([n, limit] gathers) rather than a loop of small numpy calls per depth: siblings in a
    # GRPO group share long spans, so most candidates match to the full depth.
    pos = starts[:, None] - np.arange(1, limit + 1)[None, :]  # [n, limit]
    inside = pos >= 0
    equal = inside & (array[np.maximum(pos, 0)] == context[::-1][:limit][None, :])
    return np.cumprod(equal, axis=1).sum(axis=1).astype(np.int64)


def match_in_array(
    array: np.ndarray,
    n: int,
    context: np.ndarray,
    min_start: int,
    min_match: int,
    max_match: int,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Starts s in [max(min_start, 1), n) whose preceding tokens match the context's tail by >= min_match tokens.

    array[:n] is the valid part; s < n guarantees at least one continuation token. `allowed` ([>= n] bool), when
    given, admits only the starts it marks (several rollouts laid end to end: starts inside outputs only).
    """
    lo = max(min_start, 1)
    if n - lo <= 0 or len(context) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.flatnonzero(array[lo - 1 : n - 1] == context[-1]) + lo
    if allowed is not None:
        starts = starts[allowed[starts]]
    if len(starts) == 0:
        return starts, starts
    lens = match_lengths(array, starts, context, max_match)
    keep = lens >= min_match
    return starts[keep], lens[keep]


@dataclass
class _Node:
    weight: float = 0.0  # summed weight of the candidates whose continuation passes here
    p_weight: float = 0.0  # of those, the weight of the ones that recorded the policy's probability of this token
    p_sum: float = 0.0  # sum of weight x recorded probability
    children: dict[int, "_Node"] = field(default_factory=dict)


@dataclass
class TreeConfig:
    max_candidates: int = 32  # continuations merged into the trie, highest weight first
    match_power: float = 4.0  # a candidate's weight grows as match_len ** match_power: long matches dominate
    max_match: int = 32  # longer matches count as this long
    prior: float = 1.0  # pseudo-weight of "none of the stored continuations": tempers thin evidence
    min_prob: float = 0.05  # drop nodes whose estimated path probability is below this
    max_depth: int = 32
    # How much a node's estimate trusts the policy's own recorded probability of the token (when the candidates
    # carry one) over the candidates' vote: 0 = votes only, 1 = recorded probability only.
    logprob_trust: float = 0.5


def match_weights(cfg: TreeConfig) -> np.ndarray:
    """[max_match + 1] float64: the weight of a match of each length, len ** match_power, by Python's float pow (the C
    library's pow, as the compiled core computes it; numpy's vectorised power may round differently)."""
    return np.array([float(n) ** cfg.match_power for n in range(cfg.max_match + 1)], dtype=np.float64)


def build_draft(sources: list[Candidates], max_tokens: int, cfg: TreeConfig) -> Draft:
    """Merge weighted continuations into a trie and return its best-first expansion as a draft tree.

    A node's conditional probability is its weight over its parent's weight plus `prior`; the path probability
    (product along the path) estimates the chance the node is accepted. Nodes are taken best path-probability
    first, so parents precede children and siblings come most likely first: the order verification tries them in.
    Ties are broken explicitly (the compiled core breaks them alike): candidates of equal weight in the order the
    sources list them (a stable sort), a node's children in the order the ranked candidates first reached them,
    nodes of equal path probability in the order they were pushed.
    """
    if max_tokens <= 0:
        return Draft([])
    weights, refs = [], []
    power = match_weights(cfg)
    for si, src in enumerate(sources):
        if len(src.starts) == 0:
            continue
        w = src.weight * power[np.minimum(src.match_lens, cfg.max_match)]
        weights.append(w)
        refs.extend((si, int(s)) for s in src.starts)
    if not refs:
        return Draft([])
    w_all = np.concatenate(weights)
    order = np.argsort(-w_all, kind="stable")[: cfg.max_candidates]
    depth = min(cfg.max_depth, max_tokens)
    root = _Node()
    for i in order:
        si, s = refs[i]
        src = sources[si]
        w = float(w_all[i])
        root.weight += w
        node = root
        stop = min(s + depth, src.end)
        recorded = src.probs[s:stop].tolist() if src.probs is not None else [float("nan")] * (stop - s)
        for t, p_rec in zip(src.array[s:stop].tolist(), recorded):
            if t < 0:  # separator: the stored sequence ended
                break
            child = node.children.get(t)
            if child is None:
                child = node.children[t] = _Node()
            child.weight += w
            if p_rec == p_rec:  # not NaN
                child.p_weight += w
                child.p_sum += w * p_rec
            node = child

    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    heap: list[tuple[float, int, int, int, float, _Node]] = []  # (-path_prob, tiebreak, token, parent, cond, node)
    counter = 0

    def push_children(node: _Node, index: int, path_prob: float) -> None:
        nonlocal counter
        total = node.weight + cfg.prior
        for t, child in node.children.items():
            cond = child.weight / total
            if cfg.logprob_trust > 0 and child.p_weight > 0:
                cond = (1 - cfg.logprob_trust) * cond + cfg.logprob_trust * child.p_sum / child.p_weight
            p = path_prob * cond
            if p >= cfg.min_prob:
                heapq.heappush(heap, (-p, counter, t, index, cond, child))
                counter += 1

    push_children(root, -1, 1.0)
    while heap and len(tokens) < max_tokens:
        neg_p, _, t, parent, cond, node = heapq.heappop(heap)
        tokens.append(t)
        parents.append(parent)
        probs.append(cond)
        push_children(node, len(tokens) - 1, -neg_p)
    return Draft(tokens, parents, probs)
