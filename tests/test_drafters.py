"""Drafter rules on tiny integer arrays (a comment per case), the token index, the registry, and the replay."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from drafters.base import BaseDrafter, Draft, known_drafters, make_drafter
from drafters.matching import Candidates, TreeConfig, build_draft, match_in_array, match_lengths
from drafters.ngram import NgramConfig, NgramDrafter, lookup
from drafters.options import as_options
from drafters.replay import accepted_length, replay
from drafters.suffix import SuffixConfig, SuffixDrafter
from drafters.suffix_reference import SuffixReferenceDrafter
from drafters.token_index import TokenIndex
from rollout.history import RolloutHistory, rows_to_batch

# ---------------------------------------------------------------------------------------------- prompt lookup

NGRAM_CASES = [
    # (tokens, max_tokens, min_n, max_n, expected)
    ([1, 2, 3, 9, 1, 2], 3, 1, 2, [3, 9, 1]),  # "1 2" seen before: propose what followed it
    ([1, 2, 3, 1, 2, 4, 1, 2], 2, 1, 2, [4, 1]),  # two earlier "1 2": the most recent one wins
    ([5, 6, 7, 8], 3, 1, 3, []),  # no repeated tail: nothing
    ([7, 1, 2, 3, 7, 3], 2, 1, 2, [7, 3]),  # "7 3" never seen; backs off to "3", which was followed by "7 3"
    ([4, 4, 4, 4], 2, 1, 3, [4]),  # the tail "4 4 4" occurs at 0; only one token remains after it
    ([1, 2, 3, 1, 2], 5, 3, 3, []),  # min_n=3: "3 1 2" never seen, no backoff below 3
]


@pytest.mark.parametrize("tokens,max_tokens,min_n,max_n,expected", NGRAM_CASES)
def test_prompt_lookup(tokens, max_tokens, min_n, max_n, expected):
    assert lookup(np.array(tokens), max_tokens, min_n, max_n) == expected


# ---------------------------------------------------------------------------------------------- matching

MATCH_CASES = [
    # (array, context, min_start, min_match, expected starts, expected match lengths)
    ([1, 2, 3, 4, 2, 3, 5], [9, 2, 3], 1, 1, [3, 6], [2, 2]),  # "2 3" twice; "9 2 3" nowhere
    ([1, 2, 3, 4, 2, 3, 5], [1, 2, 3], 1, 1, [3, 6], [3, 2]),  # the first occurrence matches three back
    ([1, 2, 3, 4, 2, 3, 5], [1, 2, 3], 1, 3, [3], [3]),  # min_match=3 keeps only the long one
    ([1, 2, 3, 4, 2, 3, 5], [2, 3], 5, 1, [6], [2]),  # min_start=5: starts before 5 are not candidates
    ([1, 2, 3], [2, 3], 1, 1, [], []),  # "2 3" ends the array: no continuation token, no candidate
]


@pytest.mark.parametrize("array,context,min_start,min_match,starts,lens", MATCH_CASES)
def test_match_in_array(array, context, min_start, min_match, starts, lens):
    arr = np.array(array, dtype=np.int32)
    got_s, got_l = match_in_array(arr, len(arr), np.array(context), min_start, min_match, max_match=8)
    assert got_s.tolist() == starts and got_l.tolist() == lens


def test_match_in_array_keeps_only_allowed_starts():
    # Two rollouts laid end to end, each as prompt tail + output + separator (-1); starts only inside outputs.
    arr = np.array([1, 2, 3, 4, -1, 1, 2, 3, 5, -1], dtype=np.int32)
    allowed = np.array([0, 0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=bool)  # outputs: "3 4" and "3 5"
    got_s, got_l = match_in_array(arr, len(arr), np.array([1, 2]), 1, 1, 8, allowed)
    assert got_s.tolist() == [2, 7] and got_l.tolist() == [2, 2]
    got_s, _ = match_in_array(arr, len(arr), np.array([2, 3]), 1, 1, 8, allowed)
    assert got_s.tolist() == [3, 8]  # "2 3" spans tail and output: continuations "4" and "5"
    # the separator ends a match as the array's start does: the second rollout's "1 2" does not reach back into
    # the first rollout's "4" (the context "4 1 2" matches 2 tokens in both)
    got_s, got_l = match_in_array(arr, len(arr), np.array([4, 1, 2]), 1, 1, 8, allowed)
    assert got_s.tolist() == [2, 7] and got_l.tolist() == [2, 2]
    # a start the mask does not mark is no candidate, however well it matches: "1" is followed by "2" only in tails
    got_s, _ = match_in_array(arr, len(arr), np.array([1]), 1, 1, 8, allowed)
    assert got_s.tolist() == []


def test_prompt_store_scan_finds_what_scanning_each_rollout_finds():
    """A prompt's rollouts laid end to end per version give the same candidates as one scan per rollout."""
    from drafters.suffix_reference import _PromptStore

    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 6, 40).astype(np.int32)
    store, rollouts = _PromptStore(max_rollouts=6, tail=8), []
    for version in (0, 0, 1, 1, 1, 2, 2, 3):  # 8 appended, the oldest 2 evicted
        tokens = np.concatenate([prompt, rng.integers(0, 6, int(rng.integers(1, 30))).astype(np.int32)])
        probs = rng.random(len(tokens)).astype(np.float32)
        store.append(tokens, probs, len(prompt), version)
        rollouts = (rollouts + [(tokens, probs, version)])[-6:]
    found = 0
    for trial in range(50):
        context = np.concatenate([prompt, rng.integers(0, 6, int(rng.integers(0, 12))).astype(np.int32)])
        want = []
        for tokens, probs, version in rollouts:
            starts, lens = match_in_array(tokens, len(tokens), context, len(prompt), 1, 8)
            want += [(version, tuple(tokens[s:].tolist()), tuple(probs[s:].tolist()), n) for s, n in zip(starts, lens)]
        got = []
        for version, tokens, probs, allowed in store.flat():
            starts, lens = match_in_array(tokens, len(tokens), context, 1, 1, 8, allowed)
            for s, n in zip(starts, lens):
                end = s + int(np.argmax(tokens[s:] < 0))  # up to the separator
                got.append((version, tuple(tokens[s:end].tolist()), tuple(probs[s:end].tolist()), n))
        assert sorted(got) == sorted(want), trial
        found += len(want)
    assert found > 100  # the comparison covered many candidates


