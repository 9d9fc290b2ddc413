"""TRL: a `rollout_func` for `GRPOTrainer` that generates through specrollout.

    from adapters.trl import make_rollout_func
    trainer = GRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                          rollout_func=make_rollout_func(service))

What it does at every generation:
- pushes the trainer's weights to the service when `trainer.state.global_step` has moved (TRL syncs nothing itself
  when `use_vllm=False`); the step number is the new policy version, so the drafter refreshes from the rollouts of
  the versions before and the rollouts are recorded under it;
- renders conversational prompts with the trainer's chat template (plain strings are tokenized as they are);
- maps GRPOConfig's sampling fields (temperature, top_p, top_k, max_completion_length; `min_p` and
  `repetition_penalty` are refused unless neutral, rather than silently ignored) onto SamplingParams;
- samples one completion per prompt entry (TRL repeats each prompt num_generations times, consecutively: that run
  is one GRPO group, sent to one worker so its drafter sees the siblings), seeded from (args.seed, step, index) so a
  run is reproducible and a run without speculation samples the very same tokens;
- returns `prompt_ids`, `completion_ids`, `logprobs` (the target's, one per completion token) and, as extra keys
  that TRL forwards to reward functions, each rollout's speculation figures.

TRL is only imported by the caller; this module needs none of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from adapters.sampling_fields import translate
from rollout.drafter_health import merged
from rollout.sampling import SamplingParams
from rollout.worker import RolloutRequest


@dataclass
class RolloutStats:
    """What one call of the rollout function did, for logging and benchmarks."""

    step: int
    policy_version: int
    seconds: float
    tokens: int
    sequences: int
    target_forwards: int  # summed over sequences
    drafted: int
    accepted: int
    sync_seconds: float = 0.0
    nospec_seconds: float | None = None  # when a plain-decoding twin was generated for comparison
    oracle_seconds: float | None = None  # and a twin drafted from the plain twin's tokens (the limit of speculation)
    engine_forwards: int | None = None  # batched forwards of this call (twins not counted), where the service says
    # share of each call's engine time spent with at most SMALL_BATCH sequences running (where the service says)
    small_batch_share: float | None = None
    nospec_small_batch_share: float | None = None
    # Drafter health (rollout/drafter_health.py), where the service reports it: this policy version's acceptance so
    # far, the earlier version's it is compared with, and whether it collapsed (a stale drafter; also logged)
    drafter_acceptance: float | None = None
    drafter_previous_acceptance: float | None = None
    drafter_collapsed: bool = False

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.target_forwards if self.target_forwards else 0.0


def sampling_params_from(args: Any, seed: int | None = None) -> SamplingParams:
    """GRPOConfig (or anything with the same fields) -> SamplingParams; unsupported options are errors.

    GRPOConfig's fields are vLLM's under other names (max_completion_length is max_tokens), so they go through the
    translation every adapter uses (adapters/sampling_fields.py): honoured, or refused with the field named."""
    if getattr(args, "generation_kwargs", None):
        raise ValueError("GRPOConfig.generation_kwargs is not supported with specrollout; set the sampling fields")
    fields = {
        name: getattr(args, name, None) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    }
    fields["max_tokens"] = getattr(args, "max_completion_length", None)
    return translate(fields, default_max_tokens=256, default_seed=seed).params


def render_prompt(tokenizer, prompt: Any) -> list[int]:
    """A conversational prompt (list of messages) through the chat template; a string as it is."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@dataclass
