"""The compiled drafter cores (drafters/csrc) held to their Python references, draft for draft.

`suffix` (compiled) against `suffix_reference`, `ngram` against `ngram_reference` / `lookup`: a table of cases, one
per source and rule, each with the draft worked out by hand; a randomized property test over thousands of steps of
begin / observe / propose / end / refresh on small vocabularies (many matches, many ties); the global index's arrays
compared position for position; both committed SmolLM2 traces replayed end to end; and the engine, whose rollouts
must not change whichever implementation drafts.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import LockstepDrafter

from drafters.base import Draft, make_drafter
from drafters.ngram import NgramDrafter, NgramReferenceDrafter, lookup
from drafters.replay import replay
from drafters.suffix import SuffixDrafter
from drafters.suffix_reference import SuffixReferenceDrafter, token_probs
from drafters.token_index import TokenIndex
from rollout.history import RolloutHistory, rows_to_batch

TRACES = Path(__file__).resolve().parents[1] / "benchmarks" / "traces"


def both(**options) -> LockstepDrafter:
    """The compiled drafter, checked at every propose against the reference built with the same options."""
    return LockstepDrafter(SuffixDrafter(**options), SuffixReferenceDrafter(**options))


def rollout(prompt, output, version=0, logprobs=None):
    return {
        "request_id": None,
        "prompt_key": None,
        "group": None,
        "policy_version": version,
        "prompt_ids": prompt,
        "token_ids": output,
        "logprobs": logprobs,
        "finish_reason": "length",
    }


def history_of(*rows) -> RolloutHistory:
    history = RolloutHistory()
    history.append(rows_to_batch(rows))
    return history


# ---------------------------------------------------------------------------------------------- float16


def test_float16_rounding_is_numpys():
    """The global index stores probabilities as float16, rounded by the core as numpy rounds them (the whole float32
    range was compared once, 0 mismatches; here a sample, every halfway case of [2^-26, 1] and the edges)."""
    native = pytest.importorskip("drafters._native")
    rng = np.random.default_rng(0)
    halves = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16).astype(np.float32)  # every half in [0, 1]
    midpoints = (halves[:-1] + (halves[1:] - halves[:-1]) / 2).astype(np.float32)  # exact in float32
    values = np.concatenate(
        [
            rng.random(200_000, dtype=np.float32),
            rng.random(50_000).astype(np.float32) * np.float32(1e-5),  # subnormal halves
            halves,
            midpoints,
            np.nextafter(midpoints, np.float32(0)),
            np.nextafter(midpoints, np.float32(1)),
            np.array(
                [0.0, -0.0, 65504.0, 65519.996, 65520.0, 1e6, -1e6, np.inf, -np.inf, 5.96e-8, 2.98e-8, 2.99e-8]
            ).astype(np.float32),
        ]
    )
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).view(np.uint16)
    got = native.float_to_half(values)
    assert np.array_equal(got, want)
    assert np.isnan(native.float_to_half(np.array([np.nan], np.float32)).view(np.float16)).all()


# ---------------------------------------------------------------------------------------------- one case per rule


def test_other_groups_in_flight_newest_first_and_capped_by_max_walk():
    # a1 and a2 (group "ga") have both continued "7 8 9": a1 with 10, then a2 with 20. b (group "gb") ends in
    # "7 8 9": both continuations are candidates, of equal weight (global_weight x 3**4), a2's first as the newer.
    for max_walk, want in ((32, [20, 10]), (1, [20])):
        d = both(max_walk=max_walk)
        d.begin("a1", [1, 2, 3], "ga")
        d.begin("a2", [4, 5, 0], "ga")
        d.observe("a1", [7, 8, 9, 10])
        d.observe("a2", [7, 8, 9, 20])
        d.begin("b", [6, 7, 8, 9], "gb")
        draft = d.propose("b", 4)
        assert draft.token_ids == want and draft.parent_list() == [-1] * len(want), max_walk
    # A request's own group is never "another group": c (group "ga") gets a1/a2 as siblings instead, weighted more.
    d.begin("c", [11, 7, 8, 9], "ga")
    assert d.propose("c", 4).token_ids == [10, 20]  # siblings in the order they began
    # min_prob: each of the two first-level nodes is 81 / (162 + 1) < 0.5
    d = both(min_prob=0.5)
    d.begin("a1", [1, 2, 3], "ga")
    d.observe("a1", [7, 8, 9, 10])
    d.begin("a2", [4, 5, 0], "ga")
    d.observe("a2", [7, 8, 9, 20])
    d.begin("b", [6, 7, 8, 9], "gb")
    assert d.propose("b", 4).token_ids == []
    # An ended request's in-flight entries are skipped (its rollout now sits in the global window instead, matched
    # there by its last two tokens: min_match_global=4 rules that out, as "6 7 8 9" vs "3 7 8 9" is 3 long).
    d = both(min_match_global=3)
    d.begin("a1", [1, 2, 3], "ga")
    d.observe("a1", [7, 8, 9, 10])
    d.begin("b", [6, 7, 8, 9], "gb")
    assert d.propose("b", 2).token_ids == [10]
    d.end("a1")
    assert d.propose("b", 2).token_ids == [10]  # now from the global window
    d = both(min_match_global=4)
    d.begin("a1", [1, 2, 3], "ga")
    d.observe("a1", [7, 8, 9, 10])
    d.begin("b", [6, 7, 8, 9], "gb")
    assert d.propose("b", 2).token_ids == []


def test_prompt_lookup_needs_min_match_self_tokens():
    # "1 2" occurred before, followed by "9 1 2": a match of two tokens ("4" vs "9" ends it).
    for min_match, want in ((2, [9, 1, 2]), (3, [])):
        d = both(min_match_self=min_match)
        d.begin("x", [4, 1, 2, 9, 1, 2], None)
        assert d.propose("x", 3).token_ids == want, min_match


def test_prompt_store_keeps_the_newest_rollouts_per_prompt():
    # Three rollouts of one prompt: 10, then 11, then 12. The store (weight 4 x 3**4 each: the match reaches back
    # through the 3 prompt tokens) lists them oldest first; the global window (1 x 3**4 each) newest first.
    history = history_of(*(rollout([1, 2, 3], [t]) for t in (10, 11, 12)))
    for kept, want in ((3, [10, 11, 12]), (2, [11, 12, 10])):
        d = both(max_rollouts_per_prompt=kept)
        d.refresh(history, 0)
        d.begin("x", [1, 2, 3], None)
        # kept=3: each token gets 324 + 81, ties in the order the ranked candidates reached them. kept=2: 10 has
        # only its global 81, behind 11 and 12.
        assert d.propose("x", 4).token_ids == want, kept
    d = both(max_candidates=1)  # only the best candidate: the store's oldest of three equal weights
    d.refresh(history, 0)
    d.begin("x", [1, 2, 3], None)
    assert d.propose("x", 4).token_ids == [10]


@pytest.mark.parametrize("path", ["refresh", "end"])
def test_global_window_drops_the_oldest_rollouts_beyond_its_cap(path):
    # Three rollouts of three prompts continue "7 8" with 20, 21, 22; with no prompt tail each takes 3 tokens + a
    # separator, so a cap of 8 keeps the newest two. Reached by a refresh (build) and by requests ending (add).
    outputs = [[7, 8, 20], [7, 8, 21], [7, 8, 22]]
    for cap, want in ((2_000_000, [22, 21, 20]), (8, [22, 21])):
        d = both(global_max_tokens=cap, prompt_tail=0)
        if path == "refresh":
            d.refresh(history_of(*(rollout([i, i + 50], out) for i, out in enumerate(outputs))), 0)
        else:
            for i, out in enumerate(outputs):
                d.begin(f"r{i}", [i, i + 50], None)
                d.observe(f"r{i}", out)
                d.end(f"r{i}")
        d.begin("x", [9, 7, 8], None)
        assert d.propose("x", 4).token_ids == want, cap
        d.drafter.check_integrity()
        d.reference.check_integrity()


def test_continuations_stop_at_the_end_of_a_stored_rollout():
    d = both(min_prob=0.0)
    d.refresh(history_of(rollout([1, 2, 3], [10, 11]), rollout([1, 2, 3], [12, 13])), 0)
    d.begin("x", [1, 2, 3], None)
    draft = d.propose("x", 8)
    paths: list[tuple[int, ...]] = []  # each node's token path from the root
    for t, p in zip(draft.token_ids, draft.parent_list()):
        paths.append((paths[p] if p >= 0 else ()) + (t,))
    assert set(paths) == {(10,), (10, 11), (12,), (12, 13)}  # nothing after 11 or 13: the separators end them


def test_recorded_probabilities_weigh_in_by_logprob_trust():
    # One rollout whose output token was sampled with probability 0.3: its node's estimate moves from the vote
    # (weight / (weight + prior), near 1) to the recorded probability as logprob_trust goes from 0 to 1.
    history = history_of(rollout([1, 2, 3], [10], logprobs=[math.log(0.3)]))
    estimates = {}
    for trust in (0.0, 0.5, 1.0):
        d = both(logprob_trust=trust)
        d.refresh(history, 0)
        d.begin("x", [1, 2, 3], None)
        draft = d.propose("x", 1)
        assert draft.token_ids == [10]
        estimates[trust] = draft.probs[0]
    assert estimates[0.0] > 0.99
    assert estimates[1.0] == pytest.approx(0.3, abs=1e-3)  # float32 from the store, float16 from the global window
    assert estimates[0.5] == pytest.approx((estimates[0.0] + estimates[1.0]) / 2, abs=1e-9)


@pytest.mark.parametrize("decay,first", [(1.0, 10), (0.5, 11)])
def test_rollouts_that_end_are_stored_under_the_current_version(decay, first):
    # Three rollouts writing 10 end at version 0; after refresh(None, 3) one writing 11 ends at version 3. Without
    # decay 10 wins three to one; with decay 0.5 the version-0 rollouts weigh 1/8 each and 11 wins.
    d = both(decay=decay)
    for i in range(3):
        d.begin(f"old{i}", [1, 2, 3], f"g{i}")
        d.observe(f"old{i}", [10])
        d.end(f"old{i}")
    d.refresh(None, 3)
    d.begin("new", [1, 2, 3], "g9")
    d.observe("new", [11])
    d.end("new")
    d.begin("x", [1, 2, 3], None)
    assert d.propose("x", 2).token_ids[0] == first


def test_bad_calls_are_refused_with_the_reason():
    d = SuffixDrafter()
    d.begin("a", [1, 2, 3], None)
    with pytest.raises(ValueError, match="began twice"):
        d.begin("a", [1, 2, 3], None)
    with pytest.raises(ValueError, match="ids must be >= 0, got -5"):
        d.observe("a", [4, -5])
    with pytest.raises(KeyError):
        d.propose("never-begun", 4)
    d.end("a")
    d.end("a")  # ending twice is a no-op, as in the reference
    assert d.propose_batch([], []) == []


def test_a_missing_build_names_how_to_build_it(monkeypatch):
    """No silent fallback to the slow reference: the error says what to run."""
    import drafters

    monkeypatch.delattr(drafters, "_native", raising=False)
    monkeypatch.setitem(sys.modules, "drafters._native", None)  # makes `from drafters import _native` fail
    with pytest.raises(ImportError, match=r"pip install -e \..*C\+\+17 compiler"):
        make_drafter("suffix")
    with pytest.raises(ImportError, match="drafters/_native is not built"):
        make_drafter("ngram")


# ---------------------------------------------------------------------------------------------- randomized


CONFIGS = [
    {},
    {"max_rollouts_per_prompt": 3, "global_max_tokens": 120, "max_walk": 2, "max_candidates": 4, "min_prob": 0.0},
    {"decay": 1.0, "logprob_trust": 1.0, "min_match_group": 2, "min_match_self": 2, "min_match_global": 3},
    {"decay": 0.3, "logprob_trust": 0.0, "max_match": 4, "prompt_tail": 1, "match_power": 1.5, "prior": 0.25},
    {"max_depth": 3, "min_prob": 0.2, "group_weight": 1.0, "self_weight": 1.0, "window_versions": 2},
]


def random_session(rng: random.Random, config: dict, steps: int, vocab: int) -> int:
    """Random lifecycle calls on both implementations; returns how many drafts were compared."""
    d = both(**config)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 6))] for _ in range(4)]
    live: dict[str, list[int]] = {}
    history = RolloutHistory()
    version, serial = 0, 0
    for step in range(steps):
        op = rng.random()
        if op < 0.15 or not live:
            rid = f"r{serial}"
            serial += 1
            prompt = rng.choice(prompts)
            d.begin(rid, prompt, rng.choice([None, "g0", "g1", "g2"]))
            live[rid] = list(prompt)
        elif op < 0.5:
            rid = rng.choice(sorted(live))
            toks = [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
            kind = rng.random()
            lps = None if kind < 0.3 else [-rng.random() * 3 for _ in toks] if kind < 0.9 else [-0.5]  # wrong length
            d.observe(rid, toks, lps)
            live[rid] += toks
        elif op < 0.8:
            rids = rng.sample(sorted(live), rng.randint(1, len(live)))
            d.propose_batch(rids, [rng.randint(0, 10) for _ in rids])
        elif op < 0.95:
            rid = rng.choice(sorted(live))
            d.end(rid)
            tokens = live.pop(rid)
            if rng.random() < 0.7:  # what a history would have recorded of it (not everything ends up there)
                history.append(rows_to_batch([rollout(tokens[:2], tokens[2:], version)]))
        else:
            version += rng.randint(0, 2)
            d.refresh(history if rng.random() < 0.7 else None, version)
        if step % 500 == 0:
            d.drafter.check_integrity()
            d.reference.check_integrity()
    return d.compared


@pytest.mark.parametrize("case", range(len(CONFIGS)), ids=lambda i: ",".join(f"{k}={v}" for k, v in CONFIGS[i].items()))
def test_random_sessions_give_the_references_drafts(case):
    config = CONFIGS[case]
    rng = random.Random(case)
    compared = sum(random_session(rng, config, 1000, vocab) for vocab in (3, 6, 40))
    assert compared > 1500


def test_global_index_arrays_equal_the_python_index():
    """The core's global window, position for position, against drafters/token_index.py fed the same sequences."""
    rng = random.Random(7)
    d = SuffixDrafter(global_max_tokens=300, prompt_tail=2)
    index = TokenIndex(max_tokens=300)
    for i in range(400):
        prompt = [rng.randrange(9) for _ in range(rng.randint(1, 5))]
        output = [rng.randrange(9) for _ in range(rng.randint(1, 12))]
        logprobs = [-3 * rng.random() for _ in output]
        d.begin(f"r{i}", prompt, None)
        d.observe(f"r{i}", output, logprobs)
        d.end(f"r{i}")
        tail = min(2, len(prompt))
        p = np.concatenate([np.full(tail, np.nan, np.float32), token_probs(logprobs)])
        index.add(prompt[len(prompt) - tail :] + output, 0, tail, p)
    state = d.core.global_state()
    assert np.array_equal(state["tokens"], index.tokens.view)
    assert np.array_equal(state["prev"], index.prev.view) and np.array_equal(state["head"], index.head)
    assert np.array_equal(state["versions"], index.versions.view)
    assert np.array_equal(state["probs"], index.probs.view.view(np.uint16))
    assert state["segments"] == [tuple(s) for s in index.segments]
    assert len(index.segments) < 400  # the cap evicted