def test_match_lengths_stop_at_array_start_and_cap():
    arr = np.array([5, 6, 7, 5, 6, 7], dtype=np.int32)
    # Start 3: "5 6 7" before it equals the context's tail of 3; the array starts there, so no more.
    assert match_lengths(arr, np.array([3]), np.array([0, 5, 6, 7]), max_len=10).tolist() == [3]
    assert match_lengths(arr, np.array([6]), np.array([5, 6, 7, 5, 6, 7]), max_len=4).tolist() == [4]


def candidates(array, starts, lens, weight=1.0):
    arr = np.array(array, dtype=np.int32)
    return Candidates(arr, np.array(starts), np.array(lens), weight, len(arr))


def check_tree(d: Draft):
    for i, p in enumerate(d.parent_list()):
        assert -1 <= p < i
    return d


TREE_CASES = [
    # (-1 separates stored sequences.) Three candidates agree on "7 8", one says "9": 7 first (p = 3/(4+1)),
    # its child 8, then the 9 branch.
    (
        [candidates([0, 7, 8, -1, 7, 8, -1, 7, 8, -1, 9], [1, 4, 7, 10], [1, 1, 1, 1])],
        dict(min_prob=0.1, prior=1.0),
        4,
        [7, 8, 9],
        [-1, 0, -1],
    ),
    # min_prob cuts the lone "9" (1/5 = 0.2 < 0.25) and the second level of "7 8" (0.6 * 0.75 = 0.45 stays).
    (
        [candidates([0, 7, 8, -1, 7, 8, -1, 7, 8, -1, 9], [1, 4, 7, 10], [1, 1, 1, 1])],
        dict(min_prob=0.25, prior=1.0),
        4,
        [7, 8],
        [-1, 0],
    ),
    # Longer matches weigh more: one match of length 4 outweighs two of length 1 (match_power=1).
    (
        [candidates([3, 3, 3, 3, 5, -1, 6, -1, 6], [4, 6, 8], [4, 1, 1])],
        dict(min_prob=0.0, prior=1.0),
        2,
        [5, 6],
        [-1, -1],
    ),
    # max_tokens bounds the node count.
    ([candidates([1, 2, 3, 4, 5, 6], [1], [1])], dict(min_prob=0.0, prior=0.0), 3, [2, 3, 4], [-1, 0, 1]),
]


