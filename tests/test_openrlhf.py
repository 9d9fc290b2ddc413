"""The OpenRLHF 0.11 adapter on real local Ray (ray.init(num_cpus=2)) with the real SmolLM2.

OpenRLHF's vllm_engine.py and samples_generator.py import vLLM at import time, and vLLM cannot be installed beside
the CPU torch here. So:
- the signature checks read RolloutRayActor and create_vllm_engines from the installed OpenRLHF source with `ast`,
  without importing it;
- the generation test imports OpenRLHF's real SamplesGenerator with a stub `vllm` module in sys.modules (for this
  module's tests only) that provides just the names those imports ask for: SamplingParams (an attribute holder
  with vLLM's defaults), inputs.TokensPrompt, utils.random_uuid and __version__. The stub is pickled by value, so
  our actor, which never imports vllm, reads the params OpenRLHF built.
Everything else is real: Ray, our actor, OpenRLHF's SamplesGenerator (prompt dispatch, load balancing, Experience
building) and SingleTurnAgentExecutor, the tokenizer, SmolLM2, and gloo with the test process as rank 0.
The OpenRLHF trainer itself (DeepSpeed, CUDA) is not run; the launcher's flag handling and patching are checked.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import inspect
import socket
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("openrlhf")
ray = pytest.importorskip("ray")

import adapters.openrlhf as adapter  # noqa: E402
from adapters.openrlhf import AdapterConfig, SpecRolloutActor, create_engines, translate_sampling  # noqa: E402
from rollout.config import load_config  # noqa: E402
from rollout.sampling import SamplingParams  # noqa: E402
from rollout.service import LocalService  # noqa: E402
from rollout.worker import RolloutRequest  # noqa: E402

WEIGHT = "model.layers.3.mlp.down_proj.weight"
PROMPT = [1, 504, 3458, 314, 253, 1345, 281]
OPENRLHF = Path(__import__("openrlhf").__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- the vllm stub


# Compiled inside the stub module, so that everything in it belongs to "vllm" and is pickled by value.
STUB_SOURCE = """
__version__ = "0.27.1"


class SamplingParams:
    \"\"\"vLLM's SamplingParams fields and defaults, nothing else (its validation is vLLM's business).\"\"\"

    DEFAULTS = dict(n=1, best_of=None, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                    temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=None, stop_token_ids=None,
                    bad_words=None, ignore_eos=False, max_tokens=16, min_tokens=0, logprobs=None,
                    prompt_logprobs=None, detokenize=True, skip_special_tokens=True,
                    spaces_between_special_tokens=True, include_stop_str_in_output=False, logit_bias=None,
                    allowed_token_ids=None, structured_outputs=None, extra_args=None)

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"unexpected SamplingParams fields {unknown}")
        self.__dict__.update({**self.DEFAULTS, **kwargs})
