"""The oracle twin bench-rl measures the limit of speculation with, and the engine's small-batch clock.

An oracle run drafts each request from its rollout as a plain twin with the same seeds produced it: its tokens
must be the plain twin's (seeded rollouts do not depend on drafts), nearly every draft must land, and nothing of it
may reach the history or the engine's own drafter and budget.
"""

from __future__ import annotations

import pytest
from conftest import make_engine

from drafters.base import BaseDrafter
from rollout.budget import parse_budget
from rollout.frontend import SMALL_BATCH
from rollout.sampling import SamplingParams


class CountingDrafter(BaseDrafter):
    """Proposes nothing; counts what the engine tells it."""

    def __init__(self):
        self.begun = 0

    def begin(self, request_id, prompt_ids, group):
        self.begun += 1


@pytest.mark.parametrize("model_name", ["tiny_model", "smol_model"])
def test_oracle_twin_reproduces_the_plain_rollouts_with_every_draft_landing(request, model_name):
    model = request.getfixturevalue(model_name)
    drafter = CountingDrafter()
    engine = make_engine(model, max_num_seqs=8, drafter=drafter, budget=parse_budget("fixed:4"))
    prompts = [[1, 2, 3, 4], [5, 6, 7]] * 3
    params = [SamplingParams(temperature=1.0, max_tokens=24, seed=s, ignore_eos=True) for s in range(6)]
    with engine.plain():
        plain = engine.generate(prompts, params, request_ids=[f"p{i}" for i in range(6)])
    rows_before = engine.history.num_rows if engine.history is not None else 0
    begun_before = drafter.begun
    ids = [f"o{i}" for i in range(6)]
    with engine.oracle({rid: r.token_ids for rid, r in zip(ids, plain)}):
        oracle = engine.generate(prompts, params, request_ids=ids)
    assert [r.token_ids for r in oracle] == [r.token_ids for r in plain]
    drafted = sum(r.spec.drafted for r in oracle)
    accepted = sum(r.spec.accepted for r in oracle)
    assert drafted > 0 and accepted >= 0.95 * drafted, f"oracle drafts landed {accepted}/{drafted}"
    assert all(r.spec.target_forwards < len(r.token_ids) / 2 for r in oracle), "each step commits several tokens"
    engine.flush_history()
    assert (engine.history.num_rows if engine.history is not None else 0) == rows_before, "kept out of the history"
    assert drafter.begun == begun_before, "the engine's own drafter never saw the oracle's requests"
    # Afterwards the engine speculates with its own drafter again, and records.
    engine.generate(prompts[:1], params[:1])
    assert drafter.begun == begun_before + 1


def test_small_batch_clock_counts_the_tail(tiny_model):
    engine = make_engine(tiny_model, max_num_seqs=16)
    # 12 short requests and 2 long ones: the long ones decode alone for most of the steps
    lengths = [4] * 12 + [60, 60]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    engine.generate([[1, 2, 3]] * len(lengths), params)
    counters = engine.counters()
    assert 0 < counters["small_batch_seconds"] < counters["step_seconds"]
    share = counters["small_batch_seconds"] / counters["step_seconds"]
    assert share > 0.5, f"2 sequences ran alone for 56 of 61 steps, yet only {share:.2f} of the time counted"
    assert SMALL_BATCH == 8


def test_the_trl_adapter_times_both_twins(smol_tokenizer):
    from types import SimpleNamespace

    from adapters.trl import make_rollout_func
    from rollout.config import load_config
    from rollout.service import LocalService

    service = LocalService(load_config(None, ["engine.max_model_len=256", "speculation.budget=fixed:4"]))
    func = make_rollout_func(service, compare_without_speculation=True)
    args = SimpleNamespace(temperature=1.0, max_completion_length=12, seed=0, top_p=1.0, top_k=0)
    trainer = SimpleNamespace(
        args=args, state=SimpleNamespace(global_step=0), processing_class=smol_tokenizer, num_generations=2
    )
    out = func(["Copy: river, stone", "Copy: river, stone", "List 1 to 3", "List 1 to 3"], trainer)
    stats = func.history[-1]
    assert len(out["completion_ids"]) == 4
    assert stats.nospec_seconds and stats.oracle_seconds
    assert 0.0 <= stats.nospec_small_batch_share <= 1.0 and 0.0 <= stats.small_batch_share <= 1.0
    assert stats.engine_forwards and stats.engine_forwards <= max(len(c) for c in out["completion_ids"]) + 1
