"""What a finished request returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


def count_positions(drafted_per_position: list[int], accepted_per_position: list[int], depths: int, accepted: int):
    """One verification: depths 1..`depths` had a draft node, depths 1..`accepted` had one accepted (lists grow)."""
    for counts, upto in ((drafted_per_position, depths), (accepted_per_position, accepted)):
        if len(counts) < upto:
            counts.extend([0] * (upto - len(counts)))
        for d in range(upto):
            counts[d] += 1


@dataclass
class SpecStats:
    """Speculation counters of one request (or, summed, of many)."""

    drafted: int = 0  # draft tokens sent to the target for verification
    accepted: int = 0  # of those, accepted
    target_forwards: int = 0  # forwards of the target this request took part in (prefill included)
    drafted_per_position: list[int] = field(default_factory=list)  # [d]: steps with a draft node at depth d + 1
    accepted_per_position: list[int] = field(default_factory=list)  # [d]: steps that accepted a token at depth d + 1

    def record(self, depths_drafted: int, accepted: int, drafted: int) -> None:
        self.target_forwards += 1
        if not drafted:  # a plain step: nothing drafted, nothing accepted
            return
        self.drafted += drafted
        self.accepted += accepted
        count_positions(self.drafted_per_position, self.accepted_per_position, depths_drafted, accepted)

    def merge(self, other: "SpecStats") -> "SpecStats":
        out = SpecStats(
            self.drafted + other.drafted, self.accepted + other.accepted, self.target_forwards + other.target_forwards
        )
        for name in ("drafted_per_position", "accepted_per_position"):
            a, b = getattr(self, name), getattr(other, name)
            setattr(out, name, [x + y for x, y in zip(a + [0] * (len(b) - len(a)), b + [0] * (len(a) - len(b)))])
        return out

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RolloutResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, a stop token included when one ended the sequence
    logprobs: list[float]  # log p(token) under the processed distribution, one per generated token
    finish_reason: str  # "stop" | "length" | "abort"
    spec: SpecStats
    group: str | None = None
    policy_version: int = 0
    worker: int | None = None  # which engine replica generated it (set by the Ray service)
    # The target's k most likely tokens at each generated position and their logprobs (processed distribution),
    # likeliest first, as [len(token_ids)][k]. Two readers with their own k: the history, for a drafter that learns
    # from them (Drafter.top_logprobs), and the caller, for a request that asks (SamplingParams.top_logprobs). Each
    # gets its own columns (with_top); a caller that did not ask gets None, since k tokens per token would multiply
    # what travels to the trainer.
    top_token_ids: list[list[int]] | None = field(default=None, repr=False)
    top_logprobs: list[list[float]] | None = field(default=None, repr=False)

    def with_top(self, k: int) -> "RolloutResult":
        """This result with only the first k top logprobs per position (none when k is 0)."""
        if not k or self.top_token_ids is None:
            return self.without_top()
        if all(len(row) <= k for row in self.top_token_ids):
            return self
        return replace(
            self,
            top_token_ids=[row[:k] for row in self.top_token_ids],
            top_logprobs=[row[:k] for row in self.top_logprobs],
        )

    def without_top(self) -> "RolloutResult":
        if self.top_token_ids is None and self.top_logprobs is None:
            return self
        return replace(self, top_token_ids=None, top_logprobs=None)

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per target forward: the acceptance length, bonus token included."""
        return len(self.token_ids) / self.spec.target_forwards if self.spec.target_forwards else 0.0
