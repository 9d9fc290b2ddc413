"""The one weight stager and the one bucketing rule (rollout/weights.py), and the plumbing every host shares."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import torch

from rollout.config import ENGINE_BACKENDS, load_config
from rollout.engines import BACKENDS
from rollout.sampling import SamplingParams
from rollout.weights import WeightStager, buckets, to_host
from rollout.worker import RolloutRequest, RolloutWorker

NORM = "model.norm.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def f32(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32)  # 4 bytes per element


def names(groups) -> list[list[str]]:
    return [[name for name, _ in bucket] for bucket in groups]


# ------------------------------------------------------------------------------------------------- bucketing


def test_a_bucket_closes_before_the_tensor_that_would_pass_the_limit():
    named = [(c, f32(10)) for c in "abcde"]  # 40 bytes each
    assert names(buckets(named, 100)) == [["a", "b"], ["c", "d"], ["e"]]  # 80 + 40 > 100
    assert names(buckets(named, 80)) == [["a", "b"], ["c", "d"], ["e"]]  # exactly at the limit stays in
    assert names(buckets(named, 79)) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert names(buckets(named, 10**9)) == [list("abcde")]


def test_a_tensor_larger_than_the_limit_travels_alone_and_nothing_is_lost():
    named = [("small", f32(2)), ("huge", f32(1000)), ("s1", f32(2)), ("s2", f32(2))]
    assert names(buckets(named, 16)) == [["small"], ["huge"], ["s1", "s2"]]
    assert list(buckets([], 16)) == []
    with pytest.raises(ValueError, match="bucket limit"):
        list(buckets(named, 0))


def test_buckets_stream_a_generator_of_weights():
    read = []

    def weights():
        for c in "abcd":
            read.append(c)
            yield c, f32(10)

    stream = buckets(weights(), 80)
    assert names([next(stream)]) == [["a", "b"]] and read == ["a", "b", "c"]  # c was read to close the bucket
    assert names(stream) == [["c", "d"]]


def test_to_host_detaches_and_leaves_non_tensors_alone():
    t = torch.ones(2, 3, requires_grad=True).t()
    host = to_host(t)
    assert not host.requires_grad and host.is_contiguous() and host.device.type == "cpu"
    assert to_host("not a tensor") == "not a tensor"


# ------------------------------------------------------------------------------------------------- the stager


def test_the_stager_checks_buckets_and_commits_them_together(tiny_model):
    stager = WeightStager(tiny_model.check_weight)
    norm, down = torch.ones(tiny_model.parameter_shapes()[NORM]), torch.ones(tiny_model.parameter_shapes()[DOWN])
    assert stager.stage([(f"module.{NORM}", norm)]) == 1  # a DDP prefix: kept under the model's name
    assert stager.stage([(DOWN, down), ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))]) == 2
    assert len(stager) == 2
    staged = stager.commit()
    assert [name for name, _ in staged] == [NORM, DOWN] and staged[0][1] is norm
    assert len(stager) == 0 and stager.commit() == []


def test_a_bad_tensor_is_refused_before_anything_changes(tiny_model):
    stager = WeightStager(tiny_model.check_weight)
    good = (NORM, torch.ones(tiny_model.parameter_shapes()[NORM]))
    stager.stage([good])
    with pytest.raises(ValueError, match=f"parameter '{DOWN}': shape \\(3, 3\\) does not match the model's"):
        stager.stage([good, (DOWN, torch.zeros(3, 3))])
    assert len(stager) == 0, "a refused bucket drops the update staged so far"
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        stager.stage([("nope", torch.zeros(1))])
    with pytest.raises(TypeError, match="not a floating-point type"):
        stager.stage([(NORM, torch.ones(tiny_model.parameter_shapes()[NORM], dtype=torch.int32))])
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        stager.stage([(NORM, [1.0])])
    stager.stage([good])
    stager.discard()
    assert stager.commit() == []
    unchecked = WeightStager()  # for a receiver that checks when it applies
    assert unchecked.stage([("anything", 1)]) == 1 and unchecked.commit() == [("anything", 1)]


@pytest.fixture()
def worker(tiny_folder):
    config = load_config(None, [f"engine.model={tiny_folder}", "engine.max_model_len=128", "engine.tune_matmul=false"])
    return RolloutWorker(config)


def test_the_worker_applies_staged_weights_atomically(worker):
    model = worker.engine.model
    shapes = model.parameter_shapes()
    before = {n: model._views[n].clone() for n in (NORM, DOWN)}
    worker.stage_weights([(NORM, torch.full(shapes[NORM], 2.0))])
    with pytest.raises(ValueError, match="does not match"):
        worker.stage_weights([(DOWN, torch.zeros(3, 3))])
    assert worker.commit_weights(1) == 1
    assert all(torch.equal(model._views[n], before[n]) for n in before), "the refused update changed nothing"
    worker.stage_weights([(NORM, torch.full(shapes[NORM], 2.0))])
    worker.stage_weights([(DOWN, torch.full(shapes[DOWN], 0.5))])
    assert all(torch.equal(model._views[n], before[n]) for n in before), "nothing changes before commit"
    assert worker.commit_weights(2) == 2 and worker.engine.policy_version == 2
    assert float(model._views[NORM].mean()) == 2.0 and float(model._views[DOWN].mean()) == 0.5


def test_drained_returns_once_nothing_is_in_flight(worker):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        call = asyncio.ensure_future(worker.generate([RolloutRequest("r", [5, 6, 7], params)]))
        await asyncio.sleep(0)
        assert worker.engine.has_unfinished()
        await worker.drained()
        assert not worker.engine.has_unfinished()
        await worker.drained()  # nothing in flight: returns at once
        return await call

    (result,) = asyncio.run(main())
    assert len(result.token_ids) == 6


# ------------------------------------------------------------------------------------------------- one list each


def test_worker_env_is_one_list_with_defaults(monkeypatch):
    from rollout.cluster import WORKER_ENV, worker_env

    for key in WORKER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SPECROLLOUT_CACHE", "/tmp/cache")
    monkeypatch.setenv("UNRELATED", "x")
    assert worker_env() == {"SPECROLLOUT_CACHE": "/tmp/cache"}
    assert worker_env(HF_HUB_OFFLINE="1") == {"SPECROLLOUT_CACHE": "/tmp/cache", "HF_HUB_OFFLINE": "1"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert worker_env(HF_HUB_OFFLINE="1")["HF_HUB_OFFLINE"] == "0", "the driver's value wins over the default"
    assert {"HF_HUB_OFFLINE", "RAY_AUTH_MODE", "SPECROLLOUT_VLLM_KWARGS"} <= set(WORKER_ENV)


def test_the_backend_list_is_the_engines_and_config_stays_light():
    assert ENGINE_BACKENDS == tuple(BACKENDS)
    code = "import sys, rollout.config; heavy = {'torch', 'vllm', 'pyarrow'} & set(sys.modules); print(sorted(heavy))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"