@pytest.mark.parametrize("sources,cfg,max_tokens,tokens,parents", TREE_CASES)
def test_build_draft(sources, cfg, max_tokens, tokens, parents):
    d = check_tree(build_draft(sources, max_tokens, TreeConfig(**cfg)))
    assert d.token_ids == tokens and d.parent_list() == parents
    assert d.probs is not None and all(0 < p <= 1 for p in d.probs)


# ---------------------------------------------------------------------------------------------- suffix drafter


SUFFIX_IMPLEMENTATIONS = {"compiled": SuffixDrafter, "reference": SuffixReferenceDrafter}


@pytest.fixture(params=sorted(SUFFIX_IMPLEMENTATIONS))
def suffix(request):
    """Both suffix drafters: the compiled one and the Python reference it is held to behave alike on every rule."""
    cls = SUFFIX_IMPLEMENTATIONS[request.param]

    def build(**kw):
        return cls(**kw)

    return build


def test_sibling_tokens_are_visible_as_soon_as_observed(suffix):
    d = suffix()
    prompt = [1, 2, 3]
    d.begin("a", prompt, "g")
    d.begin("b", prompt, "g")
    assert d.propose("b", 4).token_ids == []  # nothing to go on yet
    d.observe("a", [10, 11, 12, 13])
    # b stands right after the prompt, where a's output began: a's tokens are proposed.
    assert d.propose("b", 4).token_ids[:4] == [10, 11, 12, 13]
    d.observe("b", [10, 11])
    assert d.propose("b", 2).token_ids == [12, 13]


def test_earlier_rollouts_of_the_same_prompt_after_refresh(suffix):
    history = RolloutHistory()
    history.append(rows_to_batch([row([1, 2, 3], [20, 21, 22], version=0)]))
    d = suffix()
    d.refresh(history, 1)
    d.begin("x", [1, 2, 3], None)  # same prompt, no group given: grouped by prompt
    assert d.propose("x", 3).token_ids == [20, 21, 22]
    d.begin("y", [7, 8, 9], None)  # another prompt, no repeats in it, no two-token match in the global window
    assert d.propose("y", 3).token_ids == []
    d.begin("w", [9, 5, 9], None)  # prompt lookup: "9" was followed by "5" in the prompt itself
    assert d.propose("w", 2).token_ids == [5, 9]


def test_global_window_serves_other_prompts(suffix):
    history = RolloutHistory()
    history.append(rows_to_batch([row([1, 2, 3], [40, 41, 42, 43, 44], version=0)]))
    d = suffix(min_match_global=3)
    d.refresh(history, 0)
    d.begin("z", [7, 40, 41, 42], None)  # another prompt whose tail "40 41 42" was seen in a rollout
    assert d.propose("z", 2).token_ids == [43, 44]


def test_recency_decay_changes_the_proposal(suffix):
    # Version 0 continued "5 6" with 7 three times; version 2 continued it with 8 once.
    rows = [row([1], [5, 6, 7], version=0) for _ in range(3)] + [row([1], [5, 6, 8], version=2)]
    history = RolloutHistory()
    history.append(rows_to_batch(rows))
    picks = {}
    for decay in (1.0, 0.1):
        d = suffix(decay=decay)
        d.refresh(history, 2)
        d.begin("q", [1, 5, 6], None)
        picks[decay] = d.propose("q", 1).token_ids
    assert picks[1.0] == [7]  # no decay: the majority wins
    assert picks[0.1] == [8]  # strong decay: the newest policy's choice wins


