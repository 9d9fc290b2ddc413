"""Lossless acceptance of drafted tokens: a pure function of the target's distributions and one uniform per position.

Drafts are deterministic: a drafter names tokens, it does not sample them, so its proposal is a point mass q on the
drafted token x. Speculative sampling's rule min(1, p(x)/q(x)) becomes "accept x with probability p(x)", and the
residual max(0, p - q), normalised, is "p with x removed, renormalised". Several candidates at one tree node are
tried in turn, each against the residual the ones before it left.

We run that rejection sampler with common random numbers: the token at output position t is decided by one
uniform u_t, through p's inverse CDF. Accepting x "with probability p(x)" is the test "u_t falls in x's interval of
the CDF" (an interval of length p(x)); on rejection the same u_t, now uniform over the rest of [0, 1), lands in
another token's interval with probability proportional to its mass: a draw from the renormalised residual. Trying
several candidates in turn is the same test against each candidate's interval. So at every tree node the emitted
token y = F_p^{-1}(u_t) is computed once, the child whose token equals y (if any) is accepted and verification goes
on from it with u_{t+1}, and otherwise y is emitted and the step ends.

Two consequences. Every token is distributed exactly as under p, so speculation changes nothing about what is
sampled. And since u_t belongs to the position, not to the draft, a request's rollout is the same token for token
whatever it drafted: plain decoding, any drafter and any batch give one rollout per seed (up to the last bits of the
logits). Greedy requests pass a point mass on the argmax as p, which is "accept while the draft equals the argmax".

Nodes of a draft are numbered 0..N-1 and listed parents first, siblings in the order they are to be tried; parent -1
is the root (the last token already emitted). The target's distribution at the root is row 0 of the sequence's block
of rows, at draft node j it is row j + 1. The loop runs over depths, vectorised over the batch; each step draws
through the inverse CDF once per emitted token, as plain sampling does.

`verify` states the rule on tensors and is the reference the tests hold everything to. The engine runs `walk`, the
same walk on host integer arrays with the draws handed in (`Draw`): per depth a handful of numpy operations on a few
hundred integers instead of a dozen torch calls, and the engine may draw every row's token in one call beforehand
(each row with its own depth's uniform) rather than one call per depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch

# The target's processed distributions, either all rows at once [R, V] or a function giving the rows asked for
# (the engine processes logits lazily: only the nodes verification reaches need their distribution).
Distributions = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]

# The target's token at each of some logit rows, given each row's uniform: (rows [A] int64, u [A] float64) -> [A]
# int64, all numpy. Whatever it does must be a draw through the inverse CDF of the row's processed distribution.
Draw = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class VerifyResult:
    accepted: torch.Tensor  # [B, N] int64: accepted draft node indices along the path, -1 padded
    num_accepted: torch.Tensor  # [B] int64
    next_token: torch.Tensor  # [B] int64: the token drawn after the accepted path (bonus or residual sample)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of probs [B, V] (rows need not be normalised) with uniforms u [B] in [0, 1)."""
    cdf = probs.double().cumsum(-1)  # [B, V]
    total = cdf[:, -1:]
    # The engine draws uniforms on the host from per-request CPU generators (the same numbers on any device).
    u = u.to(device=probs.device, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u[:, None] * total, right=True).squeeze(1)
    # Rounding can put u * total on the last cumulative value; fall back to the last token with mass. Below V the
    # index already has mass (cdf[idx] > u * total >= cdf[idx - 1]), so on a CPU, where the search for the last
    # token with mass costs four passes over the vocabulary, only rows that ran past the end pay for it. On an
    # accelerator those passes cost less than the sync that finding such rows would take.
    if probs.device.type == "cpu":
        over = (idx >= probs.shape[-1]).nonzero().squeeze(1)
        if len(over):
            idx[over] = _last_with_mass(probs[over])
        return idx
    return torch.minimum(idx, _last_with_mass(probs))


def _last_with_mass(probs: torch.Tensor) -> torch.Tensor:
    """[B] the index of each row's last entry above 0 (probs [B, V])."""
    return probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)


