"""A compact index over many stored rollouts: which positions follow a given pair of tokens?

Why this structure rather than a suffix tree or automaton: the global window changes by whole policy versions and
is rebuilt at each refresh, between which it only grows (finished rollouts are appended); what a query needs is
"positions whose preceding tokens equal the context's tail, longest first, newest first". A suffix tree answers
that but costs tens of bytes per token in nodes and hash maps and cannot drop old text; a suffix automaton cannot
delete at all. Here the text is one flat int32 array, each indexable position is chained to the previous position
with the same two preceding tokens (bucketed by hash into a fixed table), and the match is extended backwards with a
vectorised comparison. Memory is 12 bytes per stored token (token, chain link, version, the policy's probability
of the token) plus the bucket table (4 MiB): ~16 MB per million tokens, against the 64 MB budget. Queries walk a
chain newest-first, so recency comes for free; a capped walk bounds the cost of very common pairs. Rebuilding from
arrays is vectorised (a stable argsort of the keys).
"""

from __future__ import annotations

import numpy as np

from drafters.matching import match_lengths

SEP = -1  # between stored sequences; never a token


def wrap16(version: int) -> int:
    """A policy version as the index stores it (int16, modulo 2**16); also turns a difference of two stored versions
    back into an age, which is right while the versions in the index are fewer than 32768 apart."""
    return (int(version) + 2**15) % 2**16 - 2**15


class _Grow:
    """An append-only numpy array that doubles its capacity."""

    def __init__(self, dtype, capacity: int = 1024):
        self.data = np.empty(capacity, dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self.data):
            grown = np.empty(max(need, 2 * len(self.data)), dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : need] = values
        self.n = need

    @property
    def view(self) -> np.ndarray:
        return self.data[: self.n]