@pytest.mark.parametrize("cls", [SuffixDrafter, SuffixReferenceDrafter])
def test_suffix_drafter_options(cls):
    with pytest.raises(ValueError, match="unknown suffix drafter option 'bogus'; known options: decay, .*min_prob"):
        cls(bogus=1)
    with pytest.raises(ValueError, match="unknown suffix drafter option 'tree'"):
        cls(tree={"min_prob": 0.2})  # a group's fields are options by their own names, flat
    with pytest.raises(ValueError, match="max_walk must be >= 1, got 0"):
        cls(max_walk=0)
    with pytest.raises(ValueError, match="decay must be in"):
        cls(decay=0.0)
    with pytest.raises(ValueError, match="min_prob must be <= 1"):
        cls(min_prob=1.5)
    with pytest.raises(ValueError, match="suffix drafter option max_walk must be an int, got 2.5"):
        cls(max_walk=2.5)
    with pytest.raises(ValueError, match="suffix drafter option decay must be a number, got 'x'"):
        cls(decay="x")
    d = cls(min_prob=0.2, decay=1)
    assert d.cfg.tree.min_prob == 0.2 and d.cfg.decay == 1.0 and isinstance(d.cfg.decay, float)
    # a config object in hand becomes keyword options; the drafter holds its own copy
    config = SuffixConfig()
    d = cls(**{**as_options(config), "min_prob": 0.3})
    assert d.cfg.tree.min_prob == 0.3 and d.cfg is not config
    assert config.tree.min_prob == TreeConfig().min_prob  # the caller's config is not changed by the overrides


