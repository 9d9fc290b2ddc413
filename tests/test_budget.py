"""The draft budget: what it picks under synthetic and measured step costs, calibration, length classes."""

from __future__ import annotations

import numpy as np
import pytest

from drafters.base import Draft
from rollout.budget import AcceptanceModel, AutoBudget, BudgetItem, DraftGate, FixedBudget, parse_budget
from rollout.cost_model import CostModel, StepCost, batch_bucket, measure_cost_model
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
        budget.feedback("r0", chain(4, 0.9), [])
    after = budget.select(items(1, p=0.9))[0]
    assert before > 0 and after < before


def test_calibration_table_learns_what_a_confidence_is_worth():
    """Nodes the drafter rates 0.95 are accepted 30% of the time: the table learns 0.3 for that bin, for every
    sequence, and leaves other bins at their prior."""
    model = AcceptanceModel()
    rng = np.random.default_rng(0)
    for i in range(2000):  # one-node drafts from many sequences
        model.observe(f"r{i}", np.array([0.95]), np.array([float(rng.random() < 0.3)]))
        model.forget(f"r{i}")
    learnt = model.probs("fresh", np.array([0.95]))[0]
    assert abs(learnt - 0.3) < 0.05, learnt
    untouched = model.probs("fresh", np.array([0.45]))[0]
    assert abs(untouched - 0.45 * model.prior_ratio) < 1e-9  # no outcomes in that bin: the prior alone


def test_a_sequence_off_the_recorded_text_is_trusted_less_than_its_neighbours():
    model = AcceptanceModel()
    for _ in range(5):
        model.observe("lost", np.array([0.9, 0.8]), np.array([0.0, 0.0]))
        model.observe("on_track", np.array([0.9, 0.8]), np.array([1.0, 1.0]))
    lost, on_track, fresh = (model.probs(r, np.array([0.9]))[0] for r in ("lost", "on_track", "fresh"))
    assert lost < fresh < on_track
    # Recency: after a run of accepted drafts the lost sequence is trusted again.
    for _ in range(10):
        model.observe("lost", np.array([0.9, 0.8]), np.array([1.0, 1.0]))
    assert model.probs("lost", np.array([0.9]))[0] > fresh


def test_feedback_counts_tree_nodes_on_the_accepted_path():
    budget = AutoBudget(FLAT)
    tree = Draft([5, 6, 7], parents=[-1, -1, 0], probs=[0.6, 0.3, 0.9])  # path probs 0.6, 0.3, 0.54
    budget.feedback("r", tree, [0, 2])  # node 0 then its child, node 2; node 1 (a sibling) rejected
    acc = budget.acceptance
    assert acc._outcomes.sum() == 3 and acc._accepted.sum() == 2
    assert acc._accepted[acc._bin(np.array([0.3]))[0]] == 0  # the rejected sibling's bin


def test_step_cost_learns_what_extra_tokens_and_drafting_sequences_cost():
    model = CostModel.from_function(lambda m, b: 0.010 + 0.001 * (m - b))
    cost = StepCost(model, prior=0.01)
    assert cost.times(np.array([32]), 16)[0] == pytest.approx(0.026)  # 16 sequences, 16 extra tokens: the probe
    # The machine: plain steps take 1.5x the probe; a drafted step pays 0.3 of a probe's plain step for drafting at
    # all; an extra token 3x the probe's price; each sequence that drafts costs half a plain step's time per
    # sequence on top.
    rng = np.random.default_rng(0)
    for _ in range(200):
        extra, drafting = int(rng.integers(1, 48)), int(rng.integers(1, 17))
        cost.observe(16, 16, 0.015)
        seconds = 0.015 + 0.3 * 0.010 + 3 * 0.001 * extra + 0.5 * (0.010 / 16) * drafting
        cost.observe(16 + extra, 16, seconds, drafting)
    f, d, a, c = cost.fit(16)
    assert cost.plain(16) == pytest.approx(0.015, rel=0.01)
    assert d == pytest.approx(0.3, abs=0.03)
    assert a == pytest.approx(3.0, rel=0.05) and c == pytest.approx(0.5, rel=0.1)
    assert cost.times(np.array([16 + 8]), 16, 4)[0] == pytest.approx(0.015 + 0.003 + 0.024 + 0.00125, rel=0.02)
    assert cost.plain(64) == pytest.approx(model(64, 64) * 1.5, rel=0.01)  # an unseen bucket borrows the pooled fit


def test_step_cost_follows_a_slowdown_while_it_mostly_drafts():
    """The machine gets twice as slow while the budget drafts, with a plain step every 16th (as the gate re-checks
    it): one fit over all steps follows, for plain and drafted steps alike."""
    model = CostModel.from_function(lambda m, b: 0.010 + 0.001 * (m - b))
    cost = StepCost(model, prior=0.01)
    for i in range(40):
        cost.observe(16, 16, 0.010) if i % 2 else cost.observe(32, 16, 0.010 + 0.016, 8)
    for i in range(160):
        cost.observe(16, 16, 0.020) if i % 16 == 0 else cost.observe(32, 16, 2 * (0.010 + 0.016), 8 if i % 2 else 4)
    assert cost.fit(16)[0] == pytest.approx(2.0, rel=0.1)  # the plain factor followed the few plain steps
    assert cost.plain(16) == pytest.approx(0.020, rel=0.1)
    assert cost.times(np.array([32]), 16, 8)[0] == pytest.approx(0.052, rel=0.05)  # and drafted steps are priced


