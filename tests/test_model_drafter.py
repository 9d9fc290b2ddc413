"""The parametric drafter (drafters/model.py) and the composite drafter (drafters/composite.py).

Fast tests run on a tiny random 2-layer Llama: with layers=1 the drafter (layer 0 frozen, layer 1 as the trained
block, the target's norm and head) *is* the target until it trains, so its drafts must equal the target's greedy
continuation exactly; that checks the drafter's own KV cache, row compaction and padding without tolerances. The
slow test replays the committed SmolLM2 trace.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_engine

from drafters.base import Draft, make_drafter
from drafters.composite import merge_drafts
from drafters.model import ModelDrafter
from drafters.replay import replay
from rollout.budget import parse_budget
from rollout.history import RolloutHistory
from rollout.sampling import SamplingParams

TRACE = Path(__file__).resolve().parents[1] / "benchmarks" / "traces" / "smollm2_t1.0.parquet"


def full_greedy(net, ids: list[int], n: int, vocab: torch.Tensor) -> list[int]:
    """The drafter network's greedy continuation, recomputed from scratch each token (no cache)."""
    ids = list(ids)
    out = []
    for _ in range(n):
        x = torch.tensor([ids])
        states = net.frozen_states(x)
        positions = torch.arange(len(ids))[None]
        cos, sin = net.rope(positions)
        with torch.no_grad():
            h = net.top(states, cos, sin, None)
            tok = int(vocab[net.logits(h[0, -1], vocab).argmax()])
        out.append(tok)
        ids.append(tok)
    return out


@pytest.fixture
def tiny_drafter(tiny_folder):
    return ModelDrafter(
        model=str(tiny_folder), layers=1, min_prob=0.0, train_seconds=3.0, seed=0, draft_untrained=True, leaves=0
    )


def test_cached_drafts_equal_recomputed_greedy_across_rows(tiny_drafter):
    d = tiny_drafter
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [40, 41], "c": list(range(100, 130))}
    for rid, p in prompts.items():
        d.begin(rid, p, None)
    drafts = d.propose_batch(list(prompts), [4, 2, 6])
    for (rid, p), k, draft in zip(prompts.items(), [4, 2, 6], drafts):
        assert draft.token_ids == full_greedy(d.net, p, k, d.vocab), rid
        assert draft.parents is None and len(draft.probs) == k
    # b ends: c moves into its row; a accepts 2 of its draft plus a bonus token, c only a bonus token
    d.end("b")
    d.observe("a", drafts[0].token_ids[:2] + [3])
    d.observe("c", [77])
    prompts["a"] += drafts[0].token_ids[:2] + [3]
    prompts["c"] += [77]
    again = d.propose_batch(["c", "a"], [3, 5])
    assert again[0].token_ids == full_greedy(d.net, prompts["c"], 3, d.vocab)
    assert again[1].token_ids == full_greedy(d.net, prompts["a"], 5, d.vocab)
    d.end("a")
    d.end("c")
    assert d.order == [] and d.requests == {}


def next_probs(net, ids: list[int], vocab: torch.Tensor) -> torch.Tensor:
    """The drafter network's next-token distribution over the kept vocabulary, recomputed from scratch: [Vk]."""
    x = torch.tensor([ids])
    cos, sin = net.rope(torch.arange(len(ids))[None])
    with torch.no_grad():
        h = net.top(net.frozen_states(x), cos, sin, None)
        return net.logits(h[0, -1], vocab).softmax(-1)


@pytest.mark.parametrize("max_tokens", [3, 8])
def test_leaves_are_the_runner_ups_beside_the_chain(tiny_folder, max_tokens):
    # Candidates: the greedy chain and, at each depth, the 2 runner-up tokens as children of the chain node before.
    # The draft keeps exactly the max_tokens candidates of highest path probability, recomputed here without cache.
    d = ModelDrafter(model=str(tiny_folder), layers=1, min_prob=0.0, draft_untrained=True, leaves=2)
    prompt = [5, 6, 7, 8, 9]
    d.begin("r", prompt, None)
    draft = d.propose("r", max_tokens)
    candidates: dict[tuple[int, ...], float] = {}
    chain: tuple[int, ...] = ()
    reach = 1.0
    for _ in range(max_tokens):  # a chain of max_tokens nodes, then leaves: every kept node is among these
        probs = next_probs(d.net, prompt + list(chain), d.vocab)
        top_p, top_i = probs.topk(3)
        for p, i in zip(top_p.tolist(), d.vocab[top_i].tolist()):
            candidates[chain + (i,)] = reach * p
        reach *= top_p[0].item()
        chain = chain + (int(d.vocab[top_i[0]]),)
    expected = sorted(candidates, key=lambda path: -candidates[path])[:max_tokens]
    paths, got = [], {}
    for t, q, pp in zip(draft.token_ids, draft.parent_list(), draft.path_probs()):
        paths.append((paths[q] if q >= 0 else ()) + (t,))
        got[paths[-1]] = pp
    assert set(got) == set(expected)
    assert all(got[path] == pytest.approx(candidates[path], rel=1e-4) for path in got)
    assert draft.depths()  # parents come first
    assert not draft.is_chain or max_tokens <= 1  # runner-ups beat the chain's deep nodes on this random target


