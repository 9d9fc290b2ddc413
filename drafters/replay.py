"""Offline replay of recorded rollouts through a drafter: acceptance without running the model.

The trace is replayed version by version, as training produced it: before each policy version the drafter is
refreshed with the history of the versions before it; then all rollouts of that version are in flight together,
advancing in lockstep as the engine would run them: every sequence proposes a draft, the draft is checked against
what the policy actually sampled, the accepted tokens plus one more (the target's own next token) are emitted and
observed. Siblings therefore see each other's tokens as soon as they are generated.

Exact-match acceptance of a recorded *sampled* trace is an unbiased estimate of lossless acceptance: with a
deterministic draft, speculative sampling accepts a drafted token x with probability p(x), which is exactly the
probability that the policy samples x. (Several candidates at a node: accepted iff the sample is one of them.)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from drafters.base import Draft, Drafter, propose_all
from rollout.history import RolloutHistory, older_than


@dataclass
class ReplayStats:
    drafter: str
    sequences: int = 0
    tokens: int = 0
    sequence_steps: int = 0  # target forwards summed over sequences
    batch_steps: int = 0  # lockstep forwards of the whole in-flight batch
    drafted: int = 0
    accepted: int = 0
    propose_seconds: float = 0.0
    observe_seconds: float = 0.0
    # Host time of drafting (propose + observe) per sequence per step, in µs: a batched call's time is shared
    # equally by the sequences it served, a per-request call's is its own.
    host_us: list[float] = field(default_factory=list, repr=False)
    per_version: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def acceptance_length(self) -> float:
        """Tokens emitted per target forward of a sequence, the bonus token included."""
        return self.tokens / self.sequence_steps if self.sequence_steps else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens emitted per batched forward (all sequences of a version in flight together)."""
        return self.tokens / self.batch_steps if self.batch_steps else 0.0

    @property
    def rejected(self) -> int:
        return self.drafted - self.accepted

    @property
    def draft_us_per_token(self) -> float:
        """Drafting time (propose + observe) per emitted token."""
        return 1e6 * (self.propose_seconds + self.observe_seconds) / self.tokens if self.tokens else 0.0

    def host_us_percentile(self, q: float) -> float:
        return float(np.percentile(self.host_us, q)) if self.host_us else 0.0

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("host_us", "per_version")}
        out.update(
            acceptance_length=round(self.acceptance_length, 4),
            tokens_per_forward=round(self.tokens_per_forward, 4),
            rejected=self.rejected,
            draft_us_per_token=round(self.draft_us_per_token, 2),
            host_us_per_seq_step_p50=round(self.host_us_percentile(50), 2),
            host_us_per_seq_step_p99=round(self.host_us_percentile(99), 2),
            per_version=self.per_version,
        )
        return out


def accepted_path(draft: Draft, actual: list[int], pos: int) -> list[int]:
    """The draft nodes verification keeps (indices, root first) when the policy's tokens from `pos` on are
    `actual[pos:]`."""
    path: list[int] = []
    cur = -1
    for i, (t, p) in enumerate(zip(draft.token_ids, draft.node_parents)):
        if p == cur and pos + len(path) < len(actual) and t == actual[pos + len(path)]:
            cur = i
            path.append(i)
    return path


def accepted_length(draft: Draft, actual: list[int], pos: int) -> int:
    """How many draft tokens verification keeps when the policy's tokens from `pos` on are `actual[pos:]`."""
    return len(accepted_path(draft, actual, pos))


def _timed(batched: bool, run_batch: Callable[[], list], run_one: Callable[[int], Any], n: int):
    """A step's calls for n sequences, batched (one call, its time shared by the sequences it served) or one per
    sequence, as the drafter offers them: (results per sequence, seconds per sequence)."""
    if batched:
        t0 = time.perf_counter()
        results = run_batch()
        return results, [(time.perf_counter() - t0) / n] * n
    results, seconds = [], []
    for i in range(n):
        t0 = time.perf_counter()
        results.append(run_one(i))
        seconds.append(time.perf_counter() - t0)
    return results, seconds


