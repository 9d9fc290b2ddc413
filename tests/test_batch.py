"""The vectorised batch builder against the per-sequence reference: every field equal, on random batches of
prefills, decodes, chains and trees (ragged ones included, so the split attention layout is compared too)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from batch_reference import build_batch_reference

from rollout.engine.batch import SeqInput, build_batch, build_decode_batch


def random_tree(rng: random.Random, n: int) -> list[int]:
    return [-1] + [rng.randrange(-1, i) for i in range(1, n)] if n else []


def random_batch(rng: random.Random) -> list[SeqInput]:
    seqs = []
    for _ in range(rng.randint(1, 12)):
        cache_len = rng.choice([0, rng.randint(1, 40)])
        pending = rng.randint(2, 9) if cache_len == 0 else 1
        nodes = rng.choice([0, 0, rng.randint(1, 8), rng.randint(1, 20)])
        tokens = [rng.randrange(384) for _ in range(pending + nodes)]
        parents = None
        if nodes and rng.random() < 0.5:
            tree = random_tree(rng, nodes)
            parents = list(range(-1, pending - 1)) + [pending - 1 if q < 0 else pending + q for q in tree]
        seqs.append(SeqInput(cache_len, tokens, parents, pending - 1))
    return seqs


def assert_same(got, want) -> None:
    for name in want.__dataclass_fields__:
        a, b = getattr(got, name), getattr(want, name)
        if name == "split":
            assert (a is None) == (b is None)
            if b is None:
                continue
            assert torch.equal(a.first_rows, b.first_rows) and torch.equal(a.first_mask, b.first_mask)
            assert len(a.groups) == len(b.groups)
            for ga, gb in zip(a.groups, b.groups):
                for f in gb.__dataclass_fields__:
                    x, y = getattr(ga, f), getattr(gb, f)
                    assert torch.equal(x, y) if isinstance(y, torch.Tensor) else x == y, f"split.{f}"
        elif isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        else:
            assert a == b, name


@pytest.mark.parametrize("seed", range(40))
def test_vectorised_build_batch_equals_reference(seed):
    rng = random.Random(seed)
    seqs = random_batch(rng)
    slot_lo = rng.randint(0, 5)
    assert_same(build_batch(seqs, slot_lo), build_batch_reference(seqs, slot_lo))


def test_build_batch_refuses_what_the_reference_refuses():
    with pytest.raises(ValueError, match="at least one sequence"):
        build_batch([], 0)
    with pytest.raises(ValueError, match="at least one new token"):
        build_batch([SeqInput(3, [], None, 0)], 0)
    with pytest.raises(ValueError, match="2 parents for 3 new tokens"):
        build_batch([SeqInput(3, [1, 2, 3], [-1, 0], 0)], 0)
    with pytest.raises(ValueError, match="must be -1 or an earlier token"):
        build_batch([SeqInput(3, [1, 2, 3], [-1, 2, 0], 0)], 0)


@pytest.mark.parametrize("seed", range(10))
def test_decode_batch_equals_reference(seed):
    rng = random.Random(seed)
    cache_lens = [rng.randint(1, 60) for _ in range(rng.randint(1, 70))]
    tokens = [rng.randrange(384) for _ in cache_lens]
    slot_lo = rng.randint(0, 5)
    want = build_batch_reference([SeqInput(c, [t], None, 0) for c, t in zip(cache_lens, tokens)], slot_lo)
    assert_same(build_decode_batch(np.asarray(cache_lens, dtype=np.int64), tokens, slot_lo), want)
