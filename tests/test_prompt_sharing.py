"""share_prompts: GRPO siblings copy their prompt's keys/values instead of prefilling it again.

What must hold: every request emits exactly what it emits when it prefills its own prompt (sharing moves cache
rows, it computes nothing new), each distinct prompt is prefilled once while copies of it run or queue, and the
copy kept of a finished sibling serves siblings that were still queued.
"""

from __future__ import annotations

import random

import pytest
from conftest import make_engine
from helpers import RandomDrafter, cost_from_function

from rollout.budget import parse_budget
from rollout.engine.engine import Engine
from rollout.sampling import SamplingParams
from rollout.tasks import chat_prompt_ids


def count_prefills(engine: Engine) -> list[int]:
    """Wraps the engine's forward groups; the list grows by the number of prompts each prefill step feeds."""
    counts: list[int] = []
    run = engine.runner.run

    def counted(seqs, slot_lo, drafts, keep_top):
        fresh = sum(1 for s in seqs if s.cache_len == 0)
        if fresh:
            counts.append(fresh)
        return run(seqs, slot_lo, drafts, keep_top)

    engine.runner.run = counted
    return counts


def grpo_batch(prompts: list[list[int]], samples: int, max_tokens: int, greedy_every: int = 3):
    batch, params = [], []
    for p in prompts:
        for j in range(samples):
            temperature = 0.0 if len(params) % greedy_every == 0 else 1.0
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=len(params)))
            batch.append(p)
    return batch, params


def engine_pair(model, slots: int, vocab: int):
    """The same engine with and without sharing (a random tree drafter, so drafts ride on shared prompts too)."""
    engines = []
    for share in (True, False):
        e = make_engine(
            model, max_num_seqs=slots, drafter=RandomDrafter(vocab, tree=True), budget=parse_budget("fixed:4")
        )
        e.scheduler.share_prompts = share
        engines.append(e)
    return engines


@pytest.mark.exactness
@pytest.mark.parametrize("slots", [64, 6, 1])
def test_siblings_prefill_once_and_emit_what_their_own_prefill_would(tiny_model, slots):
    # 64 slots: all fit, siblings wait one step for the first copy; 6: siblings queue behind running copies;
    # 1: each request runs alone, so every sibling after the first copies the prompt kept from a finished one.
    rng = random.Random(slots)
    prompts = [[rng.randrange(1, 384) for _ in range(rng.randint(5, 40))] for _ in range(3)]
    batch, params = grpo_batch(prompts, samples=5, max_tokens=12)
    shared, alone = engine_pair(tiny_model, slots, 384)
    prefills_shared, prefills_alone = count_prefills(shared), count_prefills(alone)
    got, want = shared.generate(batch, params), alone.generate(batch, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    flat = lambda results: [lp for r in results for lp in r.logprobs]  # noqa: E731
    assert flat(got) == pytest.approx(flat(want), abs=1e-5)
    assert sum(prefills_shared) == len(prompts)  # one prefill per distinct prompt
    assert sum(prefills_alone) == len(batch)
    assert not shared.scheduler.kept_prompts  # nothing kept once no request waits for it


def test_a_one_token_prompt_is_prefilled_by_each_copy(tiny_model):
    # Nothing to copy: the last prompt token is always fed, and a one-token prompt has no other.
    engine = make_engine(tiny_model, max_num_seqs=4)
    prefills = count_prefills(engine)
    out = engine.generate([[7]] * 3, SamplingParams(temperature=1.0, max_tokens=3, seed=1))
    assert len(out) == 3 and sum(prefills) == 3


def test_different_prompts_with_a_shared_start_are_not_shared(tiny_model):
    engine = make_engine(tiny_model, max_num_seqs=4)
    prefills = count_prefills(engine)
    engine.generate([[5, 6, 7], [5, 6, 8], [5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert sum(prefills) == 2


@pytest.mark.exactness
@pytest.mark.slow
def test_smollm2_grpo_batch_with_shared_prompts(smol_model, smol_tokenizer):
    """The real model, a GRPO-shaped batch (2 prompts x 4 samples, greedy and sampled): same tokens as
    prefilling every copy, two prefills instead of eight."""
    prompts = [chat_prompt_ids(smol_tokenizer, q) for q in ("Name three colours.", "Count from 1 to 10.")]
    batch, params = grpo_batch(prompts, samples=4, max_tokens=24, greedy_every=2)
    shared, alone = engine_pair(smol_model, 8, smol_model.shape.vocab_size)
    prefills = count_prefills(shared)
    got, want = shared.generate(batch, params), alone.generate(batch, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    worst = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs))
    print(f"max |logprob shared - own prefill| = {worst:.2e}")
    assert worst <= 1e-4
    assert sum(prefills) == 2


def test_plain_only_batches_leave_the_auto_budget_alone(tiny_model):
    # A comparison twin (engine.plain()) decodes plainly; were the budget consulted, its clock would learn from
    # those plain steps what the run's steps take.
    budget = parse_budget("auto", cost=cost_from_function(lambda m, b: 0.01 + 0.001 * m))
    engine = make_engine(tiny_model, drafter=RandomDrafter(384), budget=budget)
    with engine.plain():
        engine.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=6, ignore_eos=True))
    assert not budget.clock._sums
    engine.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=6, ignore_eos=True))
    assert budget.clock._sums


def test_kept_prompts_do_not_outlive_the_weights(tiny_model):
    # A sibling queued behind a finished copy is aborted: the kept keys/values must not serve the next policy.
    engine = make_engine(tiny_model, max_num_seqs=1)
    engine.add_request([4, 5, 6], SamplingParams(max_tokens=1))
    queued = engine.add_request([4, 5, 6], SamplingParams(max_tokens=1))
    engine.step()
    assert engine.scheduler.kept_prompts  # the first copy finished while its sibling queued
    engine.abort(queued)
    engine.update_weights([], version=1)
    assert not engine.scheduler.kept_prompts
