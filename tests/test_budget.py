"""The draft budget: what it picks under synthetic and measured step costs, calibration, length classes."""

from __future__ import annotations

import numpy as np
import pytest

from drafters.base import Draft
from rollout.budget import AutoBudget, BudgetItem, CostModel, FixedBudget, measure_cost_model, parse_budget
from rollout.history import RolloutHistory, rows_to_batch


def chain(n: int, p: float) -> Draft:
    return Draft(list(range(10, 10 + n)), probs=[p] * n)


def items(batch: int, n: int = 8, p: float = 0.8, key: str | None = None, generated: int = 10):
    return [BudgetItem(f"r{i}", chain(n, p), pending=1, prompt_key=key, generated=generated) for i in range(batch)]


LINEAR = CostModel.from_function(lambda m, b: 0.001 * m)  # every token costs the same: drafting never pays
FLAT = CostModel.from_function(lambda m, b: 0.020)  # memory-bound: extra tokens are free


def test_linear_cost_picks_nothing():
    assert AutoBudget(LINEAR).select(items(1)) == [0]
    assert AutoBudget(LINEAR).select(items(16)) == [0] * 16


def test_flat_cost_picks_drafts():
    picked = AutoBudget(FLAT).select(items(4))
    assert all(k > 0 for k in picked)


def test_low_acceptance_is_not_worth_a_knee():
    # Verifying costs 30% more per extra token than the first: 0.05-probable nodes do not pay, 0.9 ones do.
    cost = CostModel.from_function(lambda m, b: 0.010 + 0.003 * (m - b))
    assert AutoBudget(cost).select(items(1, p=0.05)) == [0]
    assert AutoBudget(cost).select(items(1, p=0.95))[0] > 0


def test_running_acceptance_calibrates_the_drafter():
    cost = CostModel.from_function(lambda m, b: 0.010 + 0.002 * (m - b))
    budget = AutoBudget(cost)
    before = budget.select(items(1, p=0.9))[0]
    for _ in range(50):  # the drafter claims 0.9 per node but nothing is ever accepted
        budget.feedback("r0", predicted=4.0, accepted=0)
    after = budget.select(items(1, p=0.9))[0]
    assert before > 0 and after < before


def test_long_length_class_gets_more_of_the_budget():
    history = RolloutHistory()
    rows = [
        {
            "request_id": f"{k}{i}",
            "prompt_key": k,
            "group": None,
            "policy_version": 0,
            "prompt_ids": [1],
            "token_ids": [0] * n,
            "logprobs": None,
            "finish_reason": "stop",
        }
        for k, n in (("long", 400), ("short", 20))
        for i in range(4)
    ]
    history.append(rows_to_batch(rows))
    cost = CostModel.from_function(lambda m, b: 0.010 + 0.004 * max(m - 8, 0))  # 8 tokens free, then linear
    budget = AutoBudget(cost)
    budget.refresh(history)
    mixed = items(1, key="long") + [BudgetItem("s", chain(8, 0.8), 1, "short", 10)]
    long_k, short_k = budget.select(mixed)
    assert long_k > short_k


def test_cost_model_interpolates_between_measured_points():
    cost = CostModel({1: [(1, 0.01), (4, 0.02)], 16: [(16, 0.05), (64, 0.2)]})
    assert cost(1, 1) == 0.01 and cost(4, 1) == 0.02
    assert 0.01 < cost(2, 1) < 0.02
    assert cost(8, 1) > 0.02  # extrapolated along the last slope
    low, high = sorted((cost(16, 1), cost(16, 16)))
    assert low < cost(16, 4) < high  # between the batch-1 and batch-16 curves, log-interpolated in B


def test_parse_budget():
    assert parse_budget("off").select(items(2)) == [0, 0]
    assert parse_budget("fixed:3").select(items(2)) == [3, 3]
    assert isinstance(parse_budget("fixed:3"), FixedBudget)
    assert isinstance(parse_budget("auto", cost=FLAT), AutoBudget)
    with pytest.raises(ValueError, match="must be 'auto', 'off' or 'fixed:K'"):
        parse_budget("fixed:many")
    with pytest.raises(ValueError, match="needs a cost model"):
        parse_budget("auto")


@pytest.mark.slow
def test_measured_cost_model_drafts_more_at_batch_1_than_at_batch_64(smol_model, tmp_path):
    cost = measure_cost_model(smol_model, 64, tmp_path / "cost.json", log=print)
    assert (tmp_path / "cost.json").exists()
    print({b: [(m, round(t * 1e3, 1)) for m, t in pts] for b, pts in cost.grid.items()})
    budget = AutoBudget(cost, length_aware=False)
    at_1 = budget.select(items(1, p=0.7))[0]
    at_64 = sum(budget.select(items(64, p=0.7))) / 64
    print(f"nodes per sequence: batch 1 -> {at_1}, batch 64 -> {at_64:.2f}")
    assert at_1 > at_64
    assert at_1 >= 2


def test_cost_model_fits_a_short_max_model_len(tiny_folder):
    """The probe's context and drafts are cut to the model's length instead of writing past the cache."""
    from rollout.budget import measure_cost_model
    from rollout.engine.model import TargetModel

    model = TargetModel.from_folder(tiny_folder, max_model_len=24, tune=False)
    cost = measure_cost_model(model, max_batch=4, log=lambda _: None)
    assert float(cost.times(np.array([8.0]), 1)[0]) > 0