def test_untrained_drafter_is_the_target_so_every_greedy_draft_is_accepted(tiny_model, tiny_folder):
    drafter = ModelDrafter(model=str(tiny_folder), layers=1, min_prob=0.0, draft_untrained=True, leaves=0)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 4, 3], [200, 201]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = make_engine(tiny_model).generate(prompts, params)
    spec = make_engine(tiny_model, drafter=drafter, max_draft_tokens=4).generate(prompts, params)
    for p, s in zip(plain, spec):
        assert s.token_ids == p.token_ids  # lossless whatever the drafter
        # drafter == target: every drafted token is accepted (tiny lm_head is scaled, so no near-ties)
        assert s.spec.drafted > 0 and s.spec.accepted == s.spec.drafted
    assert drafter.order == []  # every request ended


def history_of(rows: list[tuple[list[int], list[int], int]], top=None) -> RolloutHistory:
    """rows: (prompt, output, version); top: optional (ids, logprobs) per row, each [len(output)][k]."""
    h = RolloutHistory()
    h.append(
        pa.table(
            {
                "request_id": [str(i) for i in range(len(rows))],
                "prompt_key": ["k"] * len(rows),
                "group": ["g"] * len(rows),
                "policy_version": [v for _, _, v in rows],
                "prompt_ids": pa.array([p for p, _, _ in rows], pa.list_(pa.int32())),
                "token_ids": pa.array([o for _, o, _ in rows], pa.list_(pa.int32())),
                "logprobs": pa.array([[0.0] * len(o) for _, o, _ in rows], pa.list_(pa.float32())),
                "length": pa.array([len(o) for _, o, _ in rows], pa.int32()),
                "finish_reason": ["length"] * len(rows),
                "top_token_ids": [None if top is None else t[0] for t in (top or [None] * len(rows))],
                "top_logprobs": [None if top is None else t[1] for t in (top or [None] * len(rows))],
            }
        )
    )
    return h


def learning_drafter(tiny_folder, **options) -> ModelDrafter:
    """A tiny-model drafter that trains until it has fit a small window (up to 200 epochs, 20 s at most)."""
    return ModelDrafter(
        model=str(tiny_folder), layers=1, min_prob=0.0, train_seconds=20, max_epochs=200, lr=3e-3, **options
    )


def test_refresh_learns_the_policys_continuation(tiny_folder):
    # The "policy" always answers prompt [10, 11] with 20 21 22 ... 29 (not what the random target would say):
    # after a refresh the drafter proposes it.
    answer = list(range(20, 30))
    drafter = learning_drafter(tiny_folder, draft_untrained=True, leaves=0)
    drafter.begin("before", [10, 11], "g")
    before = drafter.propose("before", 6).token_ids
    drafter.end("before")
    drafter.refresh(history_of([([10, 11], answer, 0)] * 8), policy_version=1)
    assert drafter.weights_version == 1
    log = drafter.train_log[-1]
    assert log["loss_last"] < log["loss_first"] / 4, log
    assert set(drafter.vocab.tolist()) == {10, 11, *answer}  # the head keeps the tokens the window has
    drafter.begin("after", [10, 11], "g")
    after = drafter.propose("after", 6).token_ids
    assert after == answer[:6] and before != after


@pytest.mark.parametrize("top_logprobs, expected", [(2, 30), (0, 20)])
def test_refresh_learns_the_policys_distribution_where_it_was_recorded(tiny_folder, top_logprobs, expected):
    # Every rollout of prompt [10, 11] happened to sample 20 first, but the policy's recorded distribution there
    # was 0.7 on 30 and 0.3 on 20. Distilling the distribution (top_logprobs=2), the drafter's first guess is the
    # policy's likeliest token, 30; learning from the samples only (top_logprobs=0), it is 20.
    import math

    answer = [20, 21, 22, 23]
    top = ([[30, 20]] + [[t, 5] for t in answer[1:]], [[math.log(0.7), math.log(0.3)]] + [[0.0, -30.0]] * 3)
    drafter = learning_drafter(tiny_folder, top_logprobs=top_logprobs)
    assert drafter.top_logprobs == top_logprobs  # what the engine records for it
    drafter.refresh(history_of([([10, 11], answer, 0)] * 8, top=[top] * 8), policy_version=1)
    drafter.begin("r", [10, 11], "g")
    draft = drafter.propose("r", 1)
    assert draft.token_ids == [expected]
    if top_logprobs:
        assert draft.probs[0] == pytest.approx(0.7, abs=0.1)  # the policy's probability, not the samples' frequency


