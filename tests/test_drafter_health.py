"""The stale-drafter alarm (rollout/drafter_health.py): acceptance compared across policy versions, a warning naming
the drafter and the version when it collapses, the figures in the engine's counters and the services' stats."""

from __future__ import annotations

import logging

import pytest
from conftest import make_engine

from drafters.base import Draft
from drafters.reference import ReferenceDrafter
from rollout.budget import parse_budget
from rollout.drafter_health import DrafterHealth, merged
from rollout.engine.model import TargetModel
from rollout.sampling import SamplingParams

LOGGER = "rollout.drafter_health"


def test_a_collapse_below_half_over_enough_drafted_tokens_warns_once(caplog):
    health = DrafterHealth("suffix", min_drafted=100)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        health.record(0, 200, 160)  # 0.8
        health.record(1, 60, 0)  # too few drafted tokens to judge
        assert not health.collapsed and not caplog.records
        health.record(1, 60, 6)  # 6 / 120 = 0.05 < 0.4
        health.record(1, 50, 0)  # still collapsed: one warning per version
    assert health.collapsed and health.collapsed_versions == [1]
    (record,) = caplog.records
    message = record.getMessage()
    assert "drafter 'suffix'" in message and "policy version 1" in message and "version 0" in message
    figures = health.figures()
    assert figures["drafter_version"] == 1 and figures["drafter_previous_version"] == 0
    assert figures["drafter_acceptance"] == pytest.approx(6 / 170)
    assert figures["drafter_previous_acceptance"] == pytest.approx(0.8)
    assert figures["drafter_collapsed"] and figures["drafter_alarm"] == message


def test_a_mild_drop_and_a_recovery_raise_no_alarm(caplog):
    health = DrafterHealth("ngram", min_drafted=100)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        health.record(0, 100, 50)  # 0.5
        health.record(1, 100, 30)  # 0.3: lower, not below half
        health.record(2, 100, 90)  # compared with version 1
        health.record(1, 100, 0)  # a straggler of an older version is ignored
    assert not caplog.records and not health.collapsed
    assert health.previous_version == 1 and health.figures()["drafter_acceptance"] == pytest.approx(0.9)


class Recall(ReferenceDrafter):
    """Drafts the rollout it remembers for the request at the current position, whether the request still follows
    it or not: a drafter sure of what it learned, hence stale once the policy moves (ReferenceDrafter itself stops
    drafting at the first mismatch)."""

    def propose(self, request_id, max_tokens):
        reference, generated = self._state[request_id]
        tokens = reference[len(generated) : len(generated) + max_tokens]
        return Draft(tokens, probs=[1.0] * len(tokens))


def test_a_drafter_made_stale_on_purpose_sets_off_the_alarm_in_the_engine(tiny_folder, caplog):
    """A drafter that knows the policy's rollouts drafts them all right; new weights change the policy and the
    drafter keeps drafting the old rollouts (stale on purpose): acceptance collapses at that version."""
    model = TargetModel.from_folder(tiny_folder, max_model_len=256, tune=False)  # its own: the weights change
    drafter = Recall(by_request={})
    engine = make_engine(model, drafter=drafter, budget=parse_budget("fixed:4"))
    engine.drafter_health.min_drafted = 64
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
    ids = [f"r{i}" for i in range(len(prompts))]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)

    def rollouts() -> list[list[int]]:
        return [r.token_ids for r in engine.generate(prompts, params, request_ids=ids)]

    with engine.plain():
        drafter.by_request.update(zip(ids, rollouts()))  # what the policy at version 0 generates
    assert rollouts() == list(drafter.by_request.values())
    healthy = engine.counters()
    assert healthy["drafter_version"] == 0 and healthy["drafter_acceptance"] > 0.9 and not healthy["drafter_collapsed"]

    head = model.lm_head.detach().clone()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        engine.update_weights([("lm_head.weight", -head)])  # another policy; the drafter is stale
        changed = rollouts()
    assert changed != list(drafter.by_request.values())
    stale = engine.counters()
    assert stale["drafter_version"] == 1 and stale["drafter_previous_version"] == 0
    assert stale["drafter_collapsed"] and stale["drafter_acceptance"] < 0.5 * stale["drafter_previous_acceptance"]
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert "drafter 'Recall'" in record.getMessage() and "policy version 1" in record.getMessage()

    drafter.by_request.update(zip(ids, changed))  # refreshed: the alarm clears at the next version
    engine.update_weights([("lm_head.weight", -head)], version=2)  # the same weights, a new version
    rollouts()
    assert not engine.counters()["drafter_collapsed"] and engine.counters()["drafter_collapsed_versions"] == [1]


def test_the_figures_of_several_replicas_merge_and_the_cluster_relays_alarms(caplog):
    from rollout.cluster import RolloutCluster

    a, b = DrafterHealth("suffix", min_drafted=10), DrafterHealth("suffix", min_drafted=10)
    a.record(0, 100, 80), b.record(0, 100, 60)
    a.record(1, 100, 10), b.record(1, 300, 150)  # worker 0 collapsed (0.1 < 0.4), worker 1 did not (0.5 > 0.3)
    rows = [{"worker": 0, **a.figures()}, {"worker": 1, **b.figures()}]
    figures = merged(rows)
    assert figures["drafter_acceptance"] == pytest.approx(160 / 400)
    assert figures["drafter_previous_acceptance"] == pytest.approx(0.7) and figures["drafter_collapsed"]
    cluster = RolloutCluster.__new__(RolloutCluster)  # only the relay: no Ray needed
    cluster._alarms = set()
    with caplog.at_level(logging.WARNING, logger="rollout.cluster"):
        cluster._relay_alarms(rows)
        cluster._relay_alarms(rows)  # once per alarm
    (record,) = [r for r in caplog.records if r.name == "rollout.cluster"]
    assert record.getMessage().startswith("worker 0: drafter 'suffix': acceptance collapsed at policy version 1")
    assert merged([{"worker": 0, "target_forwards": 1}])["drafter_acceptance"] is None
