"""The suffix drafter in Python and numpy: the reference the compiled core (drafters/csrc/suffix_core.h) is held to.

drafters/suffix.py describes the algorithm and runs it compiled; this is the same algorithm written for reading,
registered as `suffix_reference`, ~50x slower. The tests compare the two draft for draft (token ids, parents,
probabilities), so where an order could be left to chance it is fixed here and in the core alike:
- siblings are read in the order they began (a dict, not a set, whose order would follow string hashing);
- the prompt's earlier rollouts are read one version at a time, versions in the order of their oldest kept rollout;
- the global window's matches form one source per recency value, ascending, each newest first;
- recency is `decay ** age` by Python's float pow (the C library's), never numpy's vectorised power, and the weight
  of a match length likewise (drafters/matching.py: match_weights);
- the global index stores versions modulo 2**16 and reads back their age (token_index.py: wrap16);
- a token's probability is exp of its logprob by the C library's exp (`token_probs`);
- candidates tie by weight in source order, tree nodes by path probability in push order (matching.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from drafters.base import BaseDrafter, Draft, register_drafter
from drafters.matching import Candidates, build_draft, match_in_array
from drafters.suffix import suffix_options
from drafters.token_index import TokenIndex, wrap16
from rollout.history import prompt_key


def token_probs(logprobs) -> np.ndarray:
    """[n] float32: exp of each logprob, rounded to float32 first, computed in double by the C library's exp
    (math.exp) and rounded to float32. The compiled core computes exactly this; numpy's vectorised float32 exp
    rounds differently in the last bit on some CPUs."""
    return np.array([math.exp(x) for x in np.asarray(logprobs, dtype=np.float32).tolist()], dtype=np.float32)


class _Seq:
    """A growing prompt + output array, with the policy's probability of each output token (NaN: unknown)."""

    def __init__(self, prompt: np.ndarray):
        capacity = max(64, 2 * len(prompt))
        self.data = np.empty(capacity, dtype=np.int32)
        self.probs = np.full(capacity, np.nan, dtype=np.float32)
        self.data[: len(prompt)] = prompt
        self.n = len(prompt)
        self.prompt_len = len(prompt)

    def extend(self, tokens, logprobs=None) -> None:
        tokens = np.asarray(tokens, dtype=np.int32)
        need = self.n + len(tokens)
        if need > len(self.data):
            size = max(need, 2 * len(self.data))
            data, probs = np.empty(size, dtype=np.int32), np.full(size, np.nan, dtype=np.float32)
            data[: self.n], probs[: self.n] = self.data[: self.n], self.probs[: self.n]
            self.data, self.probs = data, probs
        self.data[self.n : need] = tokens
        if logprobs is not None and len(logprobs) == len(tokens):
            self.probs[self.n : need] = token_probs(logprobs)
        self.n = need

    @property
    def view(self) -> np.ndarray:
        return self.data[: self.n]


@dataclass
class _Request:
    seq: _Seq
    group: str
    key: str  # prompt key
    alive: bool = True


class _InflightIndex:
    """Which in-flight outputs (of every group) have continued the last three tokens, newest first.

    In-flight sequences grow in place, so they cannot live in the flat TokenIndex; entries are (request, position)
    under the key of the three tokens before the position. Ended requests are skipped and swept at refresh.
    """

    def __init__(self, max_match: int):
        self.entries: dict[tuple[int, int, int], list[tuple[_Request, int]]] = {}
        self.max_match = max_match

    def add(self, req: _Request, start: int) -> None:
        """Index positions [start, n) of the request's output; each becomes a continuation start."""
        seq = req.seq
        data = seq.data
        for p in range(max(start, seq.prompt_len, 3), seq.n):
            key = (int(data[p - 3]), int(data[p - 2]), int(data[p - 1]))
            self.entries.setdefault(key, []).append((req, p))

    def query(self, context: np.ndarray, exclude_group: str, max_walk: int) -> list[tuple[_Request, int, int]]:
        """(request, start, match length >= 3) of live entries matching the context's tail, newest first."""
        if len(context) < 3:
            return []
        found = self.entries.get((int(context[-3]), int(context[-2]), int(context[-1])))
        if not found:
            return []
        picked = []
        for req, p in reversed(found):
            if req.alive and req.group != exclude_group:
                picked.append((req, p))
                if len(picked) == max_walk:
                    break
        if not picked:
            return []
        width = min(self.max_match, len(context))
        windows = np.full((len(picked), width), -2, dtype=np.int64)  # -2 never equals a token
        for i, (req, p) in enumerate(picked):
            lo = max(0, p - width)
            windows[i, width - (p - lo) :] = req.seq.data[lo:p]
        same = windows[:, ::-1] == context[-width:][::-1]  # [E, width], column d: d + 1 tokens back
        lens = np.where(same.all(1), width, same.argmin(1))
        return [(req, p, int(n)) for (req, p), n in zip(picked, lens.tolist())]

    def sweep(self) -> None:
        self.entries = {k: kept for k, v in self.entries.items() if (kept := [e for e in v if e[0].alive])}


