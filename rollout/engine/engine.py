"""The embedded engine: continuous batching with speculative verification.

One step:  admit waiting requests into free slots -> ask the drafter for a draft per sequence (length from the
budget) -> one target forward per group (prompts being prefilled; running sequences) -> processed distributions ->
lossless verification -> emit, roll the cache back to the accepted path, tell the drafter -> release finished slots.

A sequence keeps the invariant cache_len == len(tokens) - 1 between steps: every token but the last sampled one has
its keys/values in the cache; that last one is fed at the next step ahead of the draft. A new request starts with
cache_len 0 and feeds its whole prompt.
"""

from __future__ import annotations

import itertools
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable
from typing import Sequence as Seq

import torch

from drafters.base import (
    EMPTY_DRAFT,
    Draft,
    Drafter,
    NoDrafter,
    bind_target,
    make_drafter,
    observe_all,
    propose_all,
    wanted_top_logprobs,
)
from rollout.budget import Budget, BudgetItem, parse_budget
from rollout.config import EngineConfig, HistoryConfig, SpeculationConfig
from rollout.cost_model import measure_cost_model
from rollout.engine.batch import SeqInput, build_batch
from rollout.engine.checkpoint import resolve_model
from rollout.engine.model import TargetModel
from rollout.history import RolloutHistory, prompt_key, warm_start
from rollout.result import RolloutResult, SpecStats
from rollout.sampling import SamplingParams, process_logits
from rollout.verify import verify


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    group: str | None
    generator: torch.Generator
    stop_ids: frozenset[int]
    prompt_key: str
    speculate: bool = True  # False: no drafts, and the drafter and history never see this sequence
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    cache_len: int = 0
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # when the engine records the target's top-k: (ids int32, logprobs) [tokens, k] per step, on the host
    top: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    stats: SpecStats = field(default_factory=SpecStats)
    finish_reason: str | None = None
    noise: list[float] = field(default_factory=list)  # u_t for output position t, drawn from `generator` in order

    def __post_init__(self):
        self.tokens = list(self.prompt)

    def uniforms(self, start: int, count: int) -> list[float]:
        """The uniforms of output positions [start, start + count): the same numbers whatever was drafted."""
        while len(self.noise) < start + count:
            self.noise.extend(torch.rand(64, generator=self.generator, dtype=torch.float64).tolist())
        return self.noise[start : start + count]


def cost_model_file(folder, config: EngineConfig):
    """Where this machine's cost model for this model (and kernels) is cached."""
    import hashlib
    from pathlib import Path

    from rollout.engine.checkpoint import cache_dir
    from rollout.engine.hardware import fingerprint

    text = (Path(folder) / "config.json").read_text() + f"|{config.dtype}|{config.matmul}|{config.device}"
    model_id = hashlib.sha1(text.encode()).hexdigest()[:10]
    return cache_dir() / "cost" / f"{fingerprint(torch.device(config.device))}-{model_id}.json"


def _validate_prompt(prompt: object, vocab_size: int, max_model_len: int) -> list[int]:
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


