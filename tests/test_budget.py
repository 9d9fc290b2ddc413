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


def play(gate: DraftGate, bucket: int, worth, steps: int, noise: float = 0.05, seed: int = 0) -> list[float]:
    """Plays `steps` steps of a bucket; worth(scale, step) is an arm's true efficiency, measured with noise."""
    rng = np.random.default_rng(seed)
    plays = []
    for step in range(steps):
        scale = gate.choose(bucket)
        plays.append(scale)
        gate.record(bucket, scale, worth(scale, step) + noise * rng.standard_normal())
    return plays


def test_gate_finds_the_best_boldness_and_keeps_checking_the_others():
    gate = DraftGate()
    worth = {0.0: 1.0, 0.5: 1.1, 1.0: 1.15, 2.0: 1.3, 4.0: 1.2}  # drafting boldly is most efficient here
    plays = play(gate, 6, lambda s, _: worth[s], 200)
    assert plays[:5] == [1.0, 0.5, 0.0, 2.0, 4.0]  # nothing known: the trusted arm, then outward from it
    assert plays.count(2.0) > 120
    # every arm's figure fades unless it is played, so none is benched for good: each is re-checked late on
    assert set(plays[100:]) == set(worth)
    assert plays[100:].count(0.0) < plays[100:].count(4.0)  # a worse arm is re-checked less often


def test_gate_turns_drafting_off_where_it_loses():
    gate = DraftGate()
    worth = {0.0: 1.0, 0.5: 0.9, 1.0: 0.8, 2.0: 0.6, 4.0: 0.5}
    plays = play(gate, 3, lambda s, _: worth[s], 100)
    assert plays[5:].count(0.0) > 60


def test_gate_comes_back_to_an_arm_whose_first_plays_were_unlucky():
    # The stall seen in the tail of a batch (service.json, before discounting): the bold arm's first plays fell
    # among slow steps, then it became the best by far; the gate must find that out within the bucket's steps.
    gate = DraftGate()

    def worth(scale, step):
        if scale == 4.0:
            return 0.5 if step < 10 else 1.5
        return {0.0: 1.0, 0.5: 0.9, 1.0: 0.85, 2.0: 0.8}[scale]

    plays = play(gate, 4, worth, 120)
    assert plays[:10].count(4.0) >= 1
    assert plays[60:].count(4.0) > 40


def test_a_new_bucket_starts_from_the_nearest_bucket_played():
    # The batch drains through the buckets one by one; the tail's buckets are short, so a new bucket starts from
    # what its neighbour learnt instead of trying every arm again.
    gate = DraftGate()
    play(gate, 6, lambda s, _: {0.0: 1.0, 0.5: 1.05, 1.0: 1.1, 2.0: 1.2, 4.0: 1.4}[s], 60)
    assert gate.choose(5) == 4.0
    assert gate.summary()[5][4.0][1] <= gate.borrowed  # borrowed evidence is worth little against its own


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
    assert not budget.gate._arms  # a prefill is neither arm's evidence
    assert budget.max_draft(8) > 0


class VerifyNothing(FixedBudget):
    """Asks for drafts of 8, verifies none of them, and records the feedback it is given."""

    def __init__(self):
        super().__init__(0)
        self.calls: list[tuple[Draft, list[int]]] = []

    def max_draft(self, batch: int, prefill: bool = False) -> int:
        return 8

    def feedback(self, request_id, draft, accepted):
        self.calls.append((draft, list(accepted)))


def test_a_draft_verified_nowhere_is_still_judged_at_its_first_level(tiny_model):
    # The token a step emits does not depend on the draft, so a first-level node the budget declined to verify
    # would have been accepted exactly when it equals that token: the budget learns it for free. Without it a
    # sequence whose drafts once fared badly would never be drafted again.
    from conftest import make_engine
    from helpers import WrongDrafter, WrongFirstTreeDrafter

    from rollout.sampling import SamplingParams

    g = np.random.default_rng(5)
    prompts = [g.integers(0, 384, n).tolist() for n in (3, 17, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    base = [r.token_ids for r in make_engine(tiny_model, budget=parse_budget("off")).generate(prompts, params)]
    refs = {tuple(p): out for p, out in zip(prompts, base)}
    # WrongFirstTree's first level is [wrong, right]; Wrong's is [wrong]
    for drafter, hit in ((WrongFirstTreeDrafter(refs, 384), [1]), (WrongDrafter(refs, 384), [])):
        budget = VerifyNothing()
        results = make_engine(tiny_model, drafter=drafter, budget=budget).generate(prompts, params)
        assert [r.token_ids for r in results] == base
        assert all(r.spec.drafted == 0 for r in results)  # nothing was verified
        # every step but each sequence's last (no room for a draft) judged the first level
        assert len(budget.calls) == len(prompts) * (params.max_tokens - 1)
        for draft, accepted in budget.calls:
            assert set(draft.depths()) == {1}
            # near its end a sequence has room for one node: the tree is cut to its first (wrong) candidate
            assert accepted == (hit if len(draft) == 2 else [])
        if hit:
            assert sum(len(d) == 2 for d, _ in budget.calls) > len(budget.calls) / 2
