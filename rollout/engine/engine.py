"""The embedded engine: continuous batching with speculative verification.

One step:  admit waiting requests into free slots (Scheduler) -> for each forward's sequences, a plan of what each
verifies (Speculator: drafter + budget) -> build the batch, run the target, verify, commit (Runner) -> the outcome
back to the speculator -> release finished slots. The contract callers see (validation, ids and seeds, the
history, generate, weight updates, plain decoding) is rollout/frontend.py's, shared with the vLLM backend.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping
from typing import Sequence as Seq

import torch

from drafters.base import Drafter, NoDrafter, bind_target, make_drafter, wanted_top_logprobs
from drafters.reference import ReferenceDrafter
from rollout.budget import Budget, parse_budget
from rollout.checkpoint import resolve_model
from rollout.config import EngineConfig, HistoryConfig, SpeculationConfig
from rollout.drafter_health import drafter_name
from rollout.engine.cost_probe import cost_model_file, measure_cost_model
from rollout.engine.model import TargetModel
from rollout.engine.runner import Runner
from rollout.engine.scheduler import Scheduler
from rollout.engine.sequence import Sequence
from rollout.engine.speculator import Speculator, StepPlan
from rollout.frontend import SMALL_BATCH, EngineFrontend, Request
from rollout.result import RolloutResult
from rollout.sampling import MAX_TOP_LOGPROBS


class Engine(EngineFrontend):
    max_top_logprobs = MAX_TOP_LOGPROBS  # the runner keeps any request's top-N of the rows it samples from

    def __init__(
        self,
        model: TargetModel,
        config: EngineConfig | None = None,
        drafter: Drafter | None = None,
        budget: Budget | None = None,
        max_draft_tokens: int = 16,
        history: HistoryConfig | None = None,
    ):
        self.config = config or EngineConfig()
        self.model = model
        self.drafter: Drafter = drafter if drafter is not None else NoDrafter()
        self.budget: Budget = budget if budget is not None else parse_budget("fixed:4")
        max_model_len = min(self.config.max_model_len, model.max_model_len)
        shape, top = model.shape, wanted_top_logprobs(self.drafter)
        super().__init__(shape.architecture, shape.vocab_size, max_model_len, self.config.seed, history, top)
        eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        cache = model.new_cache(self.config.max_num_seqs)
        self.scheduler = Scheduler(cache, self.config.max_num_seqs, self.config.share_prompts)
        self.speculator = Speculator(self.drafter, self.budget, max_draft_tokens, self.vocab_size)
        self.runner = Runner(model, cache, self.top_logprobs)
        self.drafter_health.drafter = drafter_name(self.drafter)
        self._start()

    @classmethod
    def from_config(
        cls,
        config: EngineConfig | None = None,
        speculation: SpeculationConfig | None = None,
        history: HistoryConfig | None = None,
        log=lambda s: None,
    ) -> "Engine":
        config = config or EngineConfig()
        speculation = speculation or SpeculationConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        folder = resolve_model(config.model, log=log)
        model = TargetModel.from_folder(
            folder, config.max_model_len, config.dtype, config.device, tune=config.tune_matmul, matmul=config.matmul
        )
        drafter = bind_target(make_drafter(speculation.drafter, **speculation.drafter_options), str(folder))
        budget = parse_budget(
            speculation.budget,
            cost=lambda: measure_cost_model(model, config.max_num_seqs, cost_model_file(folder, config), log=log),
            max_nodes=speculation.max_draft_tokens,
        )
        return cls(model, config, drafter, budget, speculation.max_draft_tokens, history)

    @property
    def waiting(self) -> list[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def _drafting(self) -> bool:
        """Whether requests in flight are drafted and seen by the drafter: speculating, with a drafter to ask."""
        return self.speculating and self.speculator.active

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RolloutResult]:
        """Advance every running sequence by one verification; returns the requests that finished."""
        admitted = self.scheduler.admit()
        batch = len(self.running)
        speculating = self._drafting
        if speculating:
            self.speculator.begin(admitted)
        finished: list[Sequence] = []
        step_started = time.perf_counter()
        for seqs, slot_lo in self.scheduler.batches():
            started = time.perf_counter()
            plan = self.speculator.plan(seqs, len(self.waiting)) if speculating else StepPlan.plain(len(seqs))
            outcome = self.runner.run(seqs, slot_lo, plan.drafts, keep_top=self.speculating)
            self.total_forwards += 1
            if speculating:
                self.speculator.learn(seqs, plan, outcome, time.perf_counter() - started)
            finished += outcome.finished
        released = self._release(finished)
        seconds = time.perf_counter() - step_started
        self.step_seconds += seconds
        if batch <= SMALL_BATCH:
            self.small_batch_seconds += seconds
        return released

    @contextmanager
    def oracle(self, references: Mapping[str, Seq[int]]) -> Iterator[None]:
        self.require_idle("an oracle run starts")
        own = self.speculator
        drafter = ReferenceDrafter(by_request=references, certainty=1.0)
        self.speculator = Speculator(drafter, copy.deepcopy(self.budget), own.max_draft_tokens, self.vocab_size)
        self.recording = False
        try:
            yield
        finally:
            for rid in list(self.in_flight):  # left by an exception: they must not run on under the oracle
                self.abort(rid)
            self.speculator, self.recording = own, True

    def _release(self, finished: list[Sequence]) -> list[RolloutResult]:
        self.scheduler.release(finished)
        if self._drafting:
            for s in finished:
                self.speculator.end(s)
        return self._finish([s.result(self.policy_version) for s in finished])

    # ------------------------------------------------------------------ the frontend's hooks

    def _submit(self, request: Request) -> None:
        self.scheduler.add(Sequence.start(request, self.eos_ids, self.max_model_len))

    def _abort(self, request_id: str) -> RolloutResult:
        seq = self.scheduler.remove_waiting(request_id)
        if seq is None:  # running: its slot is freed like a finished one's
            seq = self.scheduler.find_running(request_id)
            self.scheduler.release([seq])
            if self._drafting:
                self.speculator.end(seq)
        seq.finish_reason = "abort"
        return seq.result(self.policy_version)

    def _load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        self.model.load_weights(named_tensors, strict=True)
        self.scheduler.clear_kept()  # keys/values of the old weights (left by aborted requests)

    def _refresh_drafter(self) -> None:
        self.speculator.refresh(self.history, self.policy_version)
