"""The draft budget: what it picks under synthetic and measured step costs, calibration, length classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import cost_from_function

from drafters.base import Draft
from rollout.budget import Acceptance, AutoBudget, BudgetItem, FixedBudget, parse_budget
from rollout.cost_model import CostModel, StepClock
from rollout.engine.cost_probe import measure_cost_model
from rollout.history import RolloutHistory, rows_to_batch


def chain(n: int, p: float) -> Draft:
    return Draft(list(range(10, 10 + n)), probs=[p] * n)


def items(batch: int, n: int = 8, p: float = 0.8, key: str | None = None, generated: int = 10):
    return [BudgetItem(f"r{i}", chain(n, p), pending=1, prompt_key=key, generated=generated) for i in range(batch)]


LINEAR = cost_from_function(lambda m, b: 0.001 * m)  # every token costs the same: drafting never pays
FLAT = cost_from_function(lambda m, b: 0.020)  # memory-bound: extra tokens are free


def picks(budget, batch, waiting: int = 0) -> list[int]:
    return budget.select(batch, waiting=waiting).counts


def chances(model: Acceptance, request_id: str, draft: Draft, nodes: int) -> np.ndarray:
    """[nodes] one draft's chances of acceptance."""
    return model.batch_chances([request_id], [draft], nodes)[0]


def test_linear_cost_picks_nothing():
    assert picks(AutoBudget(LINEAR), items(1)) == [0]
    assert picks(AutoBudget(LINEAR), items(16)) == [0] * 16


def test_flat_cost_picks_drafts():
    assert all(k > 0 for k in picks(AutoBudget(FLAT), items(4)))


def test_low_acceptance_is_not_worth_a_knee():
    # Verifying costs 30% more per extra token than the first: 0.05-probable nodes do not pay, 0.9 ones do.
    cost = cost_from_function(lambda m, b: 0.010 + 0.003 * (m - b))
    assert picks(AutoBudget(cost), items(1, p=0.05)) == [0]
    assert picks(AutoBudget(cost), items(1, p=0.95))[0] > 0


def test_selection_states_the_forward_it_plans():
    selection = AutoBudget(FLAT).select(items(3) + [BudgetItem("p", chain(4, 0.9), pending=7)])
    assert len(selection.counts) == 4 and selection.prefill
    assert selection.new_tokens == 3 + 7 + sum(selection.counts)
    fixed = FixedBudget(3).select(items(2, n=2))
    assert fixed.counts == [2, 2] and fixed.new_tokens == 6 and not fixed.prefill


def test_running_acceptance_calibrates_the_drafter():
    cost = cost_from_function(lambda m, b: 0.010 + 0.002 * (m - b))
    budget = AutoBudget(cost)
    before = picks(budget, items(1, p=0.9))[0]
    for _ in range(50):  # the drafter claims 0.9 per node but nothing is ever accepted
        budget.feedback("r0", chain(4, 0.9), [])
    after = picks(budget, items(1, p=0.9))[0]
    assert before > 0 and after < before


def test_depth_ratios_learn_what_a_drafters_claims_are_worth():
    """Nodes the drafter rates 0.95 are accepted 30% of the time: a fresh sequence is expected to fare as well."""
    model = Acceptance()
    one = chain(1, 0.95)
    assert chances(model, "fresh", one, 1)[0] == pytest.approx(model.prior_ratio * 0.95)  # nothing seen: the prior
    rng = np.random.default_rng(0)
    for i in range(3000):  # one-node drafts from many sequences
        model.observe(f"r{i}", one, int(rng.random() < 0.3))
        model.seqs.pop(f"r{i}")
    assert chances(model, "fresh", one, 1)[0] == pytest.approx(0.3, abs=0.05)


