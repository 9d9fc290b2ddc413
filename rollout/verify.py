"""Lossless acceptance of drafted tokens: a pure function of the target's distributions and uniform draws.

Drafts here are deterministic: a drafter names tokens, it does not sample them, so its proposal is a point mass q
on the drafted token x. Speculative sampling's rule min(1, p(x)/q(x)) then becomes "accept x with probability p(x)",
and the residual max(0, p - q) normalised is "p with x removed, renormalised". Several candidates at one tree node
are tried in turn, each against the residual left by the ones before it; by induction the emitted token is
distributed exactly as p. Greedy requests pass a point mass on the argmax as p, which turns the same loop into
"accept while the draft equals the argmax".

Nodes of a draft are numbered 0..N-1 and listed parents first, siblings in the order they are to be tried; parent -1
is the root (the last token already emitted). The target's distribution at the root is row 0 of the sequence's block
of rows, at draft node j it is row j + 1.

The loop runs over node indices, vectorised over the batch, so the work per node is O(batch), not O(batch x vocab):
a residual is never materialised until the final draw. That makes 1e5 independent trials per call cheap, which is
what the statistical tests rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VerifyResult:
    accepted: torch.Tensor  # [B, N] int64: accepted draft node indices along the path, -1 padded
    num_accepted: torch.Tensor  # [B] int64
    next_token: torch.Tensor  # [B] int64: the token drawn after the accepted path (bonus or residual sample)
    last_node: torch.Tensor  # [B] int64: node whose distribution `next_token` came from (-1 = root)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of probs [B, V] (rows need not be normalised) with uniforms u [B] in [0, 1)."""
    cdf = probs.double().cumsum(-1)  # [B, V]
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, u.double()[:, None] * total, right=True).squeeze(1)
    # Rounding can put u * total on the last cumulative value; fall back to the last token with mass.
    last_nonzero = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(idx, last_nonzero)


def verify(
    probs: torch.Tensor,  # [R, V] processed target distributions, rows of one sequence contiguous
    row_start: torch.Tensor,  # [B] int64: row of each sequence's root
    draft_tokens: torch.Tensor,  # [B, N] int64, -1 where a sequence has fewer nodes
    draft_parents: torch.Tensor,  # [B, N] int64, parent node index, -1 = root
    uniforms: torch.Tensor,  # [B, N + 1] float in [0, 1): column j tests node j, column N draws the next token
) -> VerifyResult:
    b, n = draft_tokens.shape
    device = probs.device
    batch = torch.arange(b, device=device)
    cur = torch.full((b,), -1, dtype=torch.int64, device=device)  # current node, -1 = root
    cur_row = row_start.clone()  # row of probs holding the current node's distribution
    mass = probs[cur_row].double().sum(-1)  # [B] remaining mass of the residual at the current node
    rejected = torch.zeros((b, n), dtype=torch.bool, device=device)  # tried and rejected at the current node
    accepted = torch.full((b, n), -1, dtype=torch.int64, device=device)
    num_accepted = torch.zeros(b, dtype=torch.int64, device=device)

    for j in range(n):
        tok = draft_tokens[:, j]
        active = (tok >= 0) & (draft_parents[:, j] == cur)  # node j is a child of where each sequence stands
        if not bool(active.any()):
            continue
        p_x = probs[cur_row, tok.clamp(min=0)].double()
        # A sibling with the same token was already rejected here: x has no mass left in the residual.
        seen = (rejected[:, :j] & (draft_tokens[:, :j] == tok[:, None])).any(1)
        p_x = torch.where(seen, 0.0, p_x)
        ok = active & (uniforms[:, j].double() * mass < p_x)
        no = active & ~ok
        # Rejected: x leaves the residual at this node.
        mass = torch.where(no, mass - p_x, mass)
        rejected[:, j] |= no
        # Accepted: step down to node j; its siblings' rejections no longer matter.
        if bool(ok.any()):
            accepted[batch[ok], num_accepted[ok]] = j
            num_accepted += ok.long()
            cur = torch.where(ok, j, cur)
            cur_row = torch.where(ok, row_start + j + 1, cur_row)
            rejected[ok] = False
            mass = torch.where(ok, probs[cur_row].double().sum(-1), mass)

    residual = probs[cur_row].clone()  # [B, V]
    rows, cols = rejected.nonzero(as_tuple=True)
    residual[rows, draft_tokens[rows, cols]] = 0.0
    next_token = sample_inverse_cdf(residual, uniforms[:, n])
    return VerifyResult(accepted, num_accepted, next_token, cur)