"""


@pytest.fixture(scope="module")
def vllm_stub():
    if importlib.util.find_spec("vllm") is not None:  # the real one, where it can be installed
        yield importlib.import_module("vllm")
        return
    stub = types.ModuleType("vllm")
    exec(STUB_SOURCE, stub.__dict__)
    inputs, utils = types.ModuleType("vllm.inputs"), types.ModuleType("vllm.utils")
    inputs.TokensPrompt, utils.random_uuid = dict, lambda: "stub"
    stub.inputs, stub.utils = inputs, utils
    before = set(sys.modules)
    mp = pytest.MonkeyPatch()
    for name, module in (("vllm", stub), ("vllm.inputs", inputs), ("vllm.utils", utils)):
        mp.setitem(sys.modules, name, module)
    ray.cloudpickle.register_pickle_by_value(stub)
    yield stub
    ray.cloudpickle.unregister_pickle_by_value(stub)
    mp.undo()
    for name in set(sys.modules) - before:  # OpenRLHF modules that hold the stub
        if name.startswith("openrlhf"):
            del sys.modules[name]


def params(**kwargs):
    import vllm

    return vllm.SamplingParams(**kwargs)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine(ray_local):
    mp = pytest.MonkeyPatch()
    mp.setattr(adapter, "ADAPTER_CONFIG", AdapterConfig(overrides=["speculation.budget=fixed:4"], group_timeout_s=60))
    engines = create_engines(1, 1, "smollm2-135m", 0, False, False, False, 256)
    mp.undo()
    yield engines[0]
    ray.kill(engines[0])


@pytest.fixture(scope="module")
def local_service():
    return LocalService(load_config(None, ["engine.max_model_len=256"]))


def greedy(engine, prompt=PROMPT, max_tokens=20) -> list[int]:
    out = ray.get(engine.generate.remote(prompt, params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))
    return list(out.outputs[0].token_ids)


# ------------------------------------------------------------------------------------------- signatures


def _openrlhf_functions() -> tuple[dict[str, ast.AST], ast.AST]:
    tree = ast.parse((OPENRLHF / "trainer/ray/vllm_engine.py").read_text())
    actor = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RolloutRayActor")
    methods = {
        n.name: n
        for n in actor.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_")
    }
    create = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "create_vllm_engines")
    return methods, create


def _signature(node) -> tuple[inspect.Signature, bool]:
    """The signature of an ast function, built by compiling it with an empty body and no annotations."""
    node = ast.parse(ast.unparse(node)).body[0]  # a copy
    node.decorator_list, node.returns, node.body = [], None, [ast.Pass()]
    args = node.args
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if a is not None:
            a.annotation = None
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(ast.Module([node], [])), "<openrlhf>", "exec"), namespace)
    return inspect.signature(namespace[node.name]), isinstance(node, ast.AsyncFunctionDef)


def _shape(sig: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_actor_methods_and_create_engines_match_openrlhf():
    methods, create = _openrlhf_functions()
    assert {
        "generate",
        "generate_responses",
        "init_process_group",
        "update_weight",
        "update_weight_cuda_ipc",
        "reset_prefix_cache",
        "sleep",
        "wake_up",
        "get_num_unfinished_requests",
        "pause_generation",
        "resume_generation",
    } <= set(methods)
    for name, node in methods.items():
        theirs, is_async = _signature(node)
        ours = getattr(SpecRolloutActor, name)
        assert _shape(inspect.signature(ours)) == _shape(theirs), name
        assert inspect.iscoroutinefunction(ours) == is_async, name
    theirs, _ = _signature(create)
    assert _shape(inspect.signature(create_engines)) == _shape(theirs)


# ------------------------------------------------------------------------------------------- generation


@pytest.mark.slow
def test_openrlhf_samples_generator_drives_the_actor(engine, vllm_stub, smol_tokenizer):
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    n, prompts = 4, ["Count from one to five:", "List three colours:"]
    args = SimpleNamespace(
        rollout=SimpleNamespace(batch_size=len(prompts), n_samples_per_prompt=n, vllm_generate_batch_size=None),
        vllm=SimpleNamespace(enable_sleep=False),
        algo=SimpleNamespace(dynamic_filtering_enable=False, advantage=SimpleNamespace(is_correction_enable=True)),
    )
    # What OpenRLHF's prompt dataloader yields: (indices, prompts, labels, images) per batch.
    dataloader = [(None, prompts, ["5", "3"], [None, None])]
    generator = SamplesGenerator(SimpleNamespace(args=args), dataloader, None, smol_tokenizer, [engine])
    samples, _, consumed, _ = generator.generate_samples(max_len=96, max_new_tokens=24, temperature=1.0, top_p=0.95)
    assert consumed == len(prompts) and len(samples) == n * len(prompts)
    responses = {}
    for e in samples:
        seq, mask, logprobs = e.sequences[0], e.action_mask[0], e.rollout_log_probs[0]
        assert len(mask) == len(logprobs) == len(seq) - 1
        actions = mask.bool()
        assert int(actions.sum()) == int(e.response_length[0]) >= 1
        assert (logprobs[actions] <= 0).all() and (logprobs[actions] < 0).any()
        assert (logprobs[~actions] == 0).all()  # OpenRLHF's zeros for the prompt
        responses.setdefault(e.prompts[0], []).append(tuple(seq[1:][actions].tolist()))
    assert set(responses) == set(prompts) and all(len(r) == n for r in responses.values())
    assert all(len(set(r)) > 1 for r in responses.values()), "the n samples of a prompt are distinct draws"
    assert ray.get(engine.get_num_unfinished_requests.remote()) == 0


@pytest.mark.slow
def test_n_samples_with_logprobs_and_greedy_equals_local_service(engine, vllm_stub, local_service):
    out = ray.get(engine.generate.remote(PROMPT, params(n=3, temperature=0.8, max_tokens=16, logprobs=1, seed=7)))
    assert out.prompt_token_ids == PROMPT and len(out.outputs) == 3
    for o in out.outputs:
        assert len(o.token_ids) == len(o.logprobs) >= 1
        assert all(set(d) == {t} and d[t].logprob <= 0 for t, d in zip(o.token_ids, o.logprobs))
        assert o.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in zip(o.token_ids, o.logprobs)))
        assert o.finish_reason in ("stop", "length") and isinstance(o.text, str)
    again = ray.get(engine.generate.remote(PROMPT, params(n=3, temperature=0.8, max_tokens=16, logprobs=1, seed=7)))
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs], "seeded: reproducible"

    ours = greedy(engine)
    [local] = local_service.generate(
        [RolloutRequest("g", PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))]
    )
    assert ours == local.token_ids


# ------------------------------------------------------------------------------------------- weights


def _push(engine, group, name, tensor, dtype=None, shape=None):
    from adapters.openrlhf import broadcast_weight

    ref = engine.update_weight.remote(name, dtype=dtype or tensor.dtype, shape=shape or tensor.shape)
    broadcast_weight(group, tensor)
    return ray.get(ref)


@pytest.fixture(scope="module")
def weight_group(engine):
    from adapters.openrlhf import trainer_weight_group

    port = free_port()
    ref = engine.init_process_group.remote("127.0.0.1", port, 1, 2, "openrlhf", "gloo", False)
    group = trainer_weight_group("127.0.0.1", port, 2, timeout_s=60)
    ray.get(ref)
    return group


@pytest.mark.slow
def test_weights_over_gloo_change_and_restore_the_output(engine, weight_group, smol_folder):
    from safetensors.torch import load_file

    original = load_file(str(next(smol_folder.glob("*.safetensors"))))[WEIGHT]
    before, version = greedy(engine), ray.get(engine.policy_version.remote())
    _push(engine, weight_group, WEIGHT, (original * -3.0).to(torch.bfloat16))  # OpenRLHF sends bf16
    changed = greedy(engine)
    assert changed != before
    assert ray.get(engine.policy_version.remote()) == version + 1
    _push(engine, weight_group, WEIGHT, original)
    assert greedy(engine) == before


@pytest.mark.slow
def test_bad_inputs_are_refused_and_the_actor_keeps_serving(engine, weight_group, vllm_stub):
    before = greedy(engine)
    with pytest.raises(ValueError, match="unknown parameter"):
        _push(engine, weight_group, "model.layers.99.mlp.down_proj.weight", torch.zeros(576, 1536))
    with pytest.raises(ValueError, match="does not match"):
        _push(engine, weight_group, WEIGHT, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="repetition_penalty"):
        ray.get(engine.generate.remote(PROMPT, params(repetition_penalty=1.3)))
    with pytest.raises(ValueError, match="stop"):
        ray.get(engine.generate.remote(PROMPT, params(stop=["\n"])))
    with pytest.raises(ValueError, match="logprobs=5"):
        ray.get(engine.generate.remote(PROMPT, params(logprobs=5)))
    with pytest.raises(ValueError, match="max_model_len"):
        ray.get(engine.generate.remote(list(range(1, 300)), params()))
    with pytest.raises(ValueError, match="multi_modal_data"):
        ray.get(engine.generate.remote(PROMPT, params(), {"image": [object()]}))
    with pytest.raises(ValueError, match="gloo"):
        ray.get(engine.init_process_group.remote("127.0.0.1", free_port(), 1, 2, "x", "nccl", False))
    with pytest.raises(NotImplementedError, match="CUDA IPC"):
        ray.get(engine.update_weight_cuda_ipc.remote(WEIGHT, torch.float32, (576, 1536), {}))
    # the group is still in step, the weights untouched, and the actor serves
    assert greedy(engine) == before
    ray.get(
        [
            engine.reset_prefix_cache.remote(),
            engine.sleep.remote(),
            engine.wake_up.remote(["weights"]),
            engine.pause_generation.remote(),
            engine.resume_generation.remote(),
        ]
    )
    assert greedy(engine) == before


@pytest.mark.slow
def test_weights_over_rays_gloo_collective_as_openrlhf_sends_them(engine, smol_folder):
    """use_ray=True (--vllm.sync_with_ray): the group OpenRLHF's trainer can join without CUDA. A helper actor
    plays the trainer's rank 0 with ray.util.collective, as OpenRLHF's PolicyModelActor does."""
    from safetensors.torch import load_file

    @ray.remote(num_cpus=0)
    class Trainer:
        def init(self):
            from ray.util import collective

            collective.init_collective_group(2, 0, backend="gloo", group_name="openrlhf-ray")

        def broadcast(self, tensor):
            from ray.util import collective

            collective.broadcast(tensor, 0, group_name="openrlhf-ray")

    trainer = Trainer.remote()
    ray.get([trainer.init.remote(), engine.init_process_group.remote("", 0, 1, 2, "openrlhf-ray", "gloo", True)])
    original = load_file(str(next(smol_folder.glob("*.safetensors"))))[WEIGHT]
    before = greedy(engine)
    for tensor in (original * -3.0, original):
        ray.get(
            [
                engine.update_weight.remote(WEIGHT, dtype=tensor.dtype, shape=tensor.shape, empty_cache=True),
                trainer.broadcast.remote(tensor),
            ]
        )
        assert (greedy(engine) == before) == (tensor is original)
    ray.kill(trainer)


def test_sampling_translation_refuses_what_it_cannot_honour():
    sp, n, logprobs = translate_sampling(
        {"temperature": 0.7, "top_k": -1, "top_p": 0.9, "max_tokens": None, "n": 2, "logprobs": 1},
        prompt_len=10,
        max_model_len=64,
    )
    assert (sp.temperature, sp.top_k, sp.top_p, sp.max_tokens, n, logprobs) == (0.7, 0, 0.9, 54, 2, 1)
    assert translate_sampling({"min_tokens": 1}, 10, 64)[0].min_tokens == 1
    for bad in (
        {"min_p": 0.1},
        {"presence_penalty": 0.5},
        {"logit_bias": {1: 2.0}},
        {"best_of": 3},
        {"bogus": 1},
        {"temperature": -1.0},
    ):
        with pytest.raises(ValueError):
            translate_sampling(bad, 10, 64)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        create_engines(1, 2, "smollm2-135m", 0, False, False, False, 256)
    with pytest.raises(ValueError, match="logprobs_mode"):
        create_engines(1, 1, "smollm2-135m", 0, False, False, False, 256, logprobs_mode="raw_logprobs")


# ------------------------------------------------------------------------------------------- launcher


def test_launcher_strips_our_flags_patches_create_vllm_engines_and_runs_the_cli(vllm_stub, monkeypatch):
    import openrlhf.trainer.ray as openrlhf_ray

    theirs = [
        "--actor.model_name_or_path",
        "m",
        "--vllm.num_engines",
        "1",
        "--vllm.sync_backend",
        "gloo",
        "--vllm.sync_with_ray",
        "--rollout.n_samples_per_prompt",
        "4",
    ]
    argv = [
        "--specrollout-config",
        "configs/default.yaml",
        *theirs[:4],
        "--specrollout-override",
        "speculation.budget=fixed:4",
        *theirs[4:],
    ]
    config, rest = adapter.split_argv(argv)
    assert rest == theirs
    assert config == AdapterConfig("configs/default.yaml", ["speculation.budget=fixed:4"])
    with pytest.raises(ValueError, match="--specrollout-bogus"):
        adapter.split_argv(["--specrollout-bogus", "1"])

    seen = {}

    def fake_run_module(name, run_name=None, alter_sys=False):
        seen.update(
            name=name,
            run_name=run_name,
            argv=list(sys.argv),
            config=adapter.ADAPTER_CONFIG,
            patched=openrlhf_ray.create_vllm_engines is create_engines
            and openrlhf_ray.vllm_engine.create_vllm_engines is create_engines,
        )

    for target, name in (
        (openrlhf_ray, "create_vllm_engines"),
        (openrlhf_ray.vllm_engine, "create_vllm_engines"),
        (adapter, "ADAPTER_CONFIG"),
        (sys, "argv"),
    ):
        monkeypatch.setattr(target, name, getattr(target, name))  # restored after the test
    monkeypatch.setattr(adapter.runpy, "run_module", fake_run_module)
    adapter.launch_train_ppo_ray(argv)
    assert seen == {
        "name": "openrlhf.cli.train_ppo_ray",
        "run_name": "__main__",
        "argv": ["openrlhf.cli.train_ppo_ray", *theirs],
        "config": config,
        "patched": True,
    }
    with pytest.raises(ValueError, match="--vllm.sync_with_ray"):
        adapter.launch_train_ppo_ray([a for a in argv if a != "--vllm.sync_with_ray"])


def test_actor_class_batches_calls_and_groups_samples_without_ray(tiny_folder):
    """The actor is plain Python: calls made together share a batch, and the samples of one generate_responses call
    (run through OpenRLHF's SingleTurnAgentExecutor) form one group (tiny model, one event loop, no Ray)."""
    config = load_config(
        None,
        [
            f"engine.model={tiny_folder}",
            "engine.max_model_len=256",
            "engine.tune_matmul=false",
            "speculation.budget=fixed:4",
        ],
    )
    actor = SpecRolloutActor(config, AdapterConfig())

    def tokenizer(text, add_special_tokens=False, return_tensors="pt"):  # the tiny model has none; ids will do
        return {"input_ids": torch.tensor([[5 + len(text) % 50, 6, 7]])}

    sp = SimpleNamespace(
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        max_tokens=6,
        min_tokens=0,
        ignore_eos=True,
        seed=None,
        logprobs=1,
        detokenize=False,
    )

    async def main():
        same = {"temperature": 1.0, "max_tokens": 6, "ignore_eos": True, "seed": 3, "logprobs": 0, "detokenize": False}
        outs = await asyncio.gather(*[actor.generate([5, 6, 7], same) for _ in range(3)])
        responses = await actor.generate_responses("a prompt", "label", sp, 64, tokenizer, num_samples=3)
        return outs, responses, actor.get_num_unfinished_requests()

    outs, responses, unfinished = asyncio.run(main())
    assert unfinished == 0 and all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids, "same seed, same sample"
    assert len(responses) == 3 and all(
        len(r["rollout_log_probs"]) == len(r["observation_tokens"]) == 9 for r in responses
    )
    table = actor.worker.export_rollouts()  # every rollout so far, in the order they finished
    groups = table.column("group").to_pylist()
    assert len(set(groups[:3])) == 3, "separate generate calls are separate groups"
    assert len(set(groups[3:])) == 1 and groups[3].startswith("orlhf-group-"), "one prompt's samples: one group"
