"""One forward's worth of new tokens from several sequences, packed, with their positions and attention mask.

Every sequence in a forward brings a few new tokens: for a prompt being prefilled, the prompt; for a running
sequence, its last sampled token; in both cases followed by drafted tokens. The new tokens of one sequence form a
tree: each has a parent among the earlier new tokens (or none: it follows the cached context). A chain is the tree
where every parent is the previous token. A token at depth d sits at RoPE position cache_len + d and attends to the
cached context plus its ancestors and itself; its key/value is written at cache index cache_len + i (its index among
the new tokens), so siblings never overwrite each other. After acceptance the engine moves the accepted path into
place (KV of the token at depth d to cache index cache_len + d).

Linear layers see only the packed tokens [M]; attention sees them scattered into a padded [B, T] block when all
sequences bring the same number of tokens. Where they differ (a long draft for a tail sequence beside short ones,
a prompt admitted beside running sequences) that padding would make every sequence pay for the longest one's T
rows, so attention is split instead (`RaggedSplit`): every sequence's first new token in one decode-shaped call,
then the remaining tokens in one call per length class, each over just its sequences' cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SeqInput:
    """New tokens of one sequence for one forward."""

    cache_len: int  # tokens already in the cache for this sequence
    tokens: list[int]  # new tokens, parents before children
    parents: list[int] | None  # parent index among new tokens, -1 = follows the cache; None = a chain
    logits_from: int  # index of the first new token whose next-token distribution is needed


@dataclass
class RaggedGroup:
    """Sequences whose tokens after the first are padded together: [D, W] rows over their own cache slots."""

    seqs: torch.Tensor  # [D] int64, sequences (0-based in the batch)
    rows: torch.Tensor  # [N] int64, packed rows of their tokens after the first
    padded_index: torch.Tensor  # [N] int64, row of each in the padded [D * W] layout
    mask: torch.Tensor  # [D, 1, W, ctx_g] bool
    width: int  # W
    ctx: int  # ctx_g: cache positions the group needs


@dataclass
class RaggedSplit:
    """Attention for a batch whose sequences bring different numbers of new tokens, with little padding: used
    where a few sequences bring many more tokens than the rest (see _split_pays).

    Call 1: each sequence's first new token (it attends to its cached context and itself) as a [B, 1] decode.
    Then one call per group: sequences whose count of further tokens falls in the same power-of-two class, so a
    group pads each of its sequences to at most twice its own rows.
    """

    first_rows: torch.Tensor  # [B] int64, packed row of each sequence's first new token
    first_mask: torch.Tensor  # [B, 1, 1, ctx] bool
    groups: list[RaggedGroup]


# What copying one sequence's cached keys and values into a group costs, in query rows of attention over the same
# context. Measured on the 2-core CPU with SmolLM2 (batch 64, 250 cached tokens): one 16-node draft beside 63
# plain sequences, split 145 ms vs padded 319 ms; 56 sequences at 4 nodes and 8 at 0-2, split 423 vs padded 350.
COPY_ROWS = 8


def _length_classes(lengths: list[int]) -> dict[int, list[int]]:
    classes: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if n > 1:
            classes.setdefault((n - 2).bit_length(), []).append(i)  # 1 | 2 | 3-4 | 5-8 | ... further tokens
    return classes


def _split_pays(lengths: list[int], classes: dict[int, list[int]]) -> bool:
    """Split attention when its query rows plus slot copies come to fewer than the padded block's rows."""
    padded = len(lengths) * max(lengths)
    split = len(lengths)
    for members in classes.values():
        split += len(members) * (max(lengths[i] for i in members) - 1 + COPY_ROWS)
    return split < padded


def _ragged_split(
    seqs: list[SeqInput], lengths: list[int], classes: dict[int, list[int]], mask: np.ndarray, as_tensor, device
) -> RaggedSplit:
    starts = np.cumsum([0] + lengths[:-1])
    groups = []
    for members in classes.values():
        width = max(lengths[i] for i in members) - 1
        rows, pad = [], []
        for j, i in enumerate(members):
            rows.extend(range(starts[i] + 1, starts[i] + lengths[i]))
            pad.extend(range(j * width, j * width + lengths[i] - 1))
        ctx = max(seqs[i].cache_len + lengths[i] for i in members)
        group_mask = np.ascontiguousarray(mask[members, 1 : 1 + width, :ctx])
        groups.append(
            RaggedGroup(
                seqs=as_tensor(members),
                rows=as_tensor(rows),
                padded_index=as_tensor(pad),
                mask=torch.from_numpy(group_mask).to(device).unsqueeze(1),
                width=width,
                ctx=ctx,
            )
        )
    first_mask = torch.from_numpy(np.ascontiguousarray(mask[:, :1])).to(device).unsqueeze(1)
    return RaggedSplit(first_rows=as_tensor(starts), first_mask=first_mask, groups=groups)


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [M] int64, packed new tokens
    positions: torch.Tensor  # [M] int64, RoPE positions
    write_slots: torch.Tensor  # [M] int64, cache slot of each token
    write_pos: torch.Tensor  # [M] int64, cache index of each token
    padded_index: torch.Tensor  # [M] int64, row of each token in the padded [B*T] layout
    attn_mask: torch.Tensor  # [B, 1, T, ctx] bool, True = may attend
    logit_rows: torch.Tensor  # [R] int64, packed rows whose logits are returned, in sequence order
    logit_counts: list[int]  # [B] rows per sequence in logit_rows
    slot_lo: int
    num_seqs: int
    max_new: int  # T
    ctx: int
    is_decode: bool  # every sequence brings exactly one token: the padded layout is the packed layout
    split: RaggedSplit | None = None  # set where sequences bring different numbers of tokens

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())


