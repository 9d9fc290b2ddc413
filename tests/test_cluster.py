"""The rollout service on real local Ray (ray.init(num_cpus=2)): affinity, weights, faults, bad input."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from rollout.cluster import RolloutCluster  # noqa: E402
from rollout.config import load_config  # noqa: E402
from rollout.sampling import SamplingParams  # noqa: E402
from rollout.worker import RolloutRequest  # noqa: E402


@pytest.fixture(scope="module")
def cluster(ray_local, tiny_folder):
    config = load_config(
        None,
        [
            f"engine.model={tiny_folder}",
            "engine.max_model_len=256",
            "engine.max_num_seqs=16",
            "engine.tune_matmul=false",
            "speculation.budget=fixed:4",
            "cluster.num_workers=2",
            "cluster.num_cpus_per_worker=1",
        ],
    )
    c = RolloutCluster(config)
    yield c
    c.shutdown()


def requests(groups: int, samples: int, max_tokens: int = 12, temperature: float = 1.0, tag: str = ""):
    out = []
    for g in range(groups):
        prompt = [10 + g, 20 + g, 30 + g]
        for s in range(samples):
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=s, ignore_eos=True)
            out.append(RolloutRequest(f"{tag}g{g}s{s}", prompt, params, group=f"{tag}g{g}"))
    return out


def test_requests_without_an_id_keep_every_other_field():
    """The ids the cluster gives requests that bring none replace only the id (no Ray: stand-in workers)."""
    import dataclasses
    from types import SimpleNamespace

    from rollout.result import RolloutResult, SpecStats

    sent: list[RolloutRequest] = []

    class Ref:  # an object ref: hashable by identity, holding the call
        def __init__(self, reqs):
            self.reqs = reqs

    def remote(reqs, plain=False, oracle=None):
        sent.extend(reqs)
        return Ref(reqs)

    def get(ref):
        return [
            RolloutResult(r.request_id, r.prompt_token_ids, [1], [0.0], "length", SpecStats(), r.group)
            for r in ref.reqs
        ]

    cluster = RolloutCluster.__new__(RolloutCluster)
    cluster.workers, cluster._outstanding = [SimpleNamespace(generate=SimpleNamespace(remote=remote))], [0]
    cluster._ray = SimpleNamespace(wait=lambda refs, num_returns: (refs[:num_returns], refs[num_returns:]), get=get)
    cluster._validate = lambda requests: None
    # Every flag away from its default too: a field a rebuild of the request dropped would come back changed.
    flags = {f.name: False for f in dataclasses.fields(RolloutRequest) if f.default is True}
    given = [dataclasses.replace(r, request_id="", **flags) for r in requests(groups=2, samples=2, tag="noid")]
    results = cluster.generate(given)
    assert len({r.request_id for r in results}) == 4 and all(r.request_id for r in results)
    by_id = {r.request_id: r for r in sent}
    for request, result in zip(given, results):
        assert dataclasses.replace(by_id[result.request_id], request_id="") == request


def test_a_twin_call_sends_each_worker_all_its_groups_at_once():
    """A plain or oracle twin holds a worker's engine alone, so its groups go in one call per worker: group by
    group they would run one after the other instead of batched like the speculative call (no Ray: stand-ins)."""
    from types import SimpleNamespace

    from rollout.result import RolloutResult, SpecStats

    calls: list[tuple[int, list[str], bool, dict | None]] = []

    class Ref:
        def __init__(self, reqs):
            self.reqs = reqs

    def worker(index):
        def remote(reqs, plain=False, oracle=None):
            calls.append((index, [r.request_id for r in reqs], plain, oracle))
            return Ref(reqs)

        return SimpleNamespace(generate=SimpleNamespace(remote=remote))

    def get(ref):
        return [
            RolloutResult(r.request_id, r.prompt_token_ids, [1], [0.0], "length", SpecStats(), r.group)
            for r in ref.reqs
        ]

    cluster = RolloutCluster.__new__(RolloutCluster)
    cluster.workers, cluster._outstanding = [worker(0), worker(1)], [0, 0]
    cluster._ray = SimpleNamespace(wait=lambda refs, num_returns: (refs[:num_returns], refs[num_returns:]), get=get)
    cluster._validate = lambda requests: None
    reqs = requests(groups=6, samples=2, tag="twin")
    cluster.generate(reqs)
    assert len(calls) == 6, "speculative calls go group by group"
    calls.clear()
    cluster.generate(reqs, plain=True)
    assert sorted(c[0] for c in calls) == [0, 1] and all(c[2] for c in calls), calls
    assert sum(len(c[1]) for c in calls) == 12
    calls.clear()
    known = {r.request_id: [7, 7] for r in reqs}
    cluster.generate(reqs, oracle=known)
    assert sorted(c[0] for c in calls) == [0, 1]
    for _, ids, _, oracle in calls:
        assert oracle == {i: [7, 7] for i in ids}, "each worker gets the known rollouts of its own requests"


def test_oracle_twin_over_ray_gives_the_plain_twins_tokens(cluster):
    reqs = requests(groups=3, samples=2, temperature=1.0, tag="orc")
    plain = cluster.generate([dataclasses.replace(r, request_id="p-" + r.request_id) for r in reqs], plain=True)
    oracle_reqs = [dataclasses.replace(r, request_id="o-" + r.request_id) for r in reqs]
    known = {o.request_id: p.token_ids for o, p in zip(oracle_reqs, plain)}
    oracle = cluster.generate(oracle_reqs, oracle=known)
    assert [r.token_ids for r in oracle] == [r.token_ids for r in plain]
    assert sum(r.spec.accepted for r in oracle) >= 0.95 * sum(r.spec.drafted for r in oracle) > 0


def test_group_affinity_and_balance(cluster):
    reqs = requests(groups=6, samples=4)
    results = cluster.generate(reqs)
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    by_group = {}
    for r in results:
        by_group.setdefault(r.group, set()).add(r.worker)
    assert all(len(workers) == 1 for workers in by_group.values()), by_group
    used = {next(iter(w)) for w in by_group.values()}
    assert used == {0, 1}, "groups are spread over both workers"


def test_pushed_weights_change_outputs_and_version(cluster, tiny_model):
    greedy = [
        RolloutRequest(f"w{i}", [5, 6, 7, i], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        for i in range(4)
    ]
    before = [r.token_ids for r in cluster.generate(greedy)]
    g = torch.Generator().manual_seed(0)
    shapes = tiny_model.parameter_shapes()
    new = [
        (name, torch.randn(shape, generator=g) * 0.5)
        for name, shape in shapes.items()
        if "embed" in name or "lm_head" in name
    ]
    version = cluster.update_weights(new, version=7)
    assert version == 7 and cluster.policy_version == 7
    assert all(h["policy_version"] == 7 for h in cluster.health())
    after = cluster.generate([RolloutRequest(f"x{r.request_id}", r.prompt_token_ids, r.params) for r in greedy])
    assert [r.token_ids for r in after] != before
    assert all(r.policy_version == 7 for r in after)


def test_requested_top_logprobs_come_back_over_ray(cluster):
    """A request's top-N logprobs travel back from its worker in its result, likeliest first, the sampled token's
    logprob among them when it is; asking changes no token and no sampled logprob, and a request that does not ask
    gets none. (That the numbers are the processed distribution's: test_engine.py, against a full forward.)"""
    reqs = [
        RolloutRequest(
            f"top{i}",
            [7, 8, 9, i],
            SamplingParams(temperature=0.8, max_tokens=6, seed=i, ignore_eos=True, top_logprobs=3 * (i % 2)),
            group=f"top{i}",
        )
        for i in range(4)
    ]
    asked = cluster.generate(reqs)
    bare = cluster.generate(
        [
            dataclasses.replace(
                r, request_id=f"bare-{r.request_id}", params=dataclasses.replace(r.params, top_logprobs=0)
            )
            for r in reqs
        ]
    )
    assert [r.token_ids for r in asked] == [r.token_ids for r in bare]
    for r, plain, request in zip(asked, bare, reqs):
        assert plain.top_token_ids is None and plain.top_logprobs is None
        assert r.logprobs == pytest.approx(plain.logprobs, abs=1e-5)
        if not request.params.top_logprobs:
            assert r.top_token_ids is None and r.top_logprobs is None
            continue
        assert len(r.top_token_ids) == len(r.top_logprobs) == len(r.token_ids)
        for token, logprob, ids, values in zip(r.token_ids, r.logprobs, r.top_token_ids, r.top_logprobs):
            assert len(ids) == len(values) == 3 and values == sorted(values, reverse=True) and values[0] >= logprob
            if token in ids:
                assert values[ids.index(token)] == logprob
    assert cluster.max_model_len == 256


def test_history_is_shared_at_weight_sync(cluster):
    cluster.generate(requests(groups=4, samples=2, tag="h"))
    cluster.update_weights([], version=cluster.policy_version + 1)
    rows = [s["history_rows"] for s in cluster.stats()]
    assert rows[0] == rows[1] > 0, "each worker holds every worker's rollouts"


def test_bad_requests_are_refused_and_the_cluster_keeps_serving(cluster, tiny_model):
    with pytest.raises(ValueError, match="prompt_token_ids is empty"):
        cluster.generate([RolloutRequest("bad", [], SamplingParams())])
    with pytest.raises(ValueError, match="appears twice"):
        cluster.generate([RolloutRequest("d", [1], SamplingParams()), RolloutRequest("d", [2], SamplingParams())])
    name = "model.layers.0.mlp.down_proj.weight"
    version = cluster.policy_version
    with pytest.raises(ValueError, match=f"parameter '{name}': shape \\(3, 3\\) does not match"):
        cluster.update_weights([(name, torch.zeros(3, 3))], version=version + 1)
    assert cluster.policy_version == version and all(h["policy_version"] == version for h in cluster.health())
    assert len(cluster.generate(requests(groups=2, samples=2, tag="after"))) == 4


def test_malformed_config_and_unknown_drafter_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'engine.bogus'; known keys here: model, max_num_seqs"):
        load_config(None, ["engine.bogus=1"])
    with pytest.raises(ValueError, match="unknown drafter 'nope'; known drafters: .*suffix"):
        load_config(None, ["speculation.drafter=nope"])
    with pytest.raises(ValueError, match="config key 'engine.max_num_seqs'"):
        load_config(None, ["engine.max_num_seqs=lots"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [unclosed\n")
    with pytest.raises(ValueError, match="cannot parse config file"):
        load_config(bad)
    with pytest.raises(ValueError, match="speculation.budget must be 'auto', 'off' or 'fixed:K'"):
        load_config(None, ["speculation.budget=sometimes"])


def test_budget_off_survives_yaml_booleans(tmp_path):
    # YAML 1.1 reads a bare `off` as false; the mode the user wrote must still be the one they get.
    assert load_config(None, ["speculation.budget=off"]).speculation.budget == "off"
    config = tmp_path / "off.yaml"
    config.write_text("speculation:\n  budget: off\n")
    assert load_config(config).speculation.budget == "off"


def test_a_worker_killed_mid_batch(cluster):
    version = cluster.update_weights([], version=cluster.policy_version + 1)
    reqs = requests(groups=16, samples=4, max_tokens=200, tag="k")
    outcome = {}

    def run():
        outcome["results"] = cluster.generate(reqs)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline:  # kill worker 1 while it holds unfinished requests: mid-batch
        health = cluster.health()[1]
        if health["unfinished"] > 0:
            break
    victim = health["pid"]
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    results = outcome["results"]
    assert [r.request_id for r in results] == [r.request_id for r in reqs], "every request answered, once, in order"
    assert all(len(r.token_ids) == 200 for r in results)
    assert cluster.restarts[1] >= 1
    health = cluster.health()
    assert health[1]["pid"] != victim and health[1]["policy_version"] == version


@pytest.mark.slow
def test_smollm2_cluster_two_workers(cluster, smol_tokenizer):
    """The real model on two workers: a GRPO-shaped batch, then new weights change the greedy output."""
    from rollout.tasks import chat_prompt_ids, list_tasks

    cluster.shutdown()  # the tiny-model cluster holds both CPUs of this Ray; it is the module's last user

    config = load_config(
        None,
        [
            "engine.max_model_len=256",
            "engine.max_num_seqs=16",
            "speculation.budget=fixed:4",
            "cluster.num_workers=2",
            "cluster.weight_bucket_mb=64",
        ],
    )
    cluster = RolloutCluster(config)  # noqa: F811 (the fixture is done with)
    try:
        prompts = [chat_prompt_ids(smol_tokenizer, t.prompt) for t in list_tasks(4, seed=5)]
        reqs = [
            RolloutRequest(f"p{i}s{s}", p, SamplingParams(temperature=0.7, max_tokens=24, seed=s), f"p{i}")
            for i, p in enumerate(prompts)
            for s in range(4)
        ]
        results = cluster.generate(reqs)
        assert {r.group: {x.worker for x in results if x.group == r.group} for r in results} == {
            f"p{i}": {results[4 * i].worker} for i in range(4)
        }
        assert {r.worker for r in results} == {0, 1}
        greedy = [RolloutRequest("g", prompts[0], SamplingParams(temperature=0, max_tokens=12))]
        before = cluster.generate(greedy)[0].token_ids
        from transformers import AutoModelForCausalLM

        from rollout.checkpoint import resolve_model

        hf = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
        with torch.no_grad():  # a visibly different policy: the last layer's MLP output doubled
            hf.model.layers[-1].mlp.down_proj.weight.mul_(2.0)
        version = cluster.update_weights(hf.named_parameters(), version=3)
        after = cluster.generate([RolloutRequest("g2", prompts[0], SamplingParams(temperature=0, max_tokens=12))])[0]
        assert version == 3 and after.policy_version == 3 and after.token_ids != before
        assert all(h["policy_version"] == 3 for h in cluster.health())
    finally:
        cluster.shutdown()