def replay(
    trace: RolloutHistory | pa.Table,
    drafter: Drafter,
    max_draft_tokens: int = 8,
    name: str = "",
    refresh: bool = True,
    warm: pa.Table | None = None,
) -> ReplayStats:
    """`warm`: earlier rollouts the history holds before the trace's first version (as history.warm_start loads
    them: renumbered to be older than the trace)."""
    table = trace.table() if isinstance(trace, RolloutHistory) else trace
    stats = ReplayStats(drafter=name or type(drafter).__name__)
    history = RolloutHistory()
    columns = table.to_pydict()
    versions = sorted(set(columns["policy_version"]))
    if warm is not None and versions:
        history.append(older_than(warm, versions[0]))
    for version in versions:
        rows = [i for i, v in enumerate(columns["policy_version"]) if v == version]
        if refresh:
            drafter.refresh(history, version)
        before = (stats.tokens, stats.sequence_steps, stats.batch_steps, stats.drafted, stats.accepted)
        ids = [f"v{version}-{columns['request_id'][i] or i}" for i in rows]
        outputs = [list(columns["token_ids"][i]) for i in rows]
        logprobs = [list(columns["logprobs"][i] or []) for i in rows]
        for rid, i in zip(ids, rows):
            drafter.begin(rid, list(columns["prompt_ids"][i]), columns["group"][i])
        pos = [0] * len(rows)
        active = [j for j in range(len(rows)) if outputs[j]]
        for j in range(len(rows)):
            if not outputs[j]:
                drafter.end(ids[j])
        while active:
            rooms = [max(0, min(max_draft_tokens, len(outputs[j]) - pos[j] - 1)) for j in active]
            step_ids = [ids[j] for j in active]
            proposed, times = _timed(
                hasattr(drafter, "propose_batch"),
                lambda: propose_all(drafter, step_ids, rooms),
                lambda i: propose_all(drafter, [step_ids[i]], [rooms[i]])[0],
                len(step_ids),
            )
            stats.propose_seconds += sum(times)
            drafts = [d.truncated(room, room) if room > 0 else Draft([]) for d, room in zip(proposed, rooms)]
            stats.batch_steps += 1
            emitted, emitted_lps = [], []
            for j, d in zip(active, drafts):
                n = accepted_length(d, outputs[j], pos[j])
                emitted.append(outputs[j][pos[j] : pos[j] + n + 1])
                emitted_lps.append(logprobs[j][pos[j] : pos[j] + n + 1] or None)
                stats.drafted += len(d)
                stats.accepted += n
                stats.sequence_steps += 1
                stats.tokens += n + 1
                pos[j] += n + 1
            _, observed = _timed(
                hasattr(drafter, "observe_batch"),
                lambda: drafter.observe_batch(step_ids, emitted, emitted_lps),
                lambda i: drafter.observe(step_ids[i], emitted[i], emitted_lps[i]),
                len(step_ids),
            )
            stats.observe_seconds += sum(observed)
            stats.host_us.extend(1e6 * (a + b) for a, b in zip(times, observed))
            still = []
            for j in active:
                if pos[j] >= len(outputs[j]):
                    drafter.end(ids[j])
                else:
                    still.append(j)
            active = still
        stats.sequences += len(rows)
        d_tok, d_seq, d_batch, d_draft, d_acc = (
            a - b
            for a, b in zip(
                (stats.tokens, stats.sequence_steps, stats.batch_steps, stats.drafted, stats.accepted), before
            )
        )
        stats.per_version[int(version)] = {
            "acceptance_length": round(d_tok / d_seq, 4) if d_seq else 0.0,
            "tokens_per_forward": round(d_tok / d_batch, 4) if d_batch else 0.0,
            "drafted": d_draft,
            "accepted": d_acc,
        }
        history.append(table.filter(pa.array([v == version for v in columns["policy_version"]])))
    return stats
