"""Makespan of recorded RL rollouts under a draft budget on some hardware, without the model.

`simulate(trace, profile, drafter, budget, slots)` replays a trace (rollouts grouped by policy version = RL step,
and by prompt) through the embedded engine's own scheduling and speculation code, with the target's forward
replaced by the recorded tokens and a price:
- each version's rollouts are submitted together to an engine of `slots` KV slots (the real Scheduler: admission,
  prompts shared between siblings, the prefill forward apart from the decodes), stepped until all are done;
- each forward's drafts come from the real drafter and are cut by the real budget (the real Speculator); a draft is
  accepted as far as it matches the recorded tokens (exact-match acceptance of a sampled trace is an unbiased
  estimate of lossless acceptance, drafters/replay.py), and the step emits those tokens plus the next one;
- each step costs the profile's forward (tokens, sequences, context) + its engine host time per sequence + the
  drafting and budget work, timed as it runs here in CPU time of this thread (a loaded machine does not inflate
  it; the drafters and the budget run on one thread); `auto` fits its clock to those simulated seconds.
Before each version the drafter and budget are refreshed from the versions before it, as the RL loop does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from drafters.base import Draft, Drafter
from drafters.replay import accepted_path
from rollout.budget import Budget
from rollout.engine.scheduler import Scheduler
from rollout.engine.sequence import Sequence
from rollout.engine.speculator import Speculator, StepOutcome, StepPlan
from rollout.frontend import SMALL_BATCH, Request
from rollout.history import RolloutHistory, older_than
from rollout.sampling import SamplingParams
from rollout.step_cost import Profile, padded_rows, ragged_sequences


class NullCache:
    """The scheduler's KV moves, for a simulated engine that holds no keys or values."""

    def move_slot(self, src: int, dst: int, length: int) -> None:
        pass

    def load_prefix(self, slot: int, keys, values) -> None:
        pass

    def copy_prefix(self, slot: int, length: int) -> tuple[None, None]:
        return None, None


class TraceRunner:
    """The target's part of a step, read from the trace: what each sequence's draft matches, and the next token."""

    def __init__(self, outputs: dict[str, list[int]], logprobs: dict[str, list[float]]):
        self.outputs = outputs  # request id -> the recorded completion
        self.logprobs = logprobs

    def run(self, seqs: list[Sequence], drafts: list[Draft]) -> StepOutcome:
        paths, next_tokens, committed, committed_lps, finished = [], [], [], [], []
        for s, d in zip(seqs, drafts):
            actual, pos = self.outputs[s.request_id], len(s.output)
            path = accepted_path(d, actual, pos)
            # The accepted nodes plus the target's next token; a draft that runs through the rollout's stop token
            # ends it there (the engine drops the token drawn after a stop).
            emitted = actual[pos : pos + len(path) + 1]
            lps = (self.logprobs[s.request_id][pos : pos + len(emitted)]) or [0.0] * len(emitted)
            kept = s.commit(emitted, lps)
            s.cache_len = len(s.tokens) - 1
            if len(s.output) >= len(actual):  # the recorded rollout ends here (a stop token or its length limit)
                s.finish_reason = s.finish_reason or "stop"
            s.stats.record(max(d.node_depths, default=0), len(path), len(d))
            paths.append(path)
            next_tokens.append(emitted[-1])
            committed.append(emitted[:kept])
            committed_lps.append(lps[:kept])
            if s.finish_reason is not None:
                finished.append(s)
        return StepOutcome(paths, next_tokens, committed, committed_lps, finished)


@dataclass
class VersionReport:
    """One policy version (RL step) simulated: what its rollouts cost."""

    version: int
    sequences: int = 0
    tokens: int = 0
    makespan_s: float = 0.0
    forward_s: float = 0.0  # the profile's forwards and engine host time
    host_s: float = 0.0  # drafting and the budget, timed here
    steps: int = 0
    forwards: int = 0
    sequence_steps: int = 0  # sequences summed over forwards
    small_batch_s: float = 0.0  # of makespan_s, in steps with at most SMALL_BATCH sequences running
    drafted: int = 0
    accepted: int = 0

    def summary(self) -> dict:
        return {
            "version": self.version,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "makespan_s": round(self.makespan_s, 4),
            "forward_s": round(self.forward_s, 4),
            "host_s": round(self.host_s, 4),
            "steps": self.steps,
            "forwards": self.forwards,
            "tokens_per_forward": round(self.tokens / self.forwards, 3) if self.forwards else 0.0,
            "host_us_per_seq_step": round(1e6 * self.host_s / self.sequence_steps, 2) if self.sequence_steps else 0.0,
            "small_batch_share": round(self.small_batch_s / self.makespan_s, 3) if self.makespan_s else 0.0,
            "drafted": self.drafted,
            "accepted": self.accepted,
        }