# ---------------------------------------------------------------------------------------------- the traces


def trace(temperature: float) -> RolloutHistory:
    return RolloutHistory.load(TRACES / f"smollm2_t{temperature}.parquet")


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_committed_traces_replay_to_the_references_drafts(temperature):
    """Every draft of a whole replay (512 rollouts, 4 policy versions, 8-token drafts) equals the reference's."""
    lockstep = LockstepDrafter(SuffixDrafter(), SuffixReferenceDrafter())
    stats = replay(trace(temperature), lockstep, 8)
    assert lockstep.compared == stats.sequence_steps > 9000
    ngram = LockstepDrafter(NgramDrafter(), NgramReferenceDrafter())
    assert replay(trace(temperature), ngram, 8).sequence_steps == ngram.compared


# ---------------------------------------------------------------------------------------------- ngram


def test_compiled_prompt_lookup_equals_lookup():
    native = pytest.importorskip("drafters._native")
    rng = np.random.default_rng(1)
    for _ in range(3000):
        tokens = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(0, 30))).astype(np.int32)
        max_tokens, min_n = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 4))
        assert native.ngram_lookup(tokens, max_tokens, min_n, max_n) == lookup(tokens, max_tokens, min_n, max_n)


def test_ngram_drafters_agree_over_a_batch():
    rng = random.Random(2)
    d = LockstepDrafter(NgramDrafter(min_n=2, max_n=3), NgramReferenceDrafter(min_n=2, max_n=3))
    for i in range(20):
        d.begin(f"r{i}", [rng.randrange(4) for _ in range(rng.randint(1, 8))], None)
    for _ in range(200):
        ids = [f"r{i}" for i in range(20)]
        d.observe_batch(ids, [[rng.randrange(4) for _ in range(rng.randint(0, 3))] for _ in ids])
        d.propose_batch(ids, [rng.randint(0, 6) for _ in ids])
    assert d.compared == 4000


