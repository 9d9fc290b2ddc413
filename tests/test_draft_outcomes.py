"""DraftOutcomes settles each proposed draft incrementally, as tokens arrive in steps of any size; the reference is
replay's accepted_path over the whole emitted stream."""

import random

import pytest

from drafters.base import Draft
from drafters.replay import accepted_path
from rollout.draft_outcomes import DraftOutcomes


@pytest.mark.parametrize("tree", [False, True])
def test_settled_paths_equal_the_replay_of_the_whole_stream(tree):
    rng = random.Random(int(tree))
    outcomes, expected, settled = DraftOutcomes(), {}, {}
    stream = [rng.randrange(3) for _ in range(400)]  # three token ids: long matches and trees with shared tokens
    pos = 0
    while pos < len(stream) - 12:
        # a draft per step, proposed for the tokens from `pos` on, as the engine does before verifying
        n = rng.randint(1, 10)
        parents = [rng.randint(max(-1, i - 3), i - 1) for i in range(n)] if tree else None  # a few levels deep
        draft = Draft([rng.randrange(3) for _ in range(n)], parents)
        outcomes.proposed("r", draft)
        expected[id(draft)] = accepted_path(draft, stream, pos)
        step = stream[pos : pos + rng.randint(1, 4)]  # the step emits 1-4 tokens
        pos += len(step)
        for d, path in outcomes.emitted("r", step):
            settled[id(d)] = path
    for d, path in outcomes.emitted("r", stream[pos:]):
        settled[id(d)] = path
    assert settled == expected
    assert outcomes.open["r"] == []
    if tree:  # the random trees reach past their first level often enough to test the walk
        assert sum(len(p) >= 2 for p in settled.values()) >= 5


def test_a_miss_settles_at_once_and_an_ended_request_forgets_its_open_drafts():
    outcomes = DraftOutcomes()
    outcomes.proposed("a", Draft([5, 6, 7]))
    outcomes.proposed("b", Draft([5, 6, 7]))
    outcomes.proposed("b", Draft([]))  # nothing proposed: nothing to settle
    assert outcomes.emitted("a", [5, 9]) == [(Draft([5, 6, 7]), [0])]
    assert outcomes.emitted("b", [5, 6]) == []  # still matching
    outcomes.end("b")
    assert outcomes.emitted("b", [7]) == []
    assert "b" not in outcomes.open