def test_overconfidence_that_grows_with_depth_is_learned_per_depth():
    """A drafter claims 0.9 per node; the truth is 0.9 at depth 1 and 0.3 beyond. One ratio over all nodes would
    underrate depth 1 and overrate depth 4; a ratio per depth gets both."""
    model = Acceptance()
    rng = np.random.default_rng(1)
    draft = chain(4, 0.9)  # path probs 0.9, 0.81, 0.73, 0.66
    truth = np.cumprod([0.9, 0.3, 0.3, 0.3])
    for i in range(3000):
        accepted = 0
        while accepted < 4 and rng.random() < (0.9 if accepted == 0 else 0.3):
            accepted += 1
        model.observe(f"r{i}", draft, accepted)
        model.seqs.pop(f"r{i}")
    assert chances(model, "fresh", draft, 4) == pytest.approx(truth, abs=0.04)


def test_a_sequence_off_the_recorded_text_is_trusted_less_than_its_neighbours():
    model = Acceptance()
    draft = chain(2, 0.85)
    for _ in range(5):
        model.observe("lost", draft, 0)
        model.observe("on_track", draft, 2)
    lost, on_track, fresh = (chances(model, r, draft, 2)[0] for r in ("lost", "on_track", "fresh"))
    assert lost < fresh < on_track
    # Recency: after a run of accepted drafts the lost sequence is trusted again.
    for _ in range(10):
        model.observe("lost", draft, 2)
    assert chances(model, "lost", draft, 2)[0] > chances(model, "fresh", draft, 2)[0]


def test_feedback_counts_tree_nodes_on_the_accepted_path():
    budget = AutoBudget(FLAT)
    tree = Draft([5, 6, 7], parents=[-1, -1, 0], probs=[0.6, 0.3, 0.9])  # path probs 0.6, 0.3, 0.54
    budget.feedback("r", tree, [0, 2])  # node 0 then its child, node 2; node 1 (a sibling) rejected
    # Nothing seen before: every depth's ratio is the prior's 0.5, so the prediction is half the claims.
    assert budget.acceptance.seqs["r"] == pytest.approx([2.0, 0.5 * 1.44])
    depth = budget.acceptance.depths
    assert depth[0, 1:3] == pytest.approx([1.0, 1.0]) and depth[1, 1:3] == pytest.approx([0.9, 0.54])
    budget.finished("r", None, 10)
    assert "r" not in budget.acceptance.seqs


def test_step_clock_learns_the_plain_step_and_the_extra_tokens_apart():
    model = cost_from_function(lambda m, b: 0.010 + 0.001 * (m - b))
    clock = StepClock(model, prior=0.01)
    assert clock.seconds(32, 16) == pytest.approx(0.026)  # nothing observed: the probe
    # This run's plain steps at batch 16 take 1.5x the probe, its extra tokens 3x the probe's price.
    rng = np.random.default_rng(0)
    for _ in range(100):
        extra = int(rng.integers(0, 48))
        clock.observe(16 + extra, 16, 0.015 + 3 * 0.001 * extra)
    assert clock.fit(16) == pytest.approx((1.5, 3.0), rel=0.01, abs=0.01)
    assert clock.seconds(np.array([16, 24]), 16) == pytest.approx([0.015, 0.039], rel=0.01)
    assert clock.fit(64) == pytest.approx((1.0, 1.0))  # a bucket without steps: the probe
    # The machine gets twice as slow while the budget mostly drafts, with a plain step now and then: both follow.
    for i in range(150):
        extra = 0 if i % 8 == 0 else int(rng.integers(8, 48))
        clock.observe(16 + extra, 16, 2 * (0.015 + 3 * 0.001 * extra))
    assert clock.fit(16) == pytest.approx((3.0, 6.0), rel=0.05, abs=0.05)