def test_composite_asks_for_what_its_parts_learn_from():
    assert make_drafter("composite").top_logprobs == 16
    assert make_drafter("composite", model_options={"top_logprobs": 0}).top_logprobs == 0
    assert make_drafter("suffix").top_logprobs == 0


def test_refresh_drops_versions_outside_the_window(tiny_folder):
    drafter = ModelDrafter(model=str(tiny_folder), layers=1, train_seconds=0.5, window_versions=2)
    rows = [([1, 2], [3, 4, 5], v) for v in range(5)]
    drafter.refresh(history_of(rows), policy_version=5)
    assert sorted(drafter._states) == [3, 4]


@pytest.mark.parametrize(
    "drafts, k, tokens, parents",
    [
        # one chain: unchanged
        ([Draft([1, 2, 3], None, [0.9, 0.5, 0.5])], 3, [1, 2, 3], [-1, 0, 1]),
        # two chains sharing their first token: one node for it, the better continuation (0.9*0.8) first
        ([Draft([1, 2], None, [0.9, 0.5]), Draft([1, 5], None, [0.6, 0.8])], 3, [1, 5, 2], [-1, 0, 0]),
        # disjoint first tokens: a budget of 2 goes to the likelier chain (0.6, then 0.54) before the other root (0.3)
        ([Draft([7, 8], None, [0.3, 0.9]), Draft([4, 6], None, [0.6, 0.9])], 2, [4, 6], [-1, 0]),
        # ... and a budget of 3 adds the other root, ahead of its child
        ([Draft([7, 8], None, [0.3, 0.9]), Draft([4, 6], None, [0.6, 0.9])], 3, [4, 6, 7], [-1, 0, -1]),
        # a tree (root 1 with children 2 and 3) merged with a chain 1 3 9: node 1->3 keeps the max estimate
        (
            [Draft([1, 2, 3], [-1, 0, 0], [0.8, 0.5, 0.25]), Draft([1, 3, 9], None, [0.5, 0.9, 0.5])],
            4,
            [1, 3, 2, 9],
            [-1, 0, 0, 1],
        ),
        # empty drafts and a zero budget give nothing
        ([Draft([]), Draft([])], 4, [], []),
        ([Draft([1], None, [0.9])], 0, [], []),
    ],
)
def test_merge_drafts(drafts, k, tokens, parents):
    merged = merge_drafts(drafts, k)
    assert merged.token_ids == tokens
    assert merged.parent_list() == parents
    merged.depths()  # raises if a parent came after its child


