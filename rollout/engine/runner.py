"""One verification step of a batch: build the forward, run the target, verify the drafts, commit what was accepted.

Bookkeeping stays on the host and is done for the whole batch at once where it can be: one batch build, one
transfer of the row parameters, one gather of the emitted tokens' logprobs, one copy of the results back. What is
left per sequence is one pass that turns the accepted path into tokens and KV moves, and one that appends them.
"""

from __future__ import annotations

import numpy as np
import torch

from drafters.base import Draft
from rollout.engine.batch import SeqInput, build_batch, build_decode_batch
from rollout.engine.kv_cache import SlotKVCache
from rollout.engine.model import TargetModel
from rollout.engine.sequence import Sequence
from rollout.engine.speculator import StepOutcome
from rollout.sampling import draw_tokens
from rollout.verify import VerifyResult, walk

# On a CPU, drawing a row costs about 10 ns per vocabulary entry (processing, then the inverse CDF in float64) and a
# call about 150 us: drawing every row at once pays while a step's rows x vocabulary stay below ~2^18 (the tiny
# test models), and drawing per depth only the rows verification reaches pays for real vocabularies (SmolLM2:
# 49152). On an accelerator the element cost is small beside a kernel launch: always every row at once, as vLLM's
# rejection sampler does.
CPU_ALL_ROWS_ELEMENTS = 2**18


def _draw_all_rows(rows: int, vocab_size: int, device: torch.device) -> bool:
    return device.type != "cpu" or rows * vocab_size <= CPU_ALL_ROWS_ELEMENTS