def test_a_cost_per_drafting_sequence_concentrates_the_budget():
    """When drafting a sequence at all costs more than its extra tokens, fewer sequences get longer drafts."""
    cost = CostModel.from_function(lambda m, b: 0.010 + 0.0002 * (m - b))
    batch = [BudgetItem(f"r{i}", chain(8, 0.95 if i < 2 else 0.5), 1) for i in range(8)]
    free = AutoBudget(cost, length_aware=False)
    costly = AutoBudget(cost, length_aware=False)
    costly.step_cost._gram[batch_bucket(8)] = np.diag([1e6] * 4)  # pinned fit: f = 1, d = 0, a = 1, c = 2
    costly.step_cost._moment[batch_bucket(8)] = np.array([1e6, 0.0, 1e6, 2e6])
    assert costly.step_cost.fit(8)[2:] == pytest.approx((1.0, 2.0), rel=1e-3)  # (a, c)
    spread, concentrated = free.select(batch), costly.select(batch)
    assert sum(k > 0 for k in concentrated) < sum(k > 0 for k in spread)
    assert concentrated[0] > 0 and concentrated[1] > 0  # the confident drafts keep theirs


def test_expensive_verification_makes_auto_verify_less():
    cost = CostModel.from_function(lambda m, b: 0.010 + 0.0005 * (m - b))
    budget = AutoBudget(cost, length_aware=False)
    before = sum(budget.select(items(4, p=0.9)))
    for _ in range(40):  # every step with drafts takes far longer than the probe said
        budget.max_draft(4)
        picked = budget.select(items(4, p=0.9))
        extra = sum(picked)
        budget.observe_step(0.010 + 0.010 * extra, 4 + extra // 2)
    after = sum(budget.select(items(4, p=0.9)))
    assert before > 0 and after < before


def test_gate_finds_the_best_boldness_and_revisits_its_neighbours():
    gate = DraftGate(scales=(0.0, 0.5, 1.0, 2.0))  # four arms, so the boldest is best and has one neighbour
    bucket = 6  # batch 32-63
    worth = {0.0: 1.0, 0.5: 1.1, 1.0: 1.15, 2.0: 1.3}  # drafting boldly is most efficient here
    plays = []
    for _ in range(96):
        scale = gate.choose(bucket)
        plays.append(scale)
        gate.record(bucket, scale, worth[scale])
    assert plays[:2] == [1.0, 0.5] and sorted(plays[:8]) == sorted(list(worth) * 2)  # every arm twice first
    assert plays.count(2.0) > 70
    rechecks = [i + 1 for i, s in enumerate(plays) if s != 2.0 and i >= 8]
    # only the best arm's neighbour is re-checked, at power-of-two plays, then every 8th (its figure must not go
    # stale); arms two steps away are left alone
    assert rechecks and all(n & (n - 1) == 0 or n % 8 == 0 for n in rechecks)
    assert {plays[n - 1] for n in rechecks} == {1.0}


def test_gate_turns_drafting_off_where_it_loses():
    gate = DraftGate(scales=(0.0, 0.5, 1.0, 2.0))
    worth = {0.0: 1.0, 0.5: 0.9, 1.0: 0.8, 2.0: 0.6}
    plays = []
    for _ in range(64):
        scale = gate.choose(3)
        plays.append(scale)
        gate.record(3, scale, worth[scale])
    assert plays[8:].count(0.0) > 45 and set(plays[8:]) == {0.0, 0.5}


def test_a_bolder_arm_verifies_more():
    cost = CostModel.from_function(lambda m, b: 0.010 + 0.0004 * (m - b))
    counts = {}
    for scale in (0.5, 1.0, 2.0):
        budget = AutoBudget(cost, length_aware=False)
        budget.gate.first = scale
        budget.max_draft(8)
        counts[scale] = sum(budget.select(items(8, p=0.6)))
    assert counts[0.5] <= counts[1.0] <= counts[2.0] and counts[0.5] < counts[2.0]


def test_auto_asks_the_drafter_for_about_twice_what_it_verifies():
    budget = AutoBudget(FLAT, max_nodes=16)
    for _ in range(30):
        budget.max_draft(8)
        budget.select([BudgetItem(f"r{i}", chain(2, 0.9), 1) for i in range(8)])  # drafts of 2 nodes: all kept
        budget.observe_step(0.02, 24)
    assert budget.max_draft(8) in (0, 4)  # 2 kept -> ask for 4 (the floor), or the gate's plain step


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
    # While requests wait for a slot, a short rollout's end hands its slot on: throughput counts, not length class,
    # so the selection is the length-blind one.
    blind = AutoBudget(cost, length_aware=False)
    assert budget.select(mixed, waiting=3) == blind.select(mixed)
    assert budget.select(mixed, waiting=3) != [long_k, short_k]


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
    from rollout.cost_model import measure_cost_model
    from rollout.engine.model import TargetModel

    model = TargetModel.from_folder(tiny_folder, max_model_len=24, tune=False)
    cost = measure_cost_model(model, max_batch=4, log=lambda _: None)
    assert float(cost.times(np.array([8.0]), 1)[0]) > 0


def test_auto_drafts_no_prefill_step_and_leaves_its_gate_alone():
    budget = AutoBudget(CostModel.from_function(lambda m, b: 0.010))  # verification free: decoding steps draft
    assert budget.max_draft(8, prefill=True) == 0
    budget.select(items(8))
    budget.observe_step(0.5, 8)
    assert not budget.gate._plays and not budget.gate._arms  # a prefill is neither arm's evidence
    assert budget.max_draft(8) > 0