def test_composite_proposes_the_union_and_stays_lossless(tiny_model, tiny_folder):
    drafter = make_drafter(
        "composite", model_options={"model": str(tiny_folder), "layers": 1, "min_prob": 0.0, "draft_untrained": True}
    )
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [30, 31, 32]]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain = make_engine(tiny_model).generate(prompts, params)
    spec = make_engine(tiny_model, drafter=drafter, max_draft_tokens=6).generate(prompts, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert all(s.spec.accepted > 0 for s in spec)


def test_requests_that_end_before_the_drafter_trained(tiny_folder):
    # untrained, the drafter declines (and never allocates its cache); rows must still compact cleanly
    d = ModelDrafter(model=str(tiny_folder), layers=1)
    for rid in ("a", "b", "c"):
        d.begin(rid, [1, 2, 3], None)
        d.observe(rid, [4])
    assert [len(x) for x in d.propose_batch(["a", "b", "c"], [4, 4, 4])] == [0, 0, 0]
    d.end("a")
    assert d.order == ["c", "b"] and d.requests["c"].row == 0


def test_the_engine_hands_its_target_to_drafters_that_build_on_it(tiny_folder):
    # no model option: the drafter (alone or inside composite) waits for the engine's target, and builds on it
    from rollout.config import EngineConfig, SpeculationConfig
    from rollout.engine.engine import Engine

    engine = Engine.from_config(
        EngineConfig(model=str(tiny_folder), max_num_seqs=2, max_model_len=128, tune_matmul=False),
        SpeculationConfig(drafter="composite", budget="fixed:2", drafter_options={"model_options": {"layers": 1}}),
    )
    model = engine.drafter.model
    assert model.net is not None and model.net.shape.vocab_size == 384  # the tiny target's, not SmolLM2's
    # an explicit model wins over the engine's
    drafter = ModelDrafter(model=str(tiny_folder), layers=1)
    net = drafter.net
    drafter.bind_target("/nonexistent")
    assert drafter.net is net


def test_bad_options_name_the_problem(tiny_folder):
    with pytest.raises(ValueError, match="layers must be in"):
        ModelDrafter(model=str(tiny_folder), layers=2)
    with pytest.raises(TypeError, match="lyers"):
        make_drafter("model", lyers=2)
    with pytest.raises(ValueError, match="leaves must be an int >= 0, got -1"):
        make_drafter("model", leaves=-1)
    with pytest.raises(ValueError, match="top_logprobs must be an int >= 0"):
        make_drafter("composite", model_options={"top_logprobs": 2.5})
    d = ModelDrafter(model=str(tiny_folder), layers=1)
    d.begin("x", [1, 2], None)
    with pytest.raises(ValueError, match="began twice"):
        d.begin("x", [1, 2], None)


def test_options_are_keywords_copied_and_checked(tiny_folder):
    from drafters.model import ModelDrafterConfig
    from drafters.options import as_options

    # one way in: keywords; a config object beside them is refused rather than half-applied
    with pytest.raises(TypeError):
        ModelDrafter(ModelDrafterConfig(layers=1), model=str(tiny_folder))
    with pytest.raises(ValueError, match="unknown model drafter option 'lyers'; known options: model, layers, "):
        make_drafter("model", lyers=2)
    with pytest.raises(ValueError, match="model drafter option lr must be a number, got 'fast'"):
        make_drafter("model", lr="fast")
    given = {"model_options": {"model": str(tiny_folder), "layers": 1, "train_seconds": 1}}
    d = make_drafter("composite", **given)
    assert d.model.config.layers == 1 and d.model.config.train_seconds == 1.0
    assert given == {"model_options": {"model": str(tiny_folder), "layers": 1, "train_seconds": 1}}  # unchanged
    again = ModelDrafter(**as_options(d.model.config))
    assert again.config == d.model.config and again.config is not d.model.config


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_the_drafter_is_the_targets_layers(tmp_path_factory, arch):
    # Cut after all of a 2-layer target's layers, the drafter network computes the target's logits: its layers are
    # the engine's decoder_layer on the checkpoint's weights (q/k/v biases in Qwen2, q/k norms in Qwen3), with its
    # own attention and cache. Checked against transformers, cached one token at a time and in one pass.
    from conftest import build_tiny
    from transformers import AutoModelForCausalLM

    folder = build_tiny(tmp_path_factory, arch)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    drafter = ModelDrafter(model=str(folder), layers=1, min_prob=0.0, draft_untrained=True, leaves=0, max_len=64)
    net, vocab = drafter.net, torch.arange(384)
    ids = torch.randint(0, 384, (1, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits[0]  # [T, V]
        cos, sin = net.rope(torch.arange(ids.shape[1])[None])
        full = net.logits(net.top(net.frozen_states(ids), cos, sin, None)[0], vocab)
    assert (full - expected).abs().max().item() < 1e-4
    drafter.begin("r", ids[0, :10].tolist(), None)
    draft = drafter.propose("r", 1)  # through the drafter's KV cache
    assert draft.token_ids == [int(expected[9].argmax())]


def test_the_top_block_trains_through_the_shared_layer(tiny_folder):
    d = ModelDrafter(model=str(tiny_folder), layers=1)
    top, frozen = d.net.top, d.net.frozen[0]
    names = {n for n, _ in top.named_parameters()}
    assert {"ln1", "wqkv", "wo", "ln2", "w_gate_up", "w_down"} <= names
    assert all(p.requires_grad for p in top.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert top.weights.wqkv is top.wqkv  # decoder_layer reads the very parameters the optimizer updates
    x = d.net.frozen_states(torch.tensor([[1, 2, 3, 4]]))
    cos, sin = d.net.rope(torch.arange(4)[None])
    top(x, cos, sin, None).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in top.parameters())


def test_checkpoint_reader_agrees_with_itself_and_with_an_index(tiny_folder, tmp_path):
    import json
    import shutil

    from rollout.checkpoint_io import read_tensors, tensor_files, tensor_shapes

    tensors = dict(read_tensors(tiny_folder))
    shapes = tensor_shapes(tiny_folder)
    assert shapes == {name: tuple(t.shape) for name, t in tensors.items()}
    assert set(tensor_files(tiny_folder)) == set(tensors)
    # a sharded checkpoint's index names the files; a stray file beside it is not read
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_folder, folder)
    (file,) = folder.glob("*.safetensors")
    file.rename(folder / "model-00001-of-00001.safetensors")
    shutil.copy(folder / "model-00001-of-00001.safetensors", folder / "stray.safetensors")
    weight_map = {name: "model-00001-of-00001.safetensors" for name in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert tensor_shapes(folder) == shapes
    assert set(tensor_files(folder).values()) == {folder / "model-00001-of-00001.safetensors"}
    assert [n for n, _ in read_tensors(folder, lambda n: n.startswith("model.norm"))] == ["model.norm.weight"]


def test_drafters_import_no_engine_internals():
    # drafters/ builds on a small core (drafters.base, rollout.history, rollout.layers, rollout.checkpoint_io), not
    # on rollout/engine/, which imports drafters; each of these imports alone in a fresh interpreter.
    import subprocess
    import sys

    check = (
        "import sys, drafters.base as b; b.known_drafters(); import drafters.replay; "
        "bad = sorted(m for m in sys.modules if m.startswith(('rollout.engine', 'adapters'))); "
        "assert not bad, bad"
    )
    for code in (check, "import rollout.engine.engine", "import adapters.trl", "import drafters.model"):
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow
def test_acceptance_on_the_smollm2_trace_rises_after_a_refresh_on_earlier_steps():
    """Version 3 of the committed T=1.0 trace (8 prompts x 8 samples), replayed by a drafter that has not trained
    and by one refreshed on versions 0-2 of the same trace."""
    table = pq.read_table(TRACE)
    groups = sorted(set(g[2:] for g in table.column("group").to_pylist()))[:8]  # "r{round}p{i}" -> "p{i}"
    keep = pa.array([g[2:] in groups for g in table.column("group").to_pylist()])
    table = table.filter(keep)
    version = table.column("policy_version").to_pylist()
    last = table.filter(pa.array([v == 3 for v in version]))
    earlier = RolloutHistory()
    earlier.append(table.filter(pa.array([v < 3 for v in version])))
    figures = {}
    for name, history in (("untrained", None), ("refreshed", earlier)):
        # the untrained one drafts as the cut target would (it declines by default; here we want its figure)
        drafter = ModelDrafter(train_seconds=20, seed=0, draft_untrained=True)
        if history is not None:
            drafter.refresh(history, 3)
        stats = replay(last, drafter, max_draft_tokens=8, refresh=False)
        figures[name] = stats.acceptance_length
    print(f"model drafter acceptance length on version 3: {figures}, training: {drafter.train_log}")
    assert figures["refreshed"] > figures["untrained"] + 0.15


@pytest.mark.slow
def test_on_smollm2_the_engine_records_what_the_composite_learns_from_and_stays_exact(smol_model, smol_tokenizer):
    """Round 0 of 4 prompts x 4 samples at T=1.0 through the engine with the composite drafter; the refresh at the
    next policy version distils the target's top-16 the engine recorded (not the sampled tokens alone); round 1,
    greedy, with the trained drafter equals plain decoding token for token."""
    drafter = make_drafter("composite", model_options={"train_seconds": 5.0})
    engine = make_engine(smol_model, drafter=drafter, budget=parse_budget("fixed:6"))
    texts = ["Count from 1 to 20:", "The capital of France is", "def add(a, b):", "Once upon a time"]
    prompts = [smol_tokenizer(t).input_ids for t in texts]
    sampled = SamplingParams(temperature=1.0, max_tokens=40)
    groups = [f"g{i}" for i in range(4) for _ in range(4)]
    engine.generate([p for p in prompts for _ in range(4)], sampled, groups=groups)
    engine.policy_version = 1
    engine.refresh_drafter()
    model = drafter.model
    rollouts = model._states[0]
    assert model.weights_version == 1 and len(rollouts) == 16
    assert all(r.target_ids.shape[1] == 16 for r in rollouts)  # the recorded top-16, not one sampled token
    mass = torch.cat([r.target_probs.sum(-1) for r in rollouts])  # the top-16's share of each distribution
    assert float(mass.max()) <= 1 + 1e-4 and float(mass.min()) > 0 and float(mass.mean()) < 0.99

    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    plain = make_engine(smol_model).generate(prompts, greedy)
    spec = engine.generate(prompts, greedy)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    print(f"round 1, greedy: {sum(r.spec.accepted for r in spec)} of {sum(r.spec.drafted for r in spec)} accepted")
    assert sum(r.spec.accepted for r in spec) > 0