class RowDraws:
    """Draws the target's token at logit rows through their processed distributions (min_tokens masks applied)
    and keeps each drawn row's logprobs, so that the emitted tokens' logprobs are read from the same numbers."""

    def __init__(self, logits: torch.Tensor, masked: torch.Tensor | None, row_params: list[torch.Tensor]):
        self.logits = logits  # [R, V]
        self.masked = masked  # [R, V] bool or None
        self.row_params = row_params  # temperature, top_k, top_p [R] each
        self.rows: list[np.ndarray] = []  # rows drawn, in order
        self.logprobs: list[torch.Tensor] = []  # their logprobs [A, V], in order

    def __call__(self, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
        """rows [A] int64, u [A] float64 -> tokens [A] int64."""
        at = torch.from_numpy(rows).to(self.logits.device)
        reached = self.logits[at]
        if self.masked is not None:
            reached = reached.masked_fill(self.masked[at], float("-inf"))
        tokens, logprobs = draw_tokens(reached, *(p[at] for p in self.row_params), torch.from_numpy(u))
        self.rows.append(rows)
        self.logprobs.append(logprobs)
        return tokens.cpu().numpy()

    def logprobs_of(self, rows: list[int]) -> torch.Tensor:
        """[len(rows), V]: the logprobs of already drawn rows, in the order asked, in one gather."""
        drawn = np.concatenate(self.rows)
        index_of_row = np.empty(len(self.logits), dtype=np.int64)
        index_of_row[drawn] = np.arange(len(drawn))
        picked = torch.from_numpy(index_of_row[rows]).to(self.logits.device)
        return torch.cat(self.logprobs)[picked] if len(self.logprobs) > 1 else self.logprobs[0][picked]


class Runner:
    def __init__(self, model: TargetModel, cache: SlotKVCache, top_logprobs: int):
        self.model = model
        self.cache = cache
        self.vocab_size = model.shape.vocab_size
        self.top_logprobs = top_logprobs  # the target's top-k to keep per emitted token for the history (0: none)

    def top_width(self, s: Sequence, keep_top: bool) -> int:
        """How many of the target's top logprobs to keep per token of `s`: the history's k (when keep_top), or what
        its request asks for, whichever is more. Constant over a request's life (keep_top changes only when idle),
        so its rows stack."""
        return max(self.top_logprobs if keep_top else 0, s.params.top_logprobs)

    def run(self, seqs: list[Sequence], slot_lo: int, drafts: list[Draft], keep_top: bool) -> StepOutcome:
        """Verify `drafts` for the sequences in slots [slot_lo, slot_lo + len(seqs)) and commit the result.
        keep_top: record the target's top-k of each committed token on the sequence (for the history); a request
        that asks for top logprobs gets them recorded whatever keep_top says."""
        cache_lens = np.fromiter((s.cache_len for s in seqs), dtype=np.int64, count=len(seqs))  # [B]
        pending = [len(s.tokens) - c for s, c in zip(seqs, cache_lens.tolist())]  # tokens each feeds besides its draft
        sizes = [len(d) for d in drafts]  # [B] draft nodes
        width = max(sizes)
        if max(pending) == 1 and not width:
            batch = build_decode_batch(cache_lens, [s.tokens[-1] for s in seqs], slot_lo, self.model.device)
        else:
            inputs = [_seq_input(s, p, d) for s, p, d in zip(seqs, pending, drafts)]
            batch = build_batch(inputs, slot_lo, self.model.device)
        logits = self.model.forward(batch, self.cache)  # [R, V]
        device = logits.device
        counts = np.asarray(batch.logit_counts)  # [B] rows per sequence: the root's and one per draft node
        row_start = np.cumsum(counts) - counts  # [B]
        row_params = _row_params(seqs, counts, device)
        masked = _min_tokens_mask(seqs, drafts, counts, self.vocab_size)  # [R, V] bool, or None
        draws = RowDraws(logits, None if masked is None else masked.to(device), row_params)

        depth = max(d.depth for d in drafts) if width else 0
        # One uniform per output position, from the request's own generator (see verify.py): its rollout depends
        # neither on its batch neighbours nor on what was drafted.
        uniforms = np.array([s.uniforms(len(s.output), depth + 1) for s in seqs], dtype=np.float64)  # [B, D+1]
        if width:
            result = _verify(draws, drafts, width, counts, row_start, uniforms)
            next_tokens = result.next_token.tolist()
        else:  # nothing drafted: each root's token is the one drawn
            next_tokens = draws(row_start, uniforms[:, 0]).tolist()

        if width:
            paths, emitted_all, lp_rows = self._accept(seqs, slot_lo, drafts, pending, row_start, result, next_tokens)
        else:  # plain decoding: one token per sequence, drawn at its root row
            paths = [[] for _ in seqs]
            emitted_all = [[t] for t in next_tokens]
            lp_rows = row_start.tolist()
            for s, p in zip(seqs, pending):
                s.cache_len += p
                s.stats.target_forwards += 1

        # The emitted tokens' logprobs in one gather and one copy to the host (float() per token would wait on a GPU
        # once per token).
        lp_emitted = draws.logprobs_of(lp_rows)  # [E, V]
        emitted_flat = torch.tensor([t for e in emitted_all for t in e], device=device)
        token_logprobs = lp_emitted.gather(1, emitted_flat[:, None]).squeeze(1).tolist()
        # The top-k of the same rows the emitted tokens' logprobs were read from; only when someone reads them.
        widths = [self.top_width(s, keep_top) for s in seqs]
        top = None
        if max(widths):
            values, ids = lp_emitted.topk(min(max(widths), lp_emitted.shape[-1]), dim=-1)  # [E, k] each
            top = (ids.to(torch.int32).cpu(), values.cpu())

        committed, committed_lps, finished = [], [], []
        offset = 0
        for s, emitted, width in zip(seqs, emitted_all, widths):
            lps = token_logprobs[offset : offset + len(emitted)]
            kept = s.commit(emitted, lps)
            if top is not None and width:  # copies: a view would keep the whole step's rows alive
                rows = slice(offset, offset + kept)
                s.top.append((top[0][rows, :width].clone(), top[1][rows, :width].clone()))
            offset += len(emitted)
            committed.append(emitted if kept == len(emitted) else emitted[:kept])
            committed_lps.append(lps if kept == len(lps) else lps[:kept])
            if s.finish_reason is not None:
                finished.append(s)
        return StepOutcome(paths, next_tokens, committed, committed_lps, finished)

    def _accept(self, seqs, slot_lo, drafts, pending, row_start, result, next_tokens):
        """Accepted paths -> (paths, emitted tokens, the row each was drawn from); advances cache_len and moves the
        KV of a tree branch other than the first into place."""
        num_accepted = result.num_accepted.tolist()
        accepted = result.accepted.tolist()
        paths: list[list[int]] = []
        emitted_all: list[list[int]] = []
        lp_rows: list[int] = []  # the row each emitted token was drawn from: the root, then the path's nodes
        moves: list[tuple[int, int, int]] = []  # (slot, from, to)
        for i, s in enumerate(seqs):
            start = int(row_start[i])
            n = num_accepted[i]
            d = drafts[i]
            lp_rows.append(start)
            if n:
                path = accepted[i][:n]
                emitted = [d.token_ids[j] for j in path]
                emitted.append(next_tokens[i])
                lp_rows.extend(start + j + 1 for j in path)
                base = s.cache_len + pending[i]
                moves.extend((slot_lo + i, base + j, base + k) for k, j in enumerate(path) if j != k)
            else:
                path = []
                emitted = [next_tokens[i]]
            s.cache_len += pending[i] + n
            s.stats.record(d.depth, n, len(d))
            paths.append(path)
            emitted_all.append(emitted)
        if moves:
            slots, src, dst = (torch.tensor(c) for c in zip(*moves))
            self.cache.move_positions(slots, src, dst)
        return paths, emitted_all, lp_rows


def _verify(
    draws: RowDraws, drafts: list[Draft], width: int, counts: np.ndarray, row_start: np.ndarray, uniforms: np.ndarray
) -> VerifyResult:
    b = len(drafts)
    tokens = np.full((b, width), -1, dtype=np.int64)  # [B, N]
    parents = np.full((b, width), -1, dtype=np.int64)  # [B, N]
    depths = np.zeros((b, width), dtype=np.int64)  # [B, N]
    for i, d in enumerate(drafts):
        if len(d):
            tokens[i, : len(d)] = d.token_ids
            parents[i, : len(d)] = d.node_parents
            depths[i, : len(d)] = d.node_depths
    rows = int(counts.sum())
    if not _draw_all_rows(rows, draws.logits.shape[-1], draws.logits.device):
        return walk(draws, row_start, tokens, parents, uniforms)
    # Every row's token in one call, each row with its own depth's uniform; the walk then only looks them up. Rows
    # the walk never reaches are drawn for nothing, which costs less here than a call per depth.
    seq_of_row = np.repeat(np.arange(b), counts)  # [R]
    node = np.arange(rows) - row_start[seq_of_row] - 1  # [R] draft node of each row, -1 = the root
    row_depth = np.where(node < 0, 0, depths[seq_of_row, np.maximum(node, 0)])  # [R]
    drawn = draws(np.arange(rows), uniforms[seq_of_row, row_depth])  # [R]
    return walk(lambda at, u: drawn[at], row_start, tokens, parents, uniforms)


def _seq_input(s: Sequence, pending: int, d: Draft) -> SeqInput:
    fed = s.tokens[s.cache_len :] if pending > 1 else [s.tokens[-1]]
    if not len(d):
        return SeqInput(s.cache_len, fed, None, pending - 1)
    parents = None
    if not d.is_chain:
        # Draft node j is new token pending + j; the draft's root is the last pending token, new token pending - 1.
        parents = list(range(-1, pending - 1)) + [pending - 1 if q < 0 else pending + q for q in d.node_parents]
    return SeqInput(s.cache_len, fed + list(d.token_ids), parents, pending - 1)


def _row_params(seqs: list[Sequence], counts: np.ndarray, device) -> list[torch.Tensor]:
    """temperature, top_k, top_p of every logit row [R] each, on the logits' device."""
    out = []
    for name, dtype in (("temperature", np.float32), ("top_k", np.int64), ("top_p", np.float32)):
        values = np.fromiter((getattr(s.request.params, name) for s in seqs), dtype=dtype, count=len(seqs))
        out.append(torch.from_numpy(np.repeat(values, counts)).to(device))
    return out


def _min_tokens_mask(seqs: list[Sequence], drafts: list[Draft], counts: np.ndarray, vocab_size: int):
    """[R, V] bool: rows whose output position is below their request's min_tokens, with its stop tokens marked;
    None when no request needs one. A sequence's first logit row predicts output position len(output), the row of a
    draft node at depth d (1-based) position len(output) + d."""
    if all(len(s.output) >= s.request.params.min_tokens for s in seqs):
        return None
    mask = torch.zeros(int(counts.sum()), vocab_size, dtype=torch.bool)
    row = 0
    for s, d, count in zip(seqs, drafts, counts.tolist()):
        positions = [len(s.output)] + [len(s.output) + depth for depth in d.node_depths]
        stops = sorted(s.stop_ids)
        for r, position in zip(range(row, row + count), positions):
            if position < s.request.params.min_tokens and stops:
                mask[r, stops] = True
        row += count
    return mask