class Engine:
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
        self.max_draft_tokens = max_draft_tokens
        self.max_model_len = min(self.config.max_model_len, model.max_model_len)
        self.cache = model.new_cache(self.config.max_num_seqs)
        self.vocab_size = model.shape.vocab_size
        eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # running[i] occupies KV slot i
        self.policy_version = 0
        history = history or HistoryConfig()
        self.history = RolloutHistory(history.max_bytes, history.window_versions) if history.record else None
        self._unrecorded: list[RolloutResult] = []  # finished since the last flush into the history
        # The target's top-k per generated token, for a drafter that distils from them (only into a history).
        self.top_logprobs = history.recorded_top_logprobs(wanted_top_logprobs(self.drafter))
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(self.config.seed)
        self.total_forwards = 0
        self._draft_seconds = 0.0  # of the step in flight: the budget weighs drafting time apart
        self._unverified: list[Draft] = []  # of the step in flight: drafts the budget verified none of, first level
        # prompt key -> (prompt, its keys, its values): kept from a finished sequence while a queued request has the
        # same prompt and no running sequence holds it (share_prompts)
        self._kept_prompts: dict[str, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
        if history.warm_start and self.history is not None:
            warm_start(self.history, history.warm_start, self.policy_version)
            self.refresh_drafter()  # the first requests already draft from them

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

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_token_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        group: str | None = None,
        speculate: bool = True,
    ) -> str:
        """Queue a request; raises ValueError naming the bad field and leaves the engine untouched.

        speculate=False decodes it plainly and keeps it away from the drafter and the history (a twin for timing
        comparisons must not teach the drafter the answer)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = _validate_prompt(prompt_token_ids, self.vocab_size, self.max_model_len)
        for t in params.stop_token_ids:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids contains {t}, outside the vocabulary [0, {self.vocab_size})")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if any(s.request_id == request_id for s in itertools.chain(self.waiting, self.running)):
            raise ValueError(f"request_id {request_id!r} is already in flight")
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        generator = torch.Generator().manual_seed(seed)
        self.waiting.append(
            Sequence(request_id, prompt, params, group, generator, stop, prompt_key(prompt), bool(speculate))
        )
        return request_id

    def abort(self, request_id: str) -> RolloutResult | None:
        for i, s in enumerate(self.waiting):
            if s.request_id == request_id:
                del self.waiting[i]
                s.finish_reason = "abort"
                return self._result(s)
        for s in self.running:
            if s.request_id == request_id:
                s.finish_reason = "abort"
                return self._release([s])[0]
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def generate(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        groups: Seq[str | None] | None = None,
        request_ids: Seq[str] | None = None,
        speculate: Seq[bool] | None = None,
    ) -> list[RolloutResult]:
        """Run a batch to completion; results in prompt order. All prompts are validated before any is queued."""
        return generate_batch(self, prompts, params, groups, request_ids, speculate)

    # ------------------------------------------------------------------ weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Load new policy weights between rollouts; in-flight sequences would mix two policies, so none may run."""
        require_idle(self)
        self.model.load_weights(named_tensors, strict=True)
        self._kept_prompts.clear()  # keys/values of the old weights (left by aborted requests)
        self.policy_version = self.policy_version + 1 if version is None else int(version)
        self.refresh_drafter()
        return self.policy_version

    def flush_history(self) -> None:
        flush_history(self)

    def refresh_drafter(self) -> None:
        """Record finished rollouts and let the drafter rebuild from the history at the current policy version."""
        self.flush_history()
        self.drafter.refresh(self.history, self.policy_version)
        self.budget.refresh(self.history)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RolloutResult]:
        """Advance every running sequence by one verification; returns the requests that finished."""
        self._admit()
        prefilled = sum(1 for s in self.running if s.cache_len > 0)
        finished: list[Sequence] = []
        # Running sequences hold slots [0, prefilled); those admitted this step were appended after them.
        if prefilled:
            finished += self._run(self.running[:prefilled], slot_lo=0)
        if prefilled < len(self.running):
            finished += self._run(self.running[prefilled:], slot_lo=prefilled)
        return self._release(finished)

    def _admit(self) -> None:
        """Move waiting requests into free slots. With share_prompts, a request whose prompt a running sequence
        already holds copies that prompt's keys/values from its slot and starts decoding at once (GRPO samples
        every prompt G times: only the first copy pays for the prefill); one whose prompt is first being prefilled
        in this very step waits one step for that copy to exist, and requests behind it go ahead."""
        share = self.config.share_prompts
        # prompt key -> the running slot that holds that prompt's keys/values, or the copy kept of a finished one
        sources: dict[str, int | tuple[list[int], torch.Tensor, torch.Tensor]] = dict(self._kept_prompts)
        if share:
            sources.update({s.prompt_key: slot for slot, s in enumerate(self.running) if s.cache_len > 0})
        prefilling: set[str] = set()
        shared: list[tuple[Sequence, int | tuple]] = []  # (sequence, where it copies its prompt from)
        fresh: list[Sequence] = []
        deferred: list[Sequence] = []
        queue, self.waiting = self.waiting, []
        for i, s in enumerate(queue):
            if len(self.running) + len(shared) + len(fresh) >= self.config.max_num_seqs:
                self.waiting = queue[i:]
                break
            source = sources.get(s.prompt_key) if len(s.prompt) > 1 else None
            held = self.running[source].prompt if isinstance(source, int) else source[0] if source else None
            if held == s.prompt:
                shared.append((s, source))
            elif share and s.prompt_key in prefilling:
                deferred.append(s)
            else:
                prefilling.add(s.prompt_key)
                fresh.append(s)
        self.waiting = deferred + self.waiting
        # Slots [0, n) hold sequences with a cache, the new prefills come after them (step() runs the two apart).
        admitted = len(self.running)
        for s, src in shared:
            if isinstance(src, int):
                self.cache.move_slot(src, len(self.running), len(s.prompt) - 1)
            else:
                self.cache.load_prefix(len(self.running), src[1], src[2])
            s.cache_len = len(s.prompt) - 1  # the last prompt token is fed at this step, like a sampled token
            self.running.append(s)
        self.running += fresh
        for s in self.running[admitted:]:
            if s.speculate:
                self.drafter.begin(s.request_id, s.prompt, s.group)
        if self._kept_prompts:
            queued = {s.prompt_key for s in self.waiting}
            self._kept_prompts = {k: v for k, v in self._kept_prompts.items() if k in queued}

    def _room(self, s: Sequence) -> tuple[int, int]:
        """(most draft nodes the cache can take, deepest node worth verifying) for this step."""
        can_emit = min(s.params.max_tokens - len(s.output), self.max_model_len - len(s.tokens))
        return self.max_model_len - len(s.tokens), can_emit - 1

    def _drafts(self, seqs: list[Sequence]) -> list[Draft]:
        """Ask the drafter for each sequence's draft, then let the budget decide how much of each to verify."""
        if not any(s.speculate for s in seqs):
            # Plain requests only (a comparison twin, or speculation turned off per request): nothing for the budget
            # to decide, and nothing for it to learn, since its gate would file the step under whichever arm it
            # happened to pick.
            self._unverified = [EMPTY_DRAFT] * len(seqs)
            return [EMPTY_DRAFT] * len(seqs)
        prefill = any(s.cache_len == 0 for s in seqs)
        ask = min(self.max_draft_tokens, self.budget.max_draft(len(seqs), prefill))
        rooms = [self._room(s) for s in seqs]
        asks = [min(ask, nodes, depth) if s.speculate else 0 for s, (nodes, depth) in zip(seqs, rooms)]
        # one call for the batch: a parametric drafter runs one forward per draft position for all sequences
        wanted = [i for i, k in enumerate(asks) if k > 0]
        started = time.perf_counter()
        proposed = dict(
            zip(wanted, propose_all(self.drafter, [seqs[i].request_id for i in wanted], [asks[i] for i in wanted]))
        )
        self._draft_seconds = time.perf_counter() - started
        drafts, items = [], []
        for i, (s, (nodes, depth)) in enumerate(zip(seqs, rooms)):
            k = asks[i]
            d = proposed.get(i, EMPTY_DRAFT)
            if d is None or len(d) == 0:
                d = EMPTY_DRAFT
            else:
                if any(not 0 <= t < self.vocab_size for t in d.token_ids):
                    name = type(self.drafter).__name__
                    raise RuntimeError(f"drafter {name} proposed a token outside the vocabulary")
                d = d.truncated(k, depth)
            drafts.append(d)
            items.append(BudgetItem(s.request_id, d, len(s.tokens) - s.cache_len, s.prompt_key, len(s.output)))
        counts = self.budget.select(items, waiting=len(self.waiting))
        # A draft the budget verifies none of is still judged at its first level, for free: the token this step
        # emits does not depend on the draft (verify.py), so a first-level node would have been accepted exactly
        # when it equals that token. Without it, a sequence whose drafts once fared badly is never drafted again,
        # since only verified drafts teach the budget (measured: the tail's last sequences went undrafted while a
        # fixed budget of 4 landed about a fifth of its nodes).
        self._unverified = [d.truncated(len(d), 1) if n == 0 else EMPTY_DRAFT for d, n in zip(drafts, counts)]
        return [d if n >= len(d) else d.truncated(n, n) for d, n in zip(drafts, counts)]

    def _run(self, seqs: list[Sequence], slot_lo: int) -> list[Sequence]:
        started = time.perf_counter()
        emitted_before = sum(len(s.output) for s in seqs)
        self._draft_seconds = 0.0
        finished = self._verify_step(seqs, slot_lo)
        tokens = sum(len(s.output) for s in seqs) - emitted_before
        self.budget.observe_step(time.perf_counter() - started, tokens, self._draft_seconds)
        return finished

    def _min_tokens_mask(self, seqs: list[Sequence], drafts: list[Draft], logit_counts: list[int]):
        """Rows whose output position is below their request's min_tokens, with its stop tokens marked; None when
        no request needs one. A sequence's first logit row predicts output position len(output), the row of a
        draft node at depth d (1-based) position len(output) + d."""
        if all(len(s.output) >= s.params.min_tokens for s in seqs):
            return None
        mask = torch.zeros(sum(logit_counts), self.vocab_size, dtype=torch.bool)
        row = 0
        for s, d, count in zip(seqs, drafts, logit_counts):
            positions = [len(s.output)] + [len(s.output) + depth for depth in d.depths()]
            stops = sorted(s.stop_ids)
            for r, position in zip(range(row, row + count), positions):
                if position < s.params.min_tokens and stops:
                    mask[r, stops] = True
            row += count
        return mask

    def _verify_step(self, seqs: list[Sequence], slot_lo: int) -> list[Sequence]:
        drafts = self._drafts(seqs)
        inputs = []
        for s, d in zip(seqs, drafts):
            pending = s.tokens[s.cache_len :]
            p = len(pending)
            parents = None
            if not d.is_chain:
                # Draft node j is new token p + j; the draft's root is the last pending token, new token p - 1.
                parents = list(range(-1, p - 1)) + [p - 1 if q < 0 else p + q for q in d.parent_list()]
            inputs.append(SeqInput(s.cache_len, pending + list(d.token_ids), parents, logits_from=p - 1))
        batch = build_batch(inputs, slot_lo, self.model.device)
        logits = self.model.forward(batch, self.cache)  # [R, V]
        self.total_forwards += 1

        # Bookkeeping (row offsets, drafts, uniforms, the verification loop's indices) stays on the host; what
        # touches the logits goes to their device, and verify() brings its sampled tokens back.
        device = logits.device
        rows_per_seq = torch.tensor(batch.logit_counts)
        row_params = [
            torch.tensor([getattr(s.params, name) for s in seqs], dtype=dtype).repeat_interleave(rows_per_seq)
            for name, dtype in (("temperature", torch.float32), ("top_k", torch.int64), ("top_p", torch.float32))
        ]
        row_params = [p.to(device) for p in row_params]
        processed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> (probs, logprobs), as reached
        top: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> (top-k logprobs, their ids) [k] each
        masked = self._min_tokens_mask(seqs, drafts, batch.logit_counts)  # [R, V] bool, or None
        if masked is not None:
            masked = masked.to(device)

        def distributions(rows: torch.Tensor) -> torch.Tensor:
            """Processed distributions of the rows verification reaches: one per emitted token, not per node."""
            at = rows.to(device)
            reached = logits[at] if masked is None else logits[at].masked_fill(masked[at], float("-inf"))
            probs, logprobs = process_logits(reached, *(p[at] for p in row_params))
            for r, pr, lp in zip(rows.tolist(), probs, logprobs):
                processed[r] = (pr, lp)
            if self.top_logprobs:
                values, ids = logprobs.topk(min(self.top_logprobs, logprobs.shape[-1]), dim=-1)  # [rows, k] each
                top.update(zip(rows.tolist(), zip(values, ids)))
            return probs

        b, n = len(seqs), max(len(d) for d in drafts)
        depth = max(max(d.depths(), default=0) for d in drafts)
        row_start = torch.cumsum(rows_per_seq, 0) - rows_per_seq
        tokens = torch.full((b, n), -1, dtype=torch.int64)
        parents = torch.full((b, n), -1, dtype=torch.int64)
        # One uniform per output position, from the request's own generator (see verify.py): its rollout depends
        # neither on its batch neighbours nor on what was drafted.
        uniforms = torch.tensor([s.uniforms(len(s.output), depth + 1) for s in seqs], dtype=torch.float64)
        for i, d in enumerate(drafts):
            k = len(d)
            if k:
                tokens[i, :k] = torch.tensor(d.token_ids)
                parents[i, :k] = torch.tensor(d.parent_list())
        result = verify(distributions, row_start, tokens, parents, uniforms)

        accepted = result.accepted.tolist()
        num_accepted = result.num_accepted.tolist()
        next_token = result.next_token.tolist()
        starts = row_start.tolist()
        emitted_all, lp_rows, lp_cols = [], [], []
        move_slots, move_src, move_dst = [], [], []
        for i, (s, d) in enumerate(zip(seqs, drafts)):
            path = accepted[i][: num_accepted[i]]
            emitted = [d.token_ids[j] for j in path] + [next_token[i]]
            emitted_all.append(emitted)
            # Token t was drawn from the distribution at the node before it: the root, then the path's nodes.
            lp_rows.extend(starts[i] + r for r in [0] + [j + 1 for j in path])
            lp_cols.extend(emitted)
            p = len(s.tokens) - s.cache_len
            for depth, j in enumerate(path):
                if j != depth:  # a tree branch other than the first was taken: its KV moves into place
                    move_slots.append(slot_lo + i)
                    move_src.append(s.cache_len + p + j)
                    move_dst.append(s.cache_len + p + depth)
            s.cache_len += p + len(path)
            s.stats.record(max(d.depths(), default=0), len(path), len(d))
            if len(d):
                self.budget.feedback(s.request_id, d, path)
            elif len(shadow := self._unverified[i]):
                hit = [j for j, t in enumerate(shadow.token_ids) if t == next_token[i]]
                self.budget.feedback(s.request_id, shadow, hit)
        if move_slots:
            self.cache.move_positions(torch.tensor(move_slots), torch.tensor(move_src), torch.tensor(move_dst))
        # One copy to the host for the whole step: float() per token would wait on a GPU once per token.
        token_logprobs = torch.stack([processed[r][1][c] for r, c in zip(lp_rows, lp_cols)]).tolist()
        top_values = top_ids = None
        if self.top_logprobs:
            top_values = torch.stack([top[r][0] for r in lp_rows]).cpu()  # [emitted, k]
            top_ids = torch.stack([top[r][1] for r in lp_rows]).to(torch.int32).cpu()

        finished = []
        offset = 0
        observed_ids, observed_tokens, observed_lps = [], [], []  # what the drafter is handed, in one call
        for s, emitted in zip(seqs, emitted_all):
            lps = token_logprobs[offset : offset + len(emitted)]
            kept = self._append(s, emitted, lps)
            if top_ids is not None and s.speculate:  # copies: a view would keep the whole step's rows alive
                s.top.append((top_ids[offset : offset + kept].clone(), top_values[offset : offset + kept].clone()))
            offset += len(emitted)
            if s.speculate:
                observed_ids.append(s.request_id)
                observed_tokens.append(emitted[:kept])
                observed_lps.append(lps[:kept])
            if s.finish_reason is not None:
                finished.append(s)
        if observed_ids:
            started = time.perf_counter()
            observe_all(self.drafter, observed_ids, observed_tokens, observed_lps)
            self._draft_seconds += time.perf_counter() - started  # drafting's host cost includes observing
        return finished

    def _append(self, s: Sequence, emitted: list[int], logprobs: list[float]) -> int:
        """Append tokens until a stop token or a length limit; returns how many were kept."""
        for n, (t, lp) in enumerate(zip(emitted, logprobs), start=1):
            s.output.append(t)
            s.tokens.append(t)
            s.logprobs.append(lp)
            if t in s.stop_ids:
                s.finish_reason = "stop"
            elif len(s.output) >= s.params.max_tokens or len(s.tokens) >= self.max_model_len:
                s.finish_reason = "length"
            if s.finish_reason is not None:
                return n
        return len(emitted)

    def _release(self, finished: list[Sequence]) -> list[RolloutResult]:
        """Free the slots of finished sequences, keeping the running ones in a contiguous block [0, n)."""
        if not finished:
            return []
        done = {id(s) for s in finished}
        keep = [s for s in self.running if id(s) not in done]
        if self.config.share_prompts and self.waiting:
            # A queued sibling would otherwise prefill this prompt again: keep its keys/values past the slot.
            queued = {s.prompt_key for s in self.waiting} - {s.prompt_key for s in keep} - set(self._kept_prompts)
            for slot, s in enumerate(self.running):
                # At most a cache's worth of slots is kept (beyond that, prefilling again is the cheaper memory).
                room = len(self._kept_prompts) < self.config.max_num_seqs
                if room and id(s) in done and s.prompt_key in queued and s.cache_len >= len(s.prompt) - 1 > 0:
                    self._kept_prompts[s.prompt_key] = (s.prompt, *self.cache.copy_prefix(slot, len(s.prompt) - 1))
                    queued.discard(s.prompt_key)
        # Fill each hole left of the new end with the last running sequence beyond it (one KV copy each).
        new_running: list[Sequence | None] = [s if id(s) not in done else None for s in self.running[: len(keep)]]
        movers = [(slot, s) for slot, s in enumerate(self.running) if slot >= len(keep) and id(s) not in done]
        holes = [slot for slot, s in enumerate(new_running) if s is None]
        for hole, (src, s) in zip(holes, movers):
            self.cache.move_slot(src, hole, s.cache_len)
            new_running[hole] = s
        self.running = [s for s in new_running if s is not None]
        assert len(self.running) == len(keep)
        results = []
        for s in finished:
            results.append(self._result(s))
            if s.speculate:
                self.drafter.end(s.request_id)
                self.budget.finished(s.request_id, s.prompt_key, len(s.output))
                if self.history is not None and s.finish_reason != "abort":
                    self._unrecorded.append(results[-1])
                results[-1] = results[-1].without_top()  # the history's; not sent back to the caller
        return results

    def _result(self, s: Sequence) -> RolloutResult:
        return RolloutResult(
            request_id=s.request_id,
            prompt_token_ids=s.prompt,
            token_ids=s.output,
            logprobs=s.logprobs,
            finish_reason=s.finish_reason or "abort",
            spec=s.stats,
            group=s.group,
            policy_version=self.policy_version,
            top_token_ids=torch.cat([i for i, _ in s.top]).tolist() if s.top else None,
            top_logprobs=torch.cat([v for _, v in s.top]).tolist() if s.top else None,
        )