class TokenIndex:
    def __init__(self, bucket_bits: int = 20, max_tokens: int | None = None):
        self.bucket_bits = bucket_bits
        self.mask = (1 << bucket_bits) - 1
        self.max_tokens = max_tokens
        self.clear()

    def clear(self) -> None:
        self.tokens = _Grow(np.int32)
        self.versions = _Grow(np.int16)  # policy version mod 2**16 (wrap16) is enough to tell recency within a window
        self.probs = _Grow(np.float16)  # the policy's probability of each token when sampled (NaN: unknown)
        self.prev = _Grow(np.int32)  # previous indexed position with the same bucket, -1 = none
        self.head = np.full(1 << self.bucket_bits, -1, dtype=np.int32)
        self.segments: list[tuple[int, int, int]] = []  # (start, first indexed position, end) per sequence
        self.tokens.extend(np.array([SEP], np.int32))  # position 0 is a separator so every start has a left
        self.versions.extend(np.zeros(1, np.int16))
        self.probs.extend(np.full(1, np.nan, np.float16))
        self.prev.extend(np.array([-1], np.int32))

    def _keys(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        h = a.astype(np.int64) * 1_000_003 + b.astype(np.int64) * 7_919
        return ((h ^ (h >> 17)) & self.mask).astype(np.int64)

    # ------------------------------------------------------------------ writing

    def add(self, tokens, version: int, first_indexed: int = 0, probs=None) -> None:
        """Store one sequence; positions from `first_indexed` on become continuation starts."""
        seq = np.asarray(tokens, dtype=np.int32)
        p = np.full(len(seq), np.nan, np.float16) if probs is None else np.asarray(probs, dtype=np.float16)
        if len(seq) == 0:
            return
        if self.max_tokens is not None and self.num_tokens + len(seq) > self.max_tokens:
            self.evict_oldest(self.num_tokens + len(seq) - self.max_tokens)
        start = self.tokens.n
        self.tokens.extend(np.append(seq, np.int32(SEP)))
        self.versions.extend(np.full(len(seq) + 1, wrap16(version), np.int16))
        self.probs.extend(np.append(p, np.float16(np.nan)))
        self.prev.extend(np.full(len(seq) + 1, -1, np.int32))
        first = start + max(first_indexed, 2)
        end = start + len(seq)
        self.segments.append((start, first, end))
        if first < end:
            positions = np.arange(first, end)
            toks = self.tokens.view
            keys = self._keys(toks[positions - 2], toks[positions - 1])
            prev = self.prev.view
            for p, k in zip(positions.tolist(), keys.tolist()):
                prev[p] = self.head[k]
                self.head[k] = p

    def build(self, sequences: list[tuple]) -> None:
        """Replace the contents with (tokens, version, first_indexed[, probs]) sequences, oldest first, in one pass."""
        self.clear()
        if not sequences:
            return
        if self.max_tokens is not None:
            total, keep = 0, len(sequences)
            for i in range(len(sequences) - 1, -1, -1):
                total += len(sequences[i][0]) + 1
                if total > self.max_tokens:
                    break
                keep = i
            sequences = sequences[keep:]
        parts, vers, probs = [], [], []
        pos = 1
        for toks, version, first_indexed, *rest in sequences:
            toks = np.asarray(toks, dtype=np.int32)
            parts.append(np.append(toks, np.int32(SEP)))
            vers.append(np.full(len(toks) + 1, wrap16(version), np.int16))
            p = rest[0] if rest and rest[0] is not None else np.full(len(toks), np.nan)
            probs.append(np.append(np.asarray(p, dtype=np.float16), np.float16(np.nan)))
            self.segments.append((pos, pos + max(first_indexed, 2), pos + len(toks)))
            pos += len(toks) + 1
        self.tokens.extend(np.concatenate(parts))
        self.versions.extend(np.concatenate(vers))
        self.probs.extend(np.concatenate(probs))
        self.prev.extend(np.full(pos - 1, -1, np.int32))
        starts = np.concatenate([np.arange(f, e) for _, f, e in self.segments if f < e] or [np.empty(0, np.int64)])
        if len(starts) == 0:
            return
        toks = self.tokens.view
        keys = self._keys(toks[starts - 2], toks[starts - 1])
        order = np.lexsort((starts, keys))  # by key, then position
        k_sorted, p_sorted = keys[order], starts[order]
        same = np.empty(len(order), dtype=bool)
        same[0] = False
        same[1:] = k_sorted[1:] == k_sorted[:-1]
        prev = self.prev.view
        prev[p_sorted[1:][same[1:]]] = p_sorted[:-1][same[1:]]
        last = np.append(~same[1:], True)  # the newest position of each key
        self.head[k_sorted[last]] = p_sorted[last]

    def evict_oldest(self, num_tokens: int) -> None:
        """Drop whole sequences, oldest first, until at least num_tokens are freed; rebuilds the index."""
        freed, cut = 0, 0
        while cut < len(self.segments) and freed < num_tokens:
            s, _, e = self.segments[cut]
            freed += e - s + 1
            cut += 1
        toks, vers, probs = self.tokens.view, self.versions.view, self.probs.view
        kept = [(toks[s:e].copy(), int(vers[s]), f - s, probs[s:e].copy()) for s, f, e in self.segments[cut:]]
        self.build(kept)

    # ------------------------------------------------------------------ reading

    @property
    def num_tokens(self) -> int:
        return sum(e - s for s, _, e in self.segments)

    @property
    def nbytes(self) -> int:
        return (
            self.tokens.data.nbytes
            + self.versions.data.nbytes
            + self.probs.data.nbytes
            + self.prev.data.nbytes
            + self.head.nbytes
        )

    def query(
        self, context: np.ndarray, min_match: int = 2, max_match: int = 32, max_walk: int = 256
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, match lengths, versions) of positions following the context's tail, newest first."""
        empty = np.empty(0, np.int64)
        if len(context) < 2 or self.tokens.n <= 1:
            return empty, empty, empty
        p = int(self.head[int(self._keys(context[-2:-1], context[-1:])[0])])
        prev = self.prev.view
        found = []
        while p >= 0 and len(found) < max_walk:
            found.append(p)
            p = int(prev[p])
        if not found:
            return empty, empty, empty
        starts = np.asarray(found, dtype=np.int64)
        lens = match_lengths(self.tokens.view, starts, context, max_match)
        keep = lens >= max(min_match, 2)  # bucket collisions show up as matches shorter than two
        return starts[keep], lens[keep], self.versions.view[starts[keep]].astype(np.int64)

    def check_integrity(self) -> None:
        """Every indexable position sits exactly once in its bucket's chain, chains run newest to oldest."""
        toks, prev = self.tokens.view, self.prev.view
        assert len(toks) == len(prev) == len(self.versions.view) == len(self.probs.view)
        expected = np.concatenate([np.arange(f, e) for _, f, e in self.segments if f < e] or [np.empty(0, np.int64)])
        assert (toks[expected] != SEP).all() and (toks[expected - 1] != SEP).all() and (toks[expected - 2] != SEP).all()
        seen = np.zeros(len(toks), dtype=bool)
        for bucket in np.flatnonzero(self.head >= 0).tolist():
            p, last = int(self.head[bucket]), None
            while p >= 0:
                assert not seen[p], f"position {p} is chained twice"
                assert last is None or p < last, "chains must run from newest to oldest"
                key = int(self._keys(toks[p - 2 : p - 1], toks[p - 1 : p])[0])
                assert key == bucket, f"position {p} is chained under bucket {bucket}, its key is {key}"
                seen[p], last, p = True, p, int(prev[p])
        assert np.array_equal(np.flatnonzero(seen), np.sort(expected)), "indexed positions differ from the segments"
        for (s, f, e), (s2, _, _) in zip(self.segments, self.segments[1:]):
            assert s <= f and e < s2 and toks[e] == SEP