_TOTALS = (
    "sequences",
    "tokens",
    "makespan_s",
    "forward_s",
    "host_s",
    "steps",
    "forwards",
    "sequence_steps",
    "small_batch_s",
    "drafted",
    "accepted",
)


@dataclass
class SimResult:
    profile: str
    budget: str
    drafter: str
    slots: int
    versions: list[VersionReport] = field(default_factory=list)

    @property
    def makespan_s(self) -> float:
        return sum(v.makespan_s for v in self.versions)

    def summary(self) -> dict:
        total = VersionReport(-1)
        for v in self.versions:
            for k in _TOTALS:
                setattr(total, k, getattr(total, k) + getattr(v, k))
        out = {k: v for k, v in total.summary().items() if k != "version"}
        return {
            "profile": self.profile,
            "budget": self.budget,
            "drafter": self.drafter,
            "slots": self.slots,
            **out,
            "per_version": [v.summary() for v in self.versions],
        }


class SimulatedEngine:
    """The embedded engine's step (rollout/engine/engine.py) with the forward priced by a profile."""

    def __init__(
        self,
        profile: Profile,
        drafter: Drafter,
        budget: Budget,
        slots: int,
        max_draft_tokens: int = 16,
        max_tokens: int | None = None,
    ):
        self.profile = profile
        self.max_tokens = max_tokens
        self.speculator = Speculator(drafter, budget, max_draft_tokens, vocab_size=2**31 - 1)
        self.scheduler = Scheduler(NullCache(), slots, share_prompts=True)

    def run_version(self, version: int, rows: list[dict]) -> VersionReport:
        """Submit the version's rollouts together and step until all are done."""
        report = VersionReport(version, sequences=len(rows))
        runner = TraceRunner(
            {r["request_id"]: list(r["token_ids"]) for r in rows},
            {r["request_id"]: list(r["logprobs"] or []) for r in rows},
        )
        for r in rows:
            if not r["token_ids"]:  # nothing to generate: never enters the engine
                continue
            # The drafts' room follows the request's limit (a rollout that stopped early could have gone on).
            limit = max(len(r["token_ids"]), self.max_tokens or 0)
            params = SamplingParams(max_tokens=limit, temperature=1.0)
            request = Request(r["request_id"], list(r["prompt_ids"]), params, r["group"], seed=0, speculate=True)
            self.scheduler.add(Sequence.start(request, frozenset(), len(r["prompt_ids"]) + limit + 1))
        while self.scheduler.waiting or self.scheduler.running:
            self._step(runner, report)
        return report

    def _step(self, runner: TraceRunner, report: VersionReport) -> None:
        admitted = self.scheduler.admit()
        batch = len(self.scheduler.running)
        started = time.thread_time()
        self.speculator.begin(admitted)
        host = time.thread_time() - started
        finished: list[Sequence] = []
        seconds = 0.0
        for seqs, _ in self.scheduler.batches():
            t0 = time.thread_time()
            plan: StepPlan = self.speculator.plan(seqs, len(self.scheduler.waiting))
            planned = time.thread_time() - t0
            tokens = sum(len(s.tokens) - s.cache_len + len(d) for s, d in zip(seqs, plan.drafts))
            context = sum(s.cache_len for s in seqs)
            outcome = runner.run(seqs, plan.drafts)
            accepted = sum(len(p) for p in outcome.paths)
            lengths = [len(d) for d in plan.drafts]
            rows = padded_rows(lengths)
            forward = self.profile.step_seconds(tokens, len(seqs), context, accepted, ragged_sequences(lengths), rows)
            t1 = time.thread_time()
            self.speculator.learn(seqs, plan, outcome, planned + forward)
            learned = time.thread_time() - t1
            host += planned + learned
            seconds += forward
            report.forwards += 1
            report.sequence_steps += len(seqs)
            report.tokens += outcome.tokens
            report.drafted += sum(len(d) for d in plan.drafts)
            report.accepted += accepted
            finished += outcome.finished
        self.scheduler.release(finished)
        t2 = time.thread_time()
        for s in finished:
            self.speculator.end(s)
        host += time.thread_time() - t2
        report.steps += 1
        report.forward_s += seconds
        report.host_s += host
        report.makespan_s += seconds + host
        if batch <= SMALL_BATCH:
            report.small_batch_s += seconds + host


