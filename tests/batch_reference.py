"""The per-sequence construction of a forward batch, kept as the reference for rollout/engine/batch.py's
vectorised build_batch (tests/test_batch.py holds them equal, field by field)."""

from __future__ import annotations

import numpy as np
import torch

from rollout.engine.batch import (
    ForwardBatch,
    SeqInput,
    _length_classes,
    _ragged_split,
    _split_pays,
    tree_ancestors,
    tree_depths,
)


def build_batch_reference(seqs: list[SeqInput], slot_lo: int, device: torch.device | str = "cpu") -> ForwardBatch:
    """build_batch as it was first written, one sequence at a time: the reference the vectorised one must equal."""
    if not seqs:
        raise ValueError("a forward needs at least one sequence")
    b = len(seqs)
    lengths = [len(s.tokens) for s in seqs]
    if min(lengths) < 1:
        raise ValueError("every sequence in a forward needs at least one new token")
    t_max = max(lengths)
    ctx = max(s.cache_len + n for s, n in zip(seqs, lengths))

    tokens, positions, write_slots, write_pos, padded, logit_rows, logit_counts = [], [], [], [], [], [], []
    mask = np.zeros((b, t_max, ctx), dtype=bool)
    offset = 0
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        if s.parents is None:
            depths = list(range(n))
            anc = np.tri(n, dtype=bool)
        else:
            if len(s.parents) != n:
                raise ValueError(f"sequence {i}: {len(s.parents)} parents for {n} new tokens")
            depths = tree_depths(s.parents)
            anc = tree_ancestors(s.parents)
        tokens.extend(s.tokens)
        positions.extend(s.cache_len + d for d in depths)
        write_slots.extend([slot_lo + i] * n)
        write_pos.extend(range(s.cache_len, s.cache_len + n))
        padded.extend(range(i * t_max, i * t_max + n))
        mask[i, :n, : s.cache_len] = True
        mask[i, :n, s.cache_len : s.cache_len + n] = anc
        # Padding rows attend to one position so their softmax stays finite; their outputs are dropped.
        mask[i, n:, 0] = True
        logit_rows.extend(range(offset + s.logits_from, offset + n))
        logit_counts.append(n - s.logits_from)
        offset += n

    def as_tensor(values, dtype=torch.int64):
        return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)

    # Equal counts pad nothing: one call. Otherwise split where the padding would cost more than the split's extra
    # calls and copies: a few long drafts (or a prompt) beside many short ones.
    split = None
    if min(lengths) < t_max:
        classes = _length_classes(lengths)
        if _split_pays(lengths, classes):
            split = _ragged_split(seqs, lengths, classes, mask, as_tensor, device)

    return ForwardBatch(
        token_ids=as_tensor(tokens),
        positions=as_tensor(positions),
        write_slots=as_tensor(write_slots),
        write_pos=as_tensor(write_pos),
        padded_index=as_tensor(padded),
        attn_mask=torch.from_numpy(mask).to(device).unsqueeze(1),
        logit_rows=as_tensor(logit_rows),
        logit_counts=logit_counts,
        slot_lo=slot_lo,
        num_seqs=b,
        max_new=t_max,
        ctx=ctx,
        is_decode=t_max == 1,
        split=split,
    )