# ---------------------------------------------------------------------------------------------- through the engine


class CountingDrafter(SuffixDrafter):
    """The compiled suffix drafter, counting the batched calls it gets."""

    def __init__(self):
        super().__init__()
        self.calls = {"propose_batch": 0, "observe_batch": 0, "propose": 0, "observe": 0}

    def propose_batch(self, request_ids, max_tokens):
        self.calls["propose_batch"] += 1
        return super().propose_batch(request_ids, max_tokens)

    def observe_batch(self, request_ids, token_ids, logprobs=None):
        self.calls["observe_batch"] += 1
        return super().observe_batch(request_ids, token_ids, logprobs)

    def propose(self, request_id, max_tokens):
        self.calls["propose"] += 1
        return super().propose(request_id, max_tokens)

    def observe(self, request_id, token_ids, logprobs=None):
        self.calls["observe"] += 1
        return super().observe(request_id, token_ids, logprobs)


def engine_rollouts(model, drafter, prompts, params, groups, budget="fixed:6"):
    from conftest import make_engine

    from rollout.budget import parse_budget

    engine = make_engine(model, max_num_seqs=len(prompts), drafter=drafter, budget=parse_budget(budget))
    for rnd in range(2):  # a second round drafts from the first one's rollouts too
        engine.policy_version = rnd
        engine.refresh_drafter()
        results = engine.generate(prompts, params, groups=groups)
    return engine, results