def simulate(
    trace: pa.Table,
    profile: Profile,
    drafter: Drafter,
    budget: Budget,
    slots: int = 64,
    warm: pa.Table | None = None,
    max_draft_tokens: int = 16,
    budget_name: str = "",
    drafter_name: str = "",
    max_tokens: int | None = None,
    window_versions: int | None = None,
) -> SimResult:
    """Every policy version of `trace` in order, the drafter and budget refreshed from the versions before it
    (`warm`: rollouts the history holds before the first, as history.warm_start loads them; `max_tokens`: the
    requests' completion limit, which bounds drafts; None: each rollout's own length; `window_versions`: the
    versions the engine's history keeps, as history.window_versions)."""
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    missing = {"policy_version", "request_id", "prompt_ids", "token_ids", "group"} - set(trace.column_names)
    if missing:
        raise ValueError(f"the trace lacks the column(s) {', '.join(sorted(missing))} (a rollout history's Parquet)")
    engine = SimulatedEngine(profile, drafter, budget, slots, max_draft_tokens, max_tokens)
    names = budget_name or type(budget).__name__, drafter_name or type(drafter).__name__
    result = SimResult(profile.name, *names, slots)
    history = RolloutHistory(window_versions=window_versions)
    by_version: dict[int, list[dict]] = {}
    for i, r in enumerate(trace.to_pylist()):
        r["logprobs"] = r.get("logprobs")
        r["request_id"] = f"v{r['policy_version']}-{r['request_id'] or i}"
        by_version.setdefault(r["policy_version"], []).append(r)
    versions = sorted(by_version)
    if warm is not None and versions:
        history.append(older_than(warm, versions[0]))
    for version in versions:
        engine.speculator.refresh(history, version)
        result.versions.append(engine.run_version(version, by_version[version]))
        history.append(trace.filter(pc.equal(trace["policy_version"], version)))
    return result


BUDGETS = ("fixed:2", "fixed:4", "fixed:8", "auto")


def compare(
    trace: pa.Table,
    profile: Profile,
    drafters: tuple[str, ...] = ("suffix",),
    budgets: tuple[str, ...] = BUDGETS,
    slots: int = 64,
    warm: pa.Table | None = None,
    max_draft_tokens: int = 16,
    options: dict | None = None,
    max_tokens: int | None = None,
    window_versions: int | None = None,
) -> dict:
    """Each drafter under each budget, beside `off` (no drafter: the engine decoding plainly):
    {"off": summary, drafter: {budget: summary + speedup_vs_off}}."""
    from drafters.base import make_drafter
    from rollout.budget import parse_budget

    def run(drafter: str, budget: str) -> SimResult:
        made = parse_budget(budget, cost=profile.forward.cost_model, max_nodes=max_draft_tokens)
        engine_drafter = make_drafter(drafter) if drafter == "none" else make_drafter(drafter, **(options or {}))
        return simulate(
            trace,
            profile,
            engine_drafter,
            made,
            slots,
            warm,
            max_draft_tokens,
            budget,
            drafter,
            max_tokens,
            window_versions,
        )

    plain = run("none", "off")
    out: dict = {"off": plain.summary()}
    for drafter in drafters:
        out[drafter] = {}
        for budget in budgets:
            result = run(drafter, budget)
            speedup = plain.makespan_s / result.makespan_s if result.makespan_s else 0.0
            out[drafter][budget] = {**result.summary(), "speedup_vs_off": round(speedup, 3)}
    return out