class _PromptStore:
    """Finished rollouts of one prompt, kept for its group and scanned as one array per policy version.

    A prompt holds up to max_rollouts_per_prompt rollouts (G samples x the window's versions) and a scan of a small
    array costs mostly its call overhead, so rollouts of one version are laid end to end and scanned at once. Each
    is kept as the last `tail` tokens of its prompt (a match may reach back into the prompt, as far as a match is
    ever counted), its output, and a separator (-1, which no context token equals, so matches and continuations stop
    there); continuations may start only inside outputs.
    """

    def __init__(self, max_rollouts: int, tail: int):
        self.rollouts: deque[tuple[np.ndarray, np.ndarray, int, int]] = deque(maxlen=max_rollouts)
        self.tail = tail
        self._flat: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] | None = None

    def append(self, tokens: np.ndarray, probs: np.ndarray, prompt_len: int, version: int) -> None:
        """A finished rollout: prompt + output tokens, the policy's probability of each (NaN: unknown)."""
        lo = prompt_len - min(self.tail, prompt_len)
        self.rollouts.append((tokens[lo:], probs[lo:], prompt_len - lo, int(version)))
        self._flat = None

    def flat(self) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(version, tokens [N], probs [N], allowed starts [N] bool) per version, rebuilt after an append."""
        if self._flat is None:
            parts: dict[int, list[tuple[np.ndarray, np.ndarray, int]]] = {}
            for tokens, probs, skip, version in self.rollouts:
                if len(tokens) > skip:
                    parts.setdefault(version, []).append((tokens, probs, skip))
            self._flat = []
            separator, unknown = np.full(1, -1, np.int32), np.full(1, np.nan, np.float32)
            for version, pieces in parts.items():
                arrays, prob_arrays, masks = [], [], []
                for tokens, probs, skip in pieces:
                    arrays += [tokens, separator]
                    prob_arrays += [probs, unknown]
                    mask = np.zeros(len(tokens) + 1, dtype=bool)
                    mask[skip : len(tokens)] = True
                    masks.append(mask)
                self._flat.append((version, np.concatenate(arrays), np.concatenate(prob_arrays), np.concatenate(masks)))
        return self._flat

    @property
    def nbytes(self) -> int:
        kept = sum(t.nbytes + p.nbytes for t, p, _, _ in self.rollouts)
        return kept + sum(t.nbytes + p.nbytes + m.nbytes for _, t, p, m in self._flat or ())


@register_drafter("suffix_reference")
class SuffixReferenceDrafter(BaseDrafter):
    def __init__(self, **options):
        cfg = self.cfg = suffix_options(options)
        self.version = 0
        self.requests: dict[str, _Request] = {}
        self.groups: dict[str, dict[str, None]] = {}  # group -> in-flight request ids, in the order they began
        self.by_prompt: dict[str, _PromptStore] = {}  # prompt key -> its finished rollouts
        self.global_index = TokenIndex(max_tokens=cfg.global_max_tokens)
        self.inflight = _InflightIndex(cfg.tree.max_match)

    # ------------------------------------------------------------------ lifecycle

    def begin(self, request_id, prompt_ids, group):
        if request_id in self.requests:
            raise ValueError(f"suffix drafter: request {request_id!r} began twice (end it first)")
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        key = prompt_key(prompt)
        g = key if group is None else str(group)
        self.requests[request_id] = _Request(_Seq(prompt), g, key)
        self.groups.setdefault(g, {})[request_id] = None

    def observe(self, request_id, token_ids, logprobs=None):
        if token_ids:
            req = self.requests[request_id]
            start = req.seq.n
            req.seq.extend(token_ids, logprobs)
            self.inflight.add(req, start)

    def end(self, request_id):
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        req.alive = False
        members = self.groups.get(req.group)
        if members is not None:
            members.pop(request_id, None)
            if not members:
                del self.groups[req.group]
        seq = req.seq
        if seq.n > seq.prompt_len:
            self._remember(req.key, seq.view.copy(), seq.probs[: seq.n].copy(), seq.prompt_len, self.version)

    def _remember(self, key: str, tokens: np.ndarray, probs: np.ndarray, prompt_len: int, version: int) -> None:
        self._store(key).append(tokens, probs, prompt_len, version)
        tail = min(self.cfg.prompt_tail, prompt_len)
        self.global_index.add(tokens[prompt_len - tail :], version, tail, probs[prompt_len - tail :])

    def refresh(self, history, policy_version: int) -> None:
        """Rebuild the per-prompt store and the global window from the history's newest versions."""
        self.version = int(policy_version)
        self.inflight.sweep()
        if history is None:
            return
        table = history.window(self.cfg.window_versions) if hasattr(history, "window") else history
        self.by_prompt.clear()
        sequences = []
        columns = table.select(["prompt_key", "policy_version", "prompt_ids", "token_ids", "logprobs"]).to_pydict()
        for key, version, prompt, output, logprobs in zip(
            columns["prompt_key"],
            columns["policy_version"],
            columns["prompt_ids"],
            columns["token_ids"],
            columns["logprobs"],
        ):
            if not output:
                continue
            tokens = np.asarray(prompt + output, dtype=np.int32)
            probs = np.full(len(tokens), np.nan, dtype=np.float32)
            if logprobs and len(logprobs) == len(output):
                probs[len(prompt) :] = token_probs(logprobs)
            self._store(key).append(tokens, probs, len(prompt), int(version))
            tail = min(self.cfg.prompt_tail, len(prompt))
            sequences.append((tokens[len(prompt) - tail :], int(version), tail, probs[len(prompt) - tail :]))
        self.global_index.build(sequences)

    def _store(self, key: str) -> _PromptStore:
        store = self.by_prompt.get(key)
        if store is None:
            store = self.by_prompt[key] = _PromptStore(self.cfg.max_rollouts_per_prompt, self.cfg.tree.max_match)
        return store

    # ------------------------------------------------------------------ drafting

    def _recency(self, version: int) -> float:
        return self.cfg.decay ** max(0, self.version - version)

    def _global_recency(self, stored_version: int) -> float:
        """Recency of a global-window match, from the version as the index stores it (mod 2**16)."""
        return self.cfg.decay ** max(0, wrap16(self.version - stored_version))

    def propose(self, request_id, max_tokens):
        if max_tokens <= 0:
            return Draft([])
        cfg = self.cfg
        req = self.requests[request_id]
        context = req.seq.view
        max_match = cfg.tree.max_match
        sources: list[Candidates] = []

        def add(array, probs, n: int, min_start: int, min_match: int, weight: float, allowed=None) -> None:
            starts, lens = match_in_array(array, n, context, min_start, min_match, max_match, allowed)
            if len(starts):
                sources.append(Candidates(array, starts, lens, weight, n, probs))

        # The group: siblings in flight, then finished rollouts of this prompt (their own prompts are skipped:
        # the request's own prompt already covers them).
        for sid in self.groups.get(req.group, ()):
            if sid != request_id:
                sib = self.requests[sid].seq
                add(sib.data, sib.probs, sib.n, sib.prompt_len, cfg.min_match_group, cfg.group_weight)
        store = self.by_prompt.get(req.key)
        for version, tokens, probs, allowed in store.flat() if store is not None else ():
            weight = cfg.group_weight * self._recency(version)
            add(tokens, probs, len(tokens), 1, cfg.min_match_group, weight, allowed)
        # The request itself: prompt lookup and repetition.
        add(context, req.seq.probs, len(context), 1, cfg.min_match_self, cfg.self_weight)
        # Other groups in flight.
        for other, start, n in self.inflight.query(context, req.group, cfg.max_walk):
            if n >= cfg.min_match_global:
                seq = other.seq
                sources.append(
                    Candidates(seq.data, np.array([start]), np.array([n]), cfg.global_weight, seq.n, seq.probs)
                )
        # The global window.
        starts, lens, versions = self.global_index.query(context, cfg.min_match_global, max_match, cfg.max_walk)
        if len(starts):
            recency = np.array([self._global_recency(v) for v in versions.tolist()])
            for decay_value in np.unique(recency):
                pick = recency == decay_value
                sources.append(
                    Candidates(
                        self.global_index.tokens.view,
                        starts[pick],
                        lens[pick],
                        cfg.global_weight * float(decay_value),
                        self.global_index.tokens.n,
                        self.global_index.probs.view,
                    )
                )
        return build_draft(sources, max_tokens, cfg.tree)

    # ------------------------------------------------------------------ introspection

    @property
    def nbytes(self) -> int:
        stored = sum(store.nbytes for store in self.by_prompt.values())
        return self.global_index.nbytes + stored

    def check_integrity(self) -> None:
        self.global_index.check_integrity()
        for g, members in self.groups.items():
            assert members, f"group {g} is empty but kept"
            for rid in members:
                assert self.requests[rid].group == g
        for rid, req in self.requests.items():
            assert rid in self.groups[req.group]
            assert req.seq.prompt_len <= req.seq.n