def test_engine_calls_the_compiled_drafter_once_per_step(tiny_model):
    from rollout.sampling import SamplingParams

    prompts = [[1, 2, 3, 1, 2, 3], [4, 5, 6, 4, 5, 6]] * 3
    drafter = CountingDrafter()
    engine, _ = engine_rollouts(tiny_model, drafter, prompts, SamplingParams(max_tokens=16), None)
    assert drafter.calls["propose"] == drafter.calls["observe"] == 0
    assert 0 < drafter.calls["propose_batch"] <= engine.total_forwards
    assert 0 < drafter.calls["observe_batch"] <= engine.total_forwards


def rollout_figures(results):
    return [(r.token_ids, r.logprobs, r.spec.target_forwards, r.spec.drafted, r.spec.accepted) for r in results]


def test_engine_rollouts_and_drafts_are_the_references_tiny(tiny_model):
    """Greedy: the compiled drafter's tokens are plain decoding's. Seeded T=1.0: its rollouts, logprobs and draft
    statistics are those of the engine drafting with the reference (every draft checked on the way)."""
    from rollout.sampling import SamplingParams

    g = random.Random(4)
    prompts = [[g.randrange(384) for _ in range(n)] for n in (3, 9, 9, 17, 5, 5)]
    groups = ["a", "b", "b", "c", "d", "d"]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    _, plain = engine_rollouts(tiny_model, None, prompts, greedy, groups, budget="off")
    _, spec = engine_rollouts(tiny_model, SuffixDrafter(), prompts, greedy, groups)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert sum(r.spec.accepted for r in spec) > 0
    sampled = [SamplingParams(temperature=1.0, max_tokens=32, seed=i, ignore_eos=True) for i in range(len(prompts))]
    lockstep = LockstepDrafter(SuffixDrafter(), SuffixReferenceDrafter())
    _, checked = engine_rollouts(tiny_model, lockstep, prompts, sampled, groups)
    _, reference = engine_rollouts(tiny_model, SuffixReferenceDrafter(), prompts, sampled, groups)
    assert lockstep.compared > 50
    assert rollout_figures(checked) == rollout_figures(reference)