def test_expensive_verification_makes_auto_verify_less():
    cost = cost_from_function(lambda m, b: 0.010 + 0.0005 * (m - b))
    budget = AutoBudget(cost, length_aware=False)
    before = sum(picks(budget, items(4, p=0.9)))
    for i in range(40):  # every step with drafts takes far longer than the probe said (drafts vary in quality)
        selection = budget.select(items(4, p=(0.6, 0.75, 0.9)[i % 3]))
        budget.observe_step(selection, 0.010 + 0.010 * sum(selection.counts))
    after = sum(picks(budget, items(4, p=0.9)))
    assert before > 0 and after < before


def test_auto_asks_the_drafter_for_about_twice_what_it_verifies():
    budget = AutoBudget(FLAT, max_nodes=16)
    assert budget.max_draft(8) == 16  # nothing known: half the most it may verify, doubled
    selection = budget.select([BudgetItem(f"r{i}", chain(2, 0.9), 1) for i in range(8)])  # drafts of 2: all kept
    budget.observe_step(selection, 0.02)
    assert budget.max_draft(8) == 4  # 2 kept -> ask for 4 (also the floor)
    assert budget.max_draft(64) == 16  # another bucket has its own record
    # A few long drafts beside short ones: the mean is asked for, not the longest (ragged steps cost).
    uneven = [BudgetItem(f"s{i}", chain(16 if i < 2 else 1, 0.99), 1) for i in range(64)]
    selection = budget.select(uneven)
    assert max(selection.counts) == 16
    budget.observe_step(selection, 0.02)
    assert budget.max_draft(64) == max(4, 2 * -(-sum(selection.counts) // 64)) < 16


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
    cost = cost_from_function(lambda m, b: 0.010 + 0.004 * max(m - 8, 0))  # 8 tokens free, then linear
    budget = AutoBudget(cost)
    budget.refresh(history)
    mixed = items(1, key="long") + [BudgetItem("s", chain(8, 0.8), 1, "short", 10)]
    long_k, short_k = picks(budget, mixed)
    assert long_k > short_k
    # While requests wait for a slot, a short rollout's end hands its slot on: throughput counts, not length class,
    # so the selection is the length-blind one.
    blind = AutoBudget(cost, length_aware=False)
    assert picks(budget, mixed, waiting=3) == picks(blind, mixed)
    assert picks(budget, mixed, waiting=3) != [long_k, short_k]


def test_cost_model_interpolates_between_measured_points():
    cost = CostModel({1: [(1, 0.01), (4, 0.02)], 16: [(16, 0.05), (64, 0.2)]})
    assert cost(1, 1) == 0.01 and cost(4, 1) == 0.02
    assert 0.01 < cost(2, 1) < 0.02
    assert cost(8, 1) > 0.02  # extrapolated along the last slope
    low, high = sorted((cost(16, 1), cost(16, 16)))
    assert low < cost(16, 4) < high  # between the batch-1 and batch-16 curves, log-interpolated in B


def test_padded_rows_cost_the_probes_padded_price_and_the_json_form_keeps_it():
    cost = cost_from_function(lambda m, b: 0.010 + 0.001 * (m - b))
    cost.padded.update({16: 0.5})
    clock = StepClock(cost)
    # 16 sequences, 32 new tokens padded to 64 rows: 32 padded rows at half a token each cost as 16 more tokens
    assert clock.seconds(32, 16, rows=64) == pytest.approx(clock.seconds(48, 16))
    assert clock.seconds(32, 16) == pytest.approx(0.026)  # unpadded: the curve
    assert clock.seconds(32, 16, rows=64) > clock.seconds(32, 16)
    assert cost.padded_price(1) == 0.0  # nothing measured there (one sequence pads nothing)
    again = CostModel(json.loads(json.dumps(cost.to_json())))
    assert again.grid == cost.grid and again.padded == {16: 0.5}


def test_auto_cuts_long_drafts_beside_short_ones_where_padding_costs():
    # At batch 16, two sequences with long sure drafts beside fourteen with sure drafts of one node: when padded rows
    # are free, the long drafts are kept whole; when a padded row costs most of a token, they are cut towards the rest.
    cost = cost_from_function(lambda m, b: 0.010 + 0.0001 * (m - b))
    batch = [BudgetItem(f"r{i}", chain(12 if i < 2 else 1, 0.95), 1) for i in range(16)]
    free = picks(AutoBudget(cost, length_aware=False), batch)
    assert free[:2] == [12, 12] and free[2:] == [1] * 14
    cost.padded.update({4: 0.9, 16: 0.9, 64: 0.9})
    priced = picks(AutoBudget(cost, length_aware=False), batch)
    assert max(priced[:2]) < 12 and priced[2:] == [1] * 14


def test_cost_model_from_timed_steps_never_makes_more_tokens_cheaper():
    cost = CostModel.from_timings({(1, 1): 0.010, (1, 2): 0.009, (1, 4): 0.012, (4, 1): 0.02, (4, 2): 0.03})
    assert cost.grid == {1: [(1, 0.010), (2, 0.010), (4, 0.012)], 4: [(4, 0.02), (8, 0.03)]}


def test_parse_budget():
    assert picks(parse_budget("off"), items(2)) == [0, 0]
    assert picks(parse_budget("fixed:3"), items(2)) == [3, 3]
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
    at_1 = picks(budget, items(1, p=0.7))[0]
    at_64 = sum(picks(budget, items(64, p=0.7))) / 64
    print(f"nodes per sequence: batch 1 -> {at_1}, batch 64 -> {at_64:.2f}")
    assert at_1 > at_64
    assert at_1 >= 2


def test_cost_model_fits_a_short_max_model_len(tiny_folder):
    """The probe's context and drafts are cut to the model's length instead of writing past the cache."""
    from rollout.engine.cost_probe import measure_cost_model
    from rollout.engine.model import TargetModel

    model = TargetModel.from_folder(tiny_folder, max_model_len=24, tune=False)
    cost = measure_cost_model(model, max_batch=4, log=lambda _: None)
    assert float(cost.times(np.array([8.0]), 1)[0]) > 0
    assert set(cost.padded) == {4} and 0.0 <= cost.padded[4] <= 1.0  # the ragged shape fits too


def test_auto_drafts_no_prefill_step_and_leaves_its_clock_alone():
    budget = AutoBudget(cost_from_function(lambda m, b: 0.010))  # verification free: decoding steps draft
    assert budget.max_draft(8, prefill=True) == 0
    prefill = budget.select(items(7) + [BudgetItem("p", chain(0, 0.9), pending=12)])
    budget.observe_step(prefill, 0.5)
    assert not budget.clock._sums  # a prefill's time is not a decoding step's
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


def test_a_draft_verified_nowhere_is_still_judged_at_every_depth(tiny_model):
    # The tokens a sequence emits do not depend on the draft, so a node the budget declined to verify would have
    # been accepted exactly when it matches the emitted token at its place: the budget learns every depth for free.
    # Without it a budget that verifies one node never learns how the second fares, and a sequence whose drafts once
    # fared badly would never be drafted again.
    from conftest import make_engine
    from helpers import WrongDrafter, WrongFirstTreeDrafter

    from rollout.sampling import SamplingParams

    g = np.random.default_rng(5)
    prompts = [g.integers(0, 384, n).tolist() for n in (3, 17, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    base = [r.token_ids for r in make_engine(tiny_model, budget=parse_budget("off")).generate(prompts, params)]
    refs = {tuple(p): out for p, out in zip(prompts, base)}
    # WrongFirstTree: at every level a wrong candidate, then the right one carrying the next level; Wrong: all wrong
    for drafter, right in ((WrongFirstTreeDrafter(refs, 384), True), (WrongDrafter(refs, 384), False)):
        budget = VerifyNothing()
        results = make_engine(tiny_model, drafter=drafter, budget=budget).generate(prompts, params)
        assert [r.token_ids for r in results] == base
        assert all(r.spec.drafted == 0 for r in results)  # nothing was verified
        # every step but each sequence's last (no room for a draft) proposed one, and every one of them settled
        assert len(budget.calls) == len(prompts) * (params.max_tokens - 1)
        for draft, accepted in budget.calls:
            # the right branch (every second node) as deep as the draft holds it (near its end a sequence has room
            # for fewer nodes, and a tree cut to an odd count ends on a wrong candidate), or nothing
            assert accepted == (list(range(1, len(draft), 2)) if right else [])
        if right:
            assert max(d.depth for d, _ in budget.calls) == 4


def random_draft(rng: np.random.Generator, nodes: int) -> Draft:
    """A chain or a tree (each node's parent one of the nodes before it) with random conditional probabilities."""
    if nodes == 0:
        return Draft([])
    parents = None if rng.random() < 0.6 else [int(rng.integers(-1, i)) for i in range(nodes)]
    return Draft(list(rng.integers(0, 100, nodes)), parents, list(rng.uniform(0.05, 1.0, nodes)))


@pytest.mark.parametrize("batch", [1, 3, 16, 64])
def test_batched_selection_equals_the_per_draft_reference(batch):
    """`select` (one set of numpy calls per step, the clock's fit and curve kept) picks exactly what the per-draft
    formulation in tests/budget_reference.py picks, step after step, as acceptance, lengths and the clock learn;
    `observe` leaves the same acceptance state as the reference's np.add.at for every draft."""
    from budget_reference import reference_fit, reference_observe, reference_seconds, reference_select

    rng = np.random.default_rng(batch)
    cost = cost_from_function(lambda m, b: 0.004 + 0.0002 * b + 0.00003 * m**1.2)
    cost.padded.update({4: 0.1, 16: 0.25, 64: 0.4})  # padded rows priced, interpolated between batch sizes
    budget = AutoBudget(cost, max_nodes=12)
    shadow = Acceptance()  # updated by the reference, compared with the budget's
    for step in range(60):
        seqs = [f"r{step // 20}-{i}" for i in range(batch)]  # new requests every 20 steps
        batch_items = [
            BudgetItem(r, random_draft(rng, int(rng.integers(0, 17))), 1, f"p{i % 3}", int(rng.integers(0, 300)))
            for i, r in enumerate(seqs)
        ]
        waiting = int(rng.integers(0, 2)) * 4
        counts = picks(budget, batch_items, waiting)
        assert counts == reference_select(budget, batch_items, waiting), f"step {step}"
        for it, n in zip(batch_items, counts):
            if n:
                verified = it.draft.truncated(n, n)
                accepted = list(range(int(rng.integers(0, verified.depth + 1))))
                budget.feedback(it.request_id, verified, accepted)
                reference_observe(shadow, it.request_id, verified, len(accepted))
        assert np.array_equal(budget.acceptance.depths, shadow.depths)
        assert budget.acceptance.seqs == shadow.seqs
        selection = budget.select(batch_items, waiting)
        seconds = float(reference_seconds(budget.clock, selection.new_tokens, batch)[0]) * rng.uniform(0.8, 1.6)
        budget.observe_step(selection, seconds)
        assert budget.clock.fit(batch) == pytest.approx(tuple(reference_fit(budget.clock, batch)), rel=1e-9)
        tokens = np.arange(batch, batch * 13)
        expected = reference_seconds(budget.clock, tokens, batch)
        assert budget.clock.seconds(tokens, batch) == pytest.approx(expected, rel=1e-12)
        rows = tokens + rng.integers(0, 3 * batch, len(tokens))
        expected = reference_seconds(budget.clock, tokens, batch, rows)
        assert budget.clock.seconds(tokens, batch, rows) == pytest.approx(expected, rel=1e-12)
        if step % 7 == 6:
            for r in seqs[: batch // 2 + 1]:
                budget.finished(r, f"p{int(r.split('-')[1]) % 3}", int(rng.integers(10, 400)))
                shadow.seqs.pop(r, None)