def verify(
    probs: Distributions,  # [R, V] processed target distributions (or rows -> [A, V]), one sequence's rows contiguous
    row_start: torch.Tensor,  # [B] int64: row of each sequence's root
    draft_tokens: torch.Tensor,  # [B, N] int64, -1 where a sequence has fewer nodes
    draft_parents: torch.Tensor,  # [B, N] int64, parent node index, -1 = root
    uniforms: torch.Tensor,  # [B, D + 1] float in [0, 1): column d decides the token at depth d (D = deepest node)
) -> VerifyResult:
    b, n = draft_tokens.shape
    device = row_start.device
    rows_of = probs.__getitem__ if isinstance(probs, torch.Tensor) else probs
    cur = torch.full((b,), -1, dtype=torch.int64, device=device)  # current node, -1 = root
    cur_row = row_start.clone()  # row of probs holding the current node's distribution
    accepted = torch.full((b, n), -1, dtype=torch.int64, device=device)
    num_accepted = torch.zeros(b, dtype=torch.int64, device=device)
    next_token = torch.full((b,), -1, dtype=torch.int64, device=device)
    active = torch.arange(b, device=device)
    for depth in range(uniforms.shape[1]):
        if active.numel() == 0:
            break
        # The target's own token at this position, from this position's uniform. The distributions may live on a
        # GPU while the indices stay on the host (as in the engine): y joins the indices.
        y = sample_inverse_cdf(rows_of(cur_row[active]), uniforms[active, depth]).to(device)  # [A]
        if n == 0:
            next_token[active] = y
            active = active[:0]
            break
        children = (draft_parents[active] == cur[active, None]) & (draft_tokens[active] >= 0)  # [A, N]
        hit = children & (draft_tokens[active] == y[:, None])
        found = hit.any(1)
        j = hit.int().argmax(1)  # the first candidate carrying y (duplicates among siblings change nothing)
        moved = active[found]
        accepted[moved, num_accepted[moved]] = j[found]
        num_accepted[moved] += 1
        cur[moved] = j[found]
        cur_row[moved] = row_start[moved] + j[found] + 1
        stopped = active[~found]
        next_token[stopped] = y[~found]
        active = moved
    if active.numel():
        raise ValueError(f"uniforms has {uniforms.shape[1]} columns; drafts are deeper than that")
    return VerifyResult(accepted, num_accepted, next_token)


def walk(
    draw: Draw,
    row_start: np.ndarray,  # [B] int64: row of each sequence's root
    draft_tokens: np.ndarray,  # [B, N] int64, -1 where a sequence has fewer nodes
    draft_parents: np.ndarray,  # [B, N] int64, parent node index, -1 = root
    uniforms: np.ndarray,  # [B, D + 1] float64: column d decides the token at depth d
) -> VerifyResult:
    """`verify` on host arrays, with the target's tokens drawn by `draw`; returns the same result (as tensors)."""
    b, n = draft_tokens.shape
    cur = np.full(b, -1, dtype=np.int64)  # current node, -1 = root
    cur_row = row_start.astype(np.int64, copy=True)
    accepted = np.full((b, n), -1, dtype=np.int64)
    num_accepted = np.zeros(b, dtype=np.int64)
    next_token = np.full(b, -1, dtype=np.int64)
    active = np.arange(b)
    for depth in range(uniforms.shape[1]):
        y = draw(cur_row[active], uniforms[active, depth])  # [A]
        if n == 0:
            next_token[active] = y
            active = active[:0]
            break
        # A child of the current node carrying y; draft tokens are >= 0 where present, so padding never matches.
        hit = (draft_parents[active] == cur[active, None]) & (draft_tokens[active] == y[:, None])  # [A, N]
        found = hit.any(1)
        j = hit.argmax(1)[found]  # the first candidate carrying y
        moved = active[found]
        accepted[moved, num_accepted[moved]] = j
        num_accepted[moved] += 1
        cur[moved] = j
        cur_row[moved] = row_start[moved] + j + 1
        next_token[active[~found]] = y[~found]
        active = moved
        if not active.size:
            break
    if active.size:
        raise ValueError(f"uniforms has {uniforms.shape[1]} columns; drafts are deeper than that")
    return VerifyResult(*(torch.from_numpy(a) for a in (accepted, num_accepted, next_token)))