@pytest.mark.slow
@pytest.mark.exactness
def test_engine_rollouts_and_drafts_are_the_references_smollm2(smol_model, smol_tokenizer):
    """SmolLM2, 4 prompts x 4 samples, two rounds: greedy tokens equal plain decoding's; seeded T=0.8 rollouts with
    the compiled drafter equal those with the reference, draft statistics included, every draft compared."""
    from rollout.sampling import SamplingParams
    from rollout.tasks import chat_prompt_ids, list_tasks

    prompts = [chat_prompt_ids(smol_tokenizer, t.prompt) for t in list_tasks(4, seed=8) for _ in range(4)]
    groups = [f"p{i // 4}" for i in range(len(prompts))]
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    _, plain = engine_rollouts(smol_model, None, prompts, greedy, groups, budget="off")
    _, spec = engine_rollouts(smol_model, SuffixDrafter(), prompts, greedy, groups)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    sampled = [SamplingParams(temperature=0.8, max_tokens=40, seed=i) for i in range(len(prompts))]
    lockstep = LockstepDrafter(SuffixDrafter(), SuffixReferenceDrafter())
    _, checked = engine_rollouts(smol_model, lockstep, prompts, sampled, groups)
    _, reference = engine_rollouts(smol_model, SuffixReferenceDrafter(), prompts, sampled, groups)
    print(f"compared {lockstep.compared} drafts; accepted {sum(r.spec.accepted for r in checked)}")
    assert lockstep.compared > 100 and sum(r.spec.accepted for r in checked) > 20
    assert rollout_figures(checked) == rollout_figures(reference)


def test_drafts_are_drafts():
    """The compiled drafter hands back the project's Draft objects (the engine and the budget read their fields)."""
    d = SuffixDrafter()
    d.begin("a", [1, 2, 1, 2], None)
    draft = d.propose("a", 3)
    assert isinstance(draft, Draft) and draft.token_ids == [1, 2] and draft.parents == [-1, 0]