class SpecRolloutFunc:
    """The callable handed to GRPOTrainer(rollout_func=...)."""

    service: Any  # RolloutService: RolloutCluster or LocalService
    # Benchmarks: also time a plain-decoding twin of every batch, and an oracle twin drafted from its tokens.
    compare_without_speculation: bool = False
    on_rollouts: Callable[[list, RolloutStats], None] | None = None  # e.g. to save traces or log
    sampling_seed: int | None = None  # seeds the rollouts' samples; None: the trainer's args.seed
    history: list[RolloutStats] = field(default_factory=list)
    _synced_step: int = 0

    def _sync(self, trainer) -> float:
        step = int(trainer.state.global_step)
        if step == self._synced_step:
            return 0.0
        t0 = time.perf_counter()
        model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
        self.service.update_weights(model.named_parameters(), version=step)
        self._synced_step = step
        return time.perf_counter() - t0

    def _timed(self, requests: list[RolloutRequest], **mode) -> tuple[float, list, dict]:
        """(seconds, results, the service's counters moved by the call: step_seconds, small_batch_seconds,
        target_forwards, where it reports them) of one service call."""
        before = _engine_totals(self.service)
        t0 = time.perf_counter()
        results = self.service.generate(requests, **mode)
        seconds = time.perf_counter() - t0
        after = _engine_totals(self.service)
        return seconds, results, {k: after[k] - before[k] for k in TOTALS} | {"health": after["health"]}

    def _twins(self, requests: list[RolloutRequest]) -> tuple[float, list, dict, float]:
        """The plain twin (seconds, results, counters), then the oracle twin's seconds."""
        twins = [replace(r, request_id=f"plain-{r.request_id}") for r in requests]
        nospec, plain, moved = self._timed(twins, plain=True)
        oracles = [replace(r, request_id=f"oracle-{r.request_id}") for r in requests]
        known = {o.request_id: p.token_ids for o, p in zip(oracles, plain)}
        oracle, _, _ = self._timed(oracles, oracle=known)
        return nospec, plain, moved, oracle

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        sync_seconds = self._sync(trainer)
        args = trainer.args
        step = int(trainer.state.global_step)
        tokenizer = trainer.processing_class
        g = max(int(getattr(trainer, "num_generations", 1) or 1), 1)
        base_seed = self.sampling_seed if self.sampling_seed is not None else int(getattr(args, "seed", 0) or 0)
        requests = []
        for i, prompt in enumerate(prompts):
            params = sampling_params_from(args, seed=base_seed * 1_000_003 + step * 100_003 + i)
            ids = render_prompt(tokenizer, prompt)
            requests.append(RolloutRequest(f"s{step}-{i}", ids, params, f"s{step}-g{i // g}"))
        nospec = oracle = None
        nospec_moved: dict = {}
        twins = self.compare_without_speculation
        if twins and step % 2 == 1:  # alternate which goes first, so drift in machine load evens out
            nospec, plain, nospec_moved, oracle = self._twins(requests)
        seconds, results, moved = self._timed(requests)
        if twins and step % 2 == 0:
            nospec, plain, nospec_moved, oracle = self._twins(requests)
        if twins:
            mismatch = sum(p.token_ids != r.token_ids for p, r in zip(plain, results))
            if mismatch:
                print(
                    f"note: {mismatch} of {len(results)} rollouts differ without speculation (rounding at a CDF edge)"
                )
        stats = RolloutStats(
            step=step,
            policy_version=results[0].policy_version if results else step,
            seconds=seconds,
            tokens=sum(len(r.token_ids) for r in results),
            sequences=len(results),
            target_forwards=sum(r.spec.target_forwards for r in results),
            drafted=sum(r.spec.drafted for r in results),
            accepted=sum(r.spec.accepted for r in results),
            sync_seconds=sync_seconds,
            nospec_seconds=nospec,
            oracle_seconds=oracle,
            engine_forwards=moved.get("target_forwards"),
            small_batch_share=_small_batch_share(moved),
            nospec_small_batch_share=_small_batch_share(nospec_moved),
            **moved["health"],
        )
        self.history.append(stats)
        if self.on_rollouts is not None:
            self.on_rollouts(results, stats)
        return {
            "prompt_ids": [r.prompt_token_ids for r in results],
            "completion_ids": [r.token_ids for r in results],
            "logprobs": [r.logprobs for r in results],
            "spec_accepted": [r.spec.accepted for r in results],
            "spec_target_forwards": [r.spec.target_forwards for r in results],
            "policy_version": [r.policy_version for r in results],
        }


TOTALS = ("step_seconds", "small_batch_seconds", "target_forwards")


def _engine_totals(service) -> dict:
    """The counters in TOTALS summed over the service's replicas (RolloutService.stats)."""
    rows = service.stats()
    return {k: sum(r[k] for r in rows) for k in TOTALS} | {"health": merged(rows)}


def _small_batch_share(moved: dict) -> float | None:
    """Share of a call's engine step time with at most SMALL_BATCH sequences running."""
    seconds = moved.get("step_seconds")
    return moved["small_batch_seconds"] / seconds if seconds else None


def make_rollout_func(service, **kwargs) -> SpecRolloutFunc:
    return SpecRolloutFunc(service, **kwargs)