def require_idle(engine) -> None:
    """Weights change only between rollouts: a request in flight would mix two policies. Both engines refuse alike."""
    if engine.has_unfinished():
        raise RuntimeError(
            f"{engine.num_unfinished()} requests are in flight; weights change only between rollouts "
            "(finish or abort them first) so that every rollout comes from one policy"
        )


def flush_history(engine) -> None:
    """Move the rollouts an engine finished since the last flush into its history, as one record batch."""
    if engine.history is not None and engine._unrecorded:
        engine.history.append_results(engine._unrecorded)
    engine._unrecorded = []


def generate_batch(
    engine,
    prompts: Seq[Seq[int]],
    params: SamplingParams | Seq[SamplingParams] | None = None,
    groups: Seq[str | None] | None = None,
    request_ids: Seq[str] | None = None,
    speculate: Seq[bool] | None = None,
    check: Callable[[SamplingParams], None] = lambda params: None,
) -> list[RolloutResult]:
    """`generate` of any engine with the Engine API (add_request, step, vocab_size, max_model_len): everything is
    validated (prompts, then each request's params by `check`) before anything is queued; results in prompt order."""
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
    for p in prompts:
        _validate_prompt(p, engine.vocab_size, engine.max_model_len)
    for sp in plist:
        check(sp if sp is not None else SamplingParams())
    ids = [
        engine.add_request(
            p,
            sp,
            None if request_ids is None else request_ids[i],
            None if groups is None else groups[i],
            True if speculate is None else speculate[i],
        )
        for i, (p, sp) in enumerate(zip(prompts, plist))
    ]
    done: dict[str, RolloutResult] = {}
    while len(done) < len(ids):
        for r in engine.step():
            done[r.request_id] = r
    return [done[i] for i in ids]