def test_every_drafter_takes_keyword_options_only():
    # One way in: keyword options. A config object passed beside them is refused, never silently dropped.
    with pytest.raises(TypeError):
        SuffixDrafter(SuffixConfig(), min_prob=0.3)
    with pytest.raises(TypeError):
        NgramDrafter(NgramConfig(max_n=2))
    for name, options in {
        "ngram": {"min_n": 2, "max_n": 3},
        "ngram_reference": {"max_n": 2},
        "suffix": {"decay": 0.9},
        "suffix_reference": {"max_depth": 4},
    }.items():
        with pytest.raises(ValueError, match=f"unknown {name.split('_')[0]} drafter option 'bogus'; known options: "):
            make_drafter(name, bogus=1)
        given = dict(options)
        d = make_drafter(name, **given)
        config = d.cfg if hasattr(d, "cfg") else d.config
        assert {k: v for k, v in as_options(config).items() if k in options} == options
        assert given == options


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("ngram", {"min_n": 3, "max_n": 2}, "ngram drafter needs 1 <= min_n <= max_n, got min_n=3, max_n=2"),
        ("ngram", {"max_n": True}, "ngram drafter option max_n must be an int, got True"),
        ("composite", {"retrieval_options": [1]}, "composite drafter option retrieval_options must be a mapping"),
        ("composite", {"retrieval_options": {"bogus": 1}}, "unknown suffix drafter option 'bogus'; known options"),
        ("composite", {"modle": "model"}, "unknown composite drafter option 'modle'; known options: retrieval, "),
    ],
)
def test_bad_drafter_options_are_refused_by_name(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_drafter(name, **options)


def test_composite_copies_its_parts_options():
    # The composite passes its parts' options the same way (make_drafter, keywords); the caller's nested dicts
    # stay as they were, and the part gets the values it was given.
    retrieval = {"decay": 0.7, "min_prob": 0.1}
    d = make_drafter("composite", retrieval_options=retrieval, model="ngram", model_options={"max_n": 2})
    assert d.retrieval.cfg.decay == 0.7 and d.retrieval.cfg.tree.min_prob == 0.1 and d.model.max_n == 2
    assert d.config.retrieval_options == retrieval and d.config.retrieval_options is not retrieval
    d.config.retrieval_options["decay"] = 0.1
    assert retrieval == {"decay": 0.7, "min_prob": 0.1}


def test_token_index_integrity_after_random_inserts_and_evictions():
    rng = random.Random(0)
    index = TokenIndex(bucket_bits=10, max_tokens=3000)  # a small table: plenty of bucket collisions
    for step in range(10_000):
        if rng.random() < 0.002:
            index.evict_oldest(rng.randint(1, 500))
        else:
            seq = [rng.randrange(20) for _ in range(rng.randint(1, 12))]
            index.add(seq, version=step // 1000, first_indexed=rng.randint(0, 3))
        if step % 1000 == 999:
            index.check_integrity()
    index.check_integrity()
    assert 0 < index.num_tokens <= 3000
    # Queries agree with a brute-force scan of the stored text.
    toks = index.tokens.view
    for _ in range(50):
        ctx = np.array([rng.randrange(20) for _ in range(4)])
        starts, lens, _ = index.query(ctx, min_match=2, max_walk=10**6)
        indexed = {p for _, f, e in index.segments for p in range(f, e)}
        brute = sorted(p for p in indexed if toks[p - 1] == ctx[-1] and toks[p - 2] == ctx[-2])
        assert sorted(starts.tolist()) == brute


def test_token_index_build_equals_incremental_adds():
    rng = random.Random(1)
    seqs = [
        ([rng.randrange(30) for _ in range(rng.randint(3, 40))], rng.randint(0, 3), rng.randint(0, 4))
        for _ in range(200)
    ]
    a, b = TokenIndex(bucket_bits=8), TokenIndex(bucket_bits=8)
    for s, v, f in seqs:
        a.add(s, v, f)
    b.build([(np.array(s), v, f) for s, v, f in seqs])
    a.check_integrity()
    b.check_integrity()
    assert np.array_equal(a.tokens.view, b.tokens.view)
    assert np.array_equal(a.prev.view, b.prev.view) and np.array_equal(a.head, b.head)


@pytest.mark.parametrize("cls,limit_mib", [(SuffixDrafter, 24.1), (SuffixReferenceDrafter, 24.0)])
def test_memory_per_million_tokens(cls, limit_mib):
    """Array capacities after a refresh over 1M stored output tokens: 12 bytes a token in the global window, 8 in
    the per-prompt store, a 4 MiB hash table (the compiled store adds a separator and a segment record per rollout:
    24 bytes against the ~4 KB of a 500-token rollout)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2000):  # 2000 rollouts x 500 tokens = 1M output tokens
        rows.append(row(rng.integers(0, 49152, 40).tolist(), rng.integers(0, 49152, 500).tolist(), version=i // 500))
    history = RolloutHistory()
    history.append(rows_to_batch(rows))
    d = cls(window_versions=8)
    d.refresh(history, 3)
    mb = d.nbytes / 2**20
    print(f"{cls.__name__}: {mb:.2f} MiB for 1M stored tokens")
    assert 20 < mb <= limit_mib


# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_and_dotted_paths():
    assert {"none", "ngram", "ngram_reference", "suffix", "suffix_reference", "arctic_suffix"} <= set(known_drafters())
    with pytest.raises(ValueError, match="unknown drafter 'nope'; known drafters: .*ngram.*suffix"):
        make_drafter("nope")
    assert isinstance(make_drafter("drafters.ngram:NgramDrafter", max_n=3), BaseDrafter)
    assert isinstance(make_drafter("drafters.suffix.SuffixDrafter"), SuffixDrafter)
    with pytest.raises(ValueError, match="cannot import drafter 'no.such.Module'"):
        make_drafter("no.such.Module")


# ---------------------------------------------------------------------------------------------- replay


def row(prompt, output, version=0, group=None, rid=None):
    return {
        "request_id": rid,
        "prompt_key": None,
        "group": group,
        "policy_version": version,
        "prompt_ids": prompt,
        "token_ids": output,
        "logprobs": [0.0] * len(output),
        "finish_reason": "length",
    }


class FixedDrafter(BaseDrafter):
    """Always proposes the same tokens."""

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, request_id, max_tokens):
        return Draft(self.tokens[:max_tokens])


def test_accepted_length_walks_the_tree():
    # Root children 7 (wrong) and 1 (right); under 1, the right 2.
    assert accepted_length(Draft([7, 1, 2], [-1, -1, 1]), [1, 2, 9], 0) == 2
    assert accepted_length(Draft([1, 5]), [1, 2], 0) == 1
    assert accepted_length(Draft([]), [1], 0) == 0


def test_replay_figures_equal_hand_computed_ones():
    trace = pa.Table.from_batches([rows_to_batch([row([0], [1, 2, 3, 1, 2], rid="a"), row([0], [9, 9], rid="b")])])
    stats = replay(trace, FixedDrafter([1, 2]), max_draft_tokens=8)
    # a: step 1 drafts [1 2] (room 4), both right, emits 1 2 3; step 2 has room for one: drafts [1], right,
    #    emits 1 2. b: step 1 has room for one: drafts [1], wrong, emits 9; step 2 has no room, emits 9.
    assert (stats.tokens, stats.sequence_steps, stats.batch_steps) == (7, 4, 2)
    assert (stats.drafted, stats.accepted, stats.rejected) == (4, 3, 1)
    assert stats.acceptance_length == 7 / 4 and stats.tokens_per_forward == 7 / 2


def test_replay_refreshes_with_earlier_versions_only():
    seen = []

    class Spy(BaseDrafter):
        def refresh(self, history, policy_version):
            seen.append((policy_version, history.num_rows))

    trace = pa.Table.from_batches(
        [rows_to_batch([row([0], [1, 2], version=0), row([0], [1, 2], version=0), row([0], [3], version=1)])]
    )
    replay(trace, Spy())
    assert seen == [(0, 0), (1, 2)]


def test_suffix_beats_nothing_on_a_repetitive_trace():
    rng = random.Random(0)
    rows = []
    for version in range(3):
        for p in range(4):
            base = [100 + p] * 3 + list(range(200 + 10 * p, 210 + 10 * p))
            for g in range(4):
                out = [t if rng.random() > 0.1 else rng.randrange(500) for t in base]
                rows.append(row([p, p + 1], out, version=version, group=f"v{version}p{p}"))
    trace = pa.Table.from_batches([rows_to_batch(rows)])
    none = replay(trace, make_drafter("none"))
    suf = replay(trace, make_drafter("suffix"))
    assert none.acceptance_length == 1.0
    assert suf.acceptance_length > 1.5
    assert suf.per_version[2]["acceptance_length"] > suf.per_version[0]["acceptance_length"]


def test_arctic_peer_runs_in_the_same_replay():
    pytest.importorskip("arctic_inference")
    rows = [row([1, 2], [5, 6, 7, 8, 9, 10], version=v, rid=f"{v}-{g}") for v in range(2) for g in range(3)]
    stats = replay(pa.Table.from_batches([rows_to_batch(rows)]), make_drafter("arctic_suffix"), max_draft_tokens=4)
    # Identical rollouts: once the first ones are cached, the rest are drafted from them.
    assert stats.per_version[0]["acceptance_length"] < stats.per_version[1]["acceptance_length"]
    assert stats.per_version[1]["acceptance_length"] >= 2.0


# ---------------------------------------------------------------------------------------------- engine wiring


class Recorder(BaseDrafter):
    def __init__(self):
        self.calls = []

    def refresh(self, history, policy_version):
        self.calls.append((policy_version, None if history is None else history.num_rows))


def test_new_policy_version_refreshes_the_drafter_with_the_history(tiny_model):
    from conftest import make_engine

    from rollout.sampling import SamplingParams

    recorder = Recorder()
    engine = make_engine(tiny_model, drafter=recorder)
    engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3))
    version = engine.update_weights([], version=5)
    assert version == 5 and recorder.calls == [(5, 2)]
    rows = engine.history.table().to_pylist()
    assert [r["policy_version"] for r in rows] == [0, 0] and rows[0]["prompt_ids"] == [1, 2, 3]


def warm_and_cold(model, prompts, params, tmp_path, groups=None, first_params=None):
    """One run (with first_params, default params) that records a trace, then the requests on a fresh engine
    without it (cold) and with it loaded as history.warm_start (warm): their results."""
    from conftest import make_engine

    from rollout.budget import parse_budget
    from rollout.config import HistoryConfig

    def engine(history=None):
        return make_engine(
            model, max_num_seqs=32, drafter=make_drafter("suffix"), budget=parse_budget("fixed:6"), history=history
        )

    first = engine()
    first.generate(prompts, first_params or params, groups=groups)
    first.flush_history()
    trace = first.history.save(tmp_path / "previous" / "trace.parquet")
    cold = engine().generate(prompts, params, groups=groups)
    warm_engine = engine(HistoryConfig(warm_start=[str(trace)]))
    assert warm_engine.history.versions() == [-1]  # older than the run's own version 0
    warm = warm_engine.generate(prompts, params, groups=groups)
    return cold, warm


def per_forward(results) -> float:
    return sum(len(r.token_ids) for r in results) / sum(r.spec.target_forwards for r in results)


def test_warm_start_drafts_from_the_first_request(tiny_model, tmp_path):
    from rollout.sampling import SamplingParams

    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    cold, warm = warm_and_cold(tiny_model, prompts, SamplingParams(max_tokens=24), tmp_path)
    assert [r.token_ids for r in warm] == [r.token_ids for r in cold]  # greedy: drafts change nothing
    # The earlier run's rollouts of the same prompts are in the history before the first step: nearly every
    # draft is right from the start.
    assert per_forward(warm) > per_forward(cold) and per_forward(warm) > 4


@pytest.mark.slow
def test_warm_start_on_smollm2(smol_model, smol_tokenizer, tmp_path):
    """T=0.7, seeded: a run warm-started from an earlier run's trace of the same prompts (other samples: other
    seeds) emits the same rollouts as a cold one, in fewer target forwards."""
    from rollout.sampling import SamplingParams
    from rollout.tasks import chat_prompt_ids, list_tasks

    prompts = [chat_prompt_ids(smol_tokenizer, t.prompt) for t in list_tasks(4, seed=5) for _ in range(4)]
    params = [SamplingParams(temperature=0.7, max_tokens=48, seed=i) for i in range(len(prompts))]
    groups = [f"p{i // 4}" for i in range(len(prompts))]
    earlier = [SamplingParams(temperature=0.7, max_tokens=48, seed=1000 + i) for i in range(len(prompts))]
    cold, warm = warm_and_cold(smol_model, prompts, params, tmp_path, groups, earlier)
    assert [r.token_ids for r in warm] == [r.token_ids for r in cold]
    print(f"tokens per sequence-forward: cold {per_forward(cold):.3f}, warm {per_forward(warm):.3f}")
    assert per_forward(warm) > per_forward(cold)


@pytest.mark.slow
def test_acceptance_rises_across_rounds_on_smollm2(smol_model, smol_tokenizer):
    """8 prompts x 8 samples at T=0.7 for 4 rounds with the suffix drafter: round 4 beats round 1."""
    from conftest import make_engine

    from rollout.budget import parse_budget
    from rollout.sampling import SamplingParams
    from rollout.tasks import chat_prompt_ids, list_tasks

    engine = make_engine(smol_model, max_num_seqs=64, drafter=make_drafter("suffix"), budget=parse_budget("fixed:6"))
    prompts = [chat_prompt_ids(smol_tokenizer, t.prompt) for t in list_tasks(8, seed=3)]
    per_round = []
    for rnd in range(4):
        engine.policy_version = rnd
        engine.refresh_drafter()
        batch = [p for p in prompts for _ in range(8)]
        params = [SamplingParams(temperature=0.7, max_tokens=64, seed=100 * rnd + i) for i in range(len(batch))]
        results = engine.generate(batch, params, groups=[f"{rnd}-{i // 8}" for i in range(len(batch))])
        tokens = sum(len(r.token_ids) for r in results)
        per_round.append(tokens / sum(r.spec.target_forwards for r in results))
    print("tokens per sequence-forward by round:", [round(x, 3) for x in per_round])
    assert per_round[3] > per_round[0]