def tree_depths(parents: list[int]) -> list[int]:
    depths: list[int] = []
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"parent {p} of new token {i} must be -1 or an earlier token")
        depths.append(0 if p < 0 else depths[p] + 1)
    return depths


def tree_ancestors(parents: list[int]) -> np.ndarray:
    """[n, n] bool: entry (i, j) is True when j is i itself or one of its ancestors."""
    n = len(parents)
    anc = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    return anc


def build_batch(seqs: list[SeqInput], slot_lo: int, device: torch.device | str = "cpu") -> ForwardBatch:
    """Pack the sequences occupying slots [slot_lo, slot_lo + len(seqs)) into one forward.

    Index arrays and the mask are built for the whole batch at once with numpy; only a tree's ancestor block is
    built per sequence. (tests/batch_reference.py keeps the per-sequence construction this must equal.)"""
    if not seqs:
        raise ValueError("a forward needs at least one sequence")
    b = len(seqs)
    lengths = np.fromiter((len(s.tokens) for s in seqs), dtype=np.int64, count=b)  # [B]
    if lengths.min() < 1:
        raise ValueError("every sequence in a forward needs at least one new token")
    cache = np.fromiter((s.cache_len for s in seqs), dtype=np.int64, count=b)  # [B]
    logits_from = np.fromiter((s.logits_from for s in seqs), dtype=np.int64, count=b)  # [B]
    t_max = int(lengths.max())
    ctx = int((cache + lengths).max())
    m = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths  # [B] packed row of each sequence's first new token
    seq_of = np.repeat(np.arange(b), lengths)  # [M]
    within = np.arange(m) - starts[seq_of]  # [M] index among its sequence's new tokens
    depth = within.copy()  # [M] depth below the cached context: the index, in a chain

    # [B, T, ctx]: new token r of sequence i sees the cache and new tokens 0..r (a chain); padding rows see
    # position 0 only, so their softmax stays finite (their outputs are dropped).
    rows = np.arange(t_max)[None, :, None]
    real = rows < lengths[:, None, None]
    mask = (np.arange(ctx)[None, None, :] <= cache[:, None, None] + rows) & real
    mask[:, :, 0] |= ~real[:, :, 0]
    for i, s in enumerate(seqs):
        if s.parents is None:
            continue
        n, c = int(lengths[i]), int(cache[i])
        if len(s.parents) != n:
            raise ValueError(f"sequence {i}: {len(s.parents)} parents for {n} new tokens")
        depth[starts[i] : starts[i] + n] = tree_depths(s.parents)
        mask[i, :n, c : c + n] = tree_ancestors(s.parents)

    counts = lengths - logits_from  # [B]
    r = int(counts.sum())
    first_logit = np.repeat(np.cumsum(counts) - counts, counts)  # [R] each row's sequence's first logit row
    logit_rows = np.repeat(starts + logits_from, counts) + (np.arange(r) - first_logit)

    def as_tensor(values, dtype=torch.int64):
        return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)

    # Equal counts pad nothing: one call. Otherwise split where the padding would cost more than the split's extra
    # calls and copies: a few long drafts (or a prompt) beside many short ones.
    split = None
    if lengths.min() < t_max:
        length_list = lengths.tolist()
        classes = _length_classes(length_list)
        if _split_pays(length_list, classes):
            split = _ragged_split(seqs, length_list, classes, mask, as_tensor, device)

    return ForwardBatch(
        token_ids=as_tensor([t for s in seqs for t in s.tokens]),
        positions=as_tensor(cache[seq_of] + depth),
        write_slots=as_tensor(slot_lo + seq_of),
        write_pos=as_tensor(cache[seq_of] + within),
        padded_index=as_tensor(seq_of * t_max + within),
        attn_mask=torch.from_numpy(mask).to(device).unsqueeze(1),
        logit_rows=as_tensor(logit_rows),
        logit_counts=counts.tolist(),
        slot_lo=slot_lo,
        num_seqs=b,
        max_new=t_max,
        ctx=ctx,
        is_decode=t_max == 1,
        split=split,
    )


def build_decode_batch(
    cache_lens: np.ndarray, tokens: list[int], slot_lo: int, device: torch.device | str = "cpu"
) -> ForwardBatch:
    """build_batch for the commonest step: every sequence feeds one token and no draft (plain decoding). The same
    ForwardBatch, without building a SeqInput per sequence.

    cache_lens [B] int64: tokens cached per sequence; tokens [B]: the token each feeds."""
    b = len(tokens)
    ctx = int(cache_lens.max()) + 1
    arange = np.arange(b)
    mask = np.arange(ctx)[None, None, :] <= cache_lens[:, None, None]  # [B, 1, ctx]

    def as_tensor(values):
        return torch.as_tensor(values, dtype=torch.int64, device=device)

    return ForwardBatch(
        token_ids=as_tensor(np.asarray(tokens, dtype=np.int64)),
        positions=as_tensor(cache_lens),
        write_slots=as_tensor(slot_lo + arange),
        write_pos=as_tensor(cache_lens),
        padded_index=as_tensor(arange),
        attn_mask=torch.from_numpy(mask).to(device).unsqueeze(1),
        logit_rows=as_tensor(arange),
        logit_counts=[1] * b,
        slot_lo=slot_lo,
        num_seqs=b,
        max_new=1,
        ctx=ctx,
        is_decode=True,
    )
