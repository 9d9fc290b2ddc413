"""One request's state inside the embedded engine, and how emitted tokens are committed to it.

A sequence keeps the invariant cache_len == len(tokens) - 1 between steps: every token but the last sampled one has
its keys/values in the cache; that last one is fed at the next step ahead of the draft. A new request starts with
cache_len 0 and feeds its whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rollout.frontend import Request
from rollout.history import prompt_key
from rollout.result import RolloutResult, SpecStats


@dataclass(eq=False)
class Sequence:
    request: Request
    stop_ids: frozenset[int]
    generator: torch.Generator
    prompt_key: str
    max_tokens: int  # the request's, capped by what the model's length leaves
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    cache_len: int = 0
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # when the engine records the target's top-k: (ids int32, logprobs) [tokens, k] per step, on the host
    top: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    stats: SpecStats = field(default_factory=SpecStats)
    finish_reason: str | None = None
    noise: list[float] = field(default_factory=list)  # u_t for output position t, drawn from `generator` in order

    @classmethod
    def start(cls, request: Request, eos_ids: frozenset[int], max_model_len: int) -> "Sequence":
        params = request.params
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_ids)
        generator = torch.Generator().manual_seed(request.seed)
        room = max_model_len - len(request.prompt)
        return cls(request, stop, generator, prompt_key(request.prompt), min(params.max_tokens, room))

    def __post_init__(self):
        self.tokens = list(self.request.prompt)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def params(self):
        return self.request.params

    def draft_room(self) -> int:
        """The deepest draft node worth verifying this step: the step emits at most this many tokens plus one. (It
        also bounds the node count: the cache holds every node, and max_tokens already leaves room for them.)"""
        return self.max_tokens - len(self.output) - 1

    def uniforms(self, start: int, count: int) -> list[float]:
        """The uniforms of output positions [start, start + count): the same numbers whatever was drafted."""
        while len(self.noise) < start + count:
            self.noise.extend(torch.rand(64, generator=self.generator, dtype=torch.float64).tolist())
        return self.noise[start : start + count]

    def commit(self, emitted: list[int], logprobs: list[float]) -> int:
        """Append emitted tokens up to a stop token or the length limit; returns how many were kept."""
        kept = min(len(emitted), self.max_tokens - len(self.output))
        if self.stop_ids:
            for n in range(kept):
                if emitted[n] in self.stop_ids:
                    kept = n + 1
                    self.finish_reason = "stop"
                    break
        if self.finish_reason is None and len(self.output) + kept >= self.max_tokens:
            self.finish_reason = "length"
        if kept == len(emitted):
            self.output += emitted
            self.tokens += emitted
            self.logprobs += logprobs
        else:
            self.output += emitted[:kept]
            self.tokens += emitted[:kept]
            self.logprobs += logprobs[:kept]
        return kept

    def result(self, policy_version: int) -> RolloutResult:
        return RolloutResult(
            request_id=self.request_id,
            prompt_token_ids=self.prompt,
            token_ids=self.output,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason or "abort",
            spec=self.stats,
            group=self.request.group,
            policy_version=policy_version,
            top_token_ids=torch.cat([i for i, _ in self.top]).tolist() if self.top else None,
            top_logprobs=torch.cat([v for _, v in self.top]).tolist() if self.top else None,
        )
