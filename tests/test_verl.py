"""The verl backend (adapters/verl.py), driven by verl's own code on real local Ray (ray.init(num_cpus=2)).

Nothing of verl is stubbed. verl's `LLMServerManager` resolves `rollout.name=specrollout` through its registry and
starts our replica's server actor; verl's `AgentLoopManager` runs its `AgentLoopWorker` as a Ray actor, which runs
the `single_turn_agent` loop (chat template, tokenization, generate, padding into a DataProto) against that actor
through verl's `LLMServerClient` and load balancer; the model is the real SmolLM2. verl is installed without its
dependencies (it pins CUDA builds and vLLM); only its import-time ones are added, see .ci/run.

The entry point is tested in a subprocess that sees a throwaway dist-info declaring it, since this process has
imported verl already and verl reads `verl.plugins` once, when it is imported.

The replica's OpenAI-compatible HTTP API at `server_address` is driven by the real `openai` client over real HTTP, on
a replica verl starts the same way, over a tiny random model with SmolLM2's tokenizer (seconds, not minutes), and
checked against verl's own `generate` path on the same engine.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from importlib.metadata import entry_points

import numpy as np
import pytest
from conftest import build_tiny

pytest.importorskip("verl")
ray = pytest.importorskip("ray")

from adapters.verl import (  # noqa: E402
    SPEC_ACCEPTED,
    SPEC_DRAFT,
    SPEC_VERIFY,
    SpecRolloutReplica,
    SpecRolloutServerAdapter,
    group_of,
    server_name,
    to_sampling_params,
    to_token_output,
)
from rollout.config import load_config  # noqa: E402
from rollout.sampling import SamplingParams  # noqa: E402
from rollout.service import LocalService  # noqa: E402
from rollout.worker import RolloutRequest  # noqa: E402

PROMPT_LEN, RESPONSE_LEN = 64, 20
WEIGHT = "model.layers.3.mlp.down_proj.weight"


# ------------------------------------------------------------------------------------------------ registration


def test_entry_point_is_loaded_by_verl_and_registers(tmp_path):
    dist = tmp_path / "specrollout_verl_ep-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: specrollout-verl-ep\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\nspecrollout = adapters.verl\n")
    script = textwrap.dedent("""
        import sys
        import verl  # imports every `verl.plugins` entry point; nothing imports adapters.verl by hand
        assert "adapters.verl" in sys.modules, "verl did not load the entry point"
        from verl.workers.rollout.base import get_rollout_class
        from verl.workers.rollout.replica import get_rollout_replica_class
        print(get_rollout_replica_class("specrollout").__qualname__, get_rollout_class("specrollout").__qualname__)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)  # verl's default, "auto": load them all
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["SpecRolloutReplica", "SpecRolloutServerAdapter"]


def test_installed_entry_point():
    eps = [ep for ep in entry_points(group="verl.plugins") if ep.name == "specrollout"]
    if not eps:
        pytest.skip("specrollout's verl.plugins entry point is not installed (pip install -e . after adding it)")
    assert eps[0].value == "adapters.verl"
    from verl.workers.rollout.replica import get_rollout_replica_class

    eps[0].load()
    assert get_rollout_replica_class("specrollout") is SpecRolloutReplica


# ------------------------------------------------------------------------------------------------ sampling options


def test_sampling_options_map_or_are_refused():
    params, logprobs = to_sampling_params(
        {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True},
        prompt_len=10,
        max_model_len=256,
        default_max_tokens=20,
        seed=None,
    )
    assert params == SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_tokens=20) and logprobs
    params, logprobs = to_sampling_params(
        {"max_new_tokens": 500, "top_k": 5, "seed": 3, "logprobs": False},
        prompt_len=250,
        max_model_len=256,
        default_max_tokens=20,
        seed=None,
    )
    assert (params.max_tokens, params.top_k, params.seed, logprobs) == (6, 5, 3, False)  # capped by the room left
    bad = [
        ({"min_p": 0.1}, "min_p"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"n": 4}, "n=4"),
        ({"logprobs": 5}, "logprobs=5"),
        ({"best_of": 2, "stop": ["\n"]}, "best_of"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            to_sampling_params(options, prompt_len=10, max_model_len=256, default_max_tokens=20, seed=None)
    with pytest.raises(ValueError, match="no room"):
        to_sampling_params({}, prompt_len=256, max_model_len=256, default_max_tokens=20, seed=None)
    assert group_of([1, 2, 3]) == group_of(np.array([1, 2, 3])) != group_of([1, 2, 4])


# ------------------------------------------------------------------------------------------------ on Ray, SmolLM2


def verl_config(smol_folder, overrides=("engine.max_model_len=256",), **rollout):
    """verl's full PPO trainer config (the YAML it ships), pointed at a model folder (SmolLM2) and our backend."""
    from omegaconf import OmegaConf
    from verl.trainer import config as verl_configs

    base = OmegaConf.load(os.path.join(os.path.dirname(verl_configs.__file__), "_generated_ppo_trainer.yaml"))
    settings = {
        "name": "specrollout",
        "nnodes": 1,
        "tensor_model_parallel_size": 1,
        "prompt_length": PROMPT_LEN,
        "response_length": RESPONSE_LEN,
        "calculate_log_probs": True,
        "temperature": 0,
        "agent.num_workers": 1,
        **rollout,
    }
    dotlist = [f"actor_rollout_ref.rollout.{k}={v}" for k, v in settings.items()]
    dotlist += [f"actor_rollout_ref.model.path={smol_folder}", "trainer.n_gpus_per_node=1"]
    config = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist))
    engine = {"specrollout": {"overrides": [*overrides, "speculation.budget=fixed:4"]}}
    OmegaConf.update(config, "actor_rollout_ref.rollout.engine_kwargs", engine, merge=True)
    return config


def run(coro):
    return asyncio.run(coro)  # as verl's auto_await does outside a running loop


@pytest.fixture(scope="module")
def config(smol_folder):
    return verl_config(smol_folder)


@pytest.fixture(scope="module")
def manager(ray_local, config):
    from verl.workers.rollout.llm_server import LLMServerManager

    return LLMServerManager.create(config)  # resolves rollout.name through verl's registry


@pytest.fixture(scope="module")
def client(manager):
    return manager.get_client()


@pytest.fixture(scope="module")
def reference():
    # Plain decoding in this process: what the speculative server behind verl must reproduce under greedy.
    return LocalService(
        load_config(None, ["engine.max_model_len=256", "speculation.drafter=none", "speculation.budget=fixed:0"])
    )


def local_greedy(service, prompts: list[list[int]], max_tokens=RESPONSE_LEN) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    requests = [RolloutRequest(f"ref{i}", list(ids), params) for i, ids in enumerate(prompts)]
    return [r.token_ids for r in service.generate(requests)]


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


@pytest.mark.slow
def test_verl_agent_loop_drives_our_server(manager, client, config, reference):
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager
    from verl.protocol import DataProto

    assert isinstance(manager.get_replicas()[0], SpecRolloutReplica)
    agents = AgentLoopManager.create(config, llm_client=client)
    texts = ["List three colors.", "Count to five.", "List three colors."]  # a group of two, as rollout.n repeats
    raw = np.empty(len(texts), dtype=object)
    raw[:] = [[{"role": "user", "content": t}] for t in texts]
    out = agents.generate_sequences(DataProto.from_dict(non_tensors={"raw_prompt": raw}))

    batch, extra = out.batch, out.non_tensor_batch
    prompt_mask = batch["attention_mask"][:, :PROMPT_LEN].bool()
    lengths = batch["response_mask"].sum(-1).tolist()
    prompts = [batch["prompts"][i][prompt_mask[i]].tolist() for i in range(len(texts))]
    expected = local_greedy(reference, prompts)
    for i in range(len(texts)):
        response = batch["responses"][i][: lengths[i]].tolist()
        logprobs = batch["rollout_log_probs"][i]
        assert 0 < lengths[i] <= RESPONSE_LEN
        assert bool((logprobs[: lengths[i]] < 0).all()) and not logprobs[lengths[i] :].any(), "one per token"
        assert response == expected[i], "greedy through verl equals plain greedy in-process"
        drafted, accepted, verify = (int(extra[k][i]) for k in (SPEC_DRAFT, SPEC_ACCEPTED, SPEC_VERIFY))
        assert 0 <= accepted <= drafted and 1 <= verify <= lengths[i] <= verify + accepted
    assert batch["responses"][0].tolist() == batch["responses"][2].tolist()

    # The counters carry the names verl's trainer reads for rollout/spec_accept_rate and spec_accept_length
    # (ray_trainer.compute_spec_decode_metrics; importing it needs torchdata, so the names are checked here).
    from verl.experimental.agent_loop.tool_agent_loop import SPEC_DECODE_EXTRA_KEYS

    assert (SPEC_DRAFT, SPEC_ACCEPTED, SPEC_VERIFY) == SPEC_DECODE_EXTRA_KEYS

    # The two samples of one prompt were one group on the engine.
    def groups(server):
        server.worker.engine.flush_history()
        table = server.worker.engine.history.table()
        return list(zip(table["prompt_key"].to_pylist(), table["group"].to_pylist()))

    seen = ray.get(ray.get_actor(server_name(0)).__ray_call__.remote(groups))
    assert len(seen) >= 3 and all(group == f"verl-{key}" for key, group in seen)


@pytest.mark.slow
def test_bad_options_are_refused_and_the_server_keeps_serving(client, smol_tokenizer, reference):
    ids = chat_ids(smol_tokenizer, "Name a fruit.")

    def generate(sampling_params, **kwargs):
        return run(client.generate("r", prompt_ids=ids, sampling_params=sampling_params, **kwargs))

    for options, message in [
        ({"min_p": 0.05}, "min_p"),
        ({"frequency_penalty": 0.3}, "frequency_penalty"),
        ({"guided_json": "{}"}, "guided_json"),
        ({"top_k": 2.5}, "top_k"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate({"temperature": 1.0, **options})
    with pytest.raises(ValueError, match="text-only"):
        generate({"temperature": 0}, image_data=["an image"])
    with pytest.raises(ValueError, match="no room"):
        run(client.generate("r", prompt_ids=[1] * 256, sampling_params={}))
    out = generate({"temperature": 0, "top_k": -1, "top_p": 1.0, "logprobs": True, "max_tokens": 8})
    assert out.token_ids == local_greedy(reference, [ids], 8)[0]
    assert len(out.log_probs) == len(out.token_ids) and out.stop_reason == "completed"
    assert generate({"temperature": 0.8, "max_tokens": 8}).log_probs is None  # verl asks for them explicitly


@pytest.mark.slow
def test_weight_sync_and_abort(manager, client, config, smol_folder, smol_tokenizer):
    """verl's weight sync: abort in flight, push the trainer's tensors (through the trainer-side adapter), resume."""
    from safetensors.torch import load_file

    original = load_file(str(next(smol_folder.glob("*.safetensors"))))[WEIGHT]
    ids = chat_ids(smol_tokenizer, "What is the capital of France?")
    replica = manager.get_replicas()[0]

    def greedy(max_tokens=12):
        params = {"temperature": 0, "max_tokens": max_tokens, "logprobs": True}
        return run(client.generate("w", prompt_ids=ids, sampling_params=params))

    async def abort_one_in_flight():
        params = {"temperature": 0, "max_tokens": 200, "ignore_eos": True, "logprobs": True}
        task = asyncio.ensure_future(client.generate("long", prompt_ids=ids, sampling_params=params))
        await asyncio.sleep(1.0)
        await replica.abort_all_requests()
        aborted = await task
        # Admission stays closed until verl resumes generation: a request arriving meanwhile waits for it.
        parked = asyncio.ensure_future(client.generate("parked", prompt_ids=ids, sampling_params={"max_tokens": 4}))
        await asyncio.sleep(0.5)
        assert not parked.done()
        await replica.resume_generation()
        return aborted, await parked

    aborted, parked = run(abort_one_in_flight())
    assert aborted.stop_reason == "aborted" and len(aborted.token_ids) < 200
    assert len(aborted.log_probs) == len(aborted.token_ids), "the partial rollout keeps its logprobs"
    assert parked.stop_reason == "completed" and len(parked.token_ids) >= 1

    before = greedy()
    adapter = SpecRolloutServerAdapter(config.actor_rollout_ref.rollout, config.actor_rollout_ref.model)
    run(adapter.update_weights(iter([(WEIGHT, original * -3.0)]), global_steps=5))
    after = greedy()
    assert after.token_ids != before.token_ids, "a sign-flipped, scaled MLP weight changes the greedy continuation"
    assert after.extra_fields["policy_version"] == 5 and after.extra_fields["global_steps"] == 5
    assert after.extra_fields["spec_drafter_collapsed"] in (False, True)  # the drafter-health alarm rides along
    assert (
        after.extra_fields["spec_drafter_acceptance"] is None or 0 <= after.extra_fields["spec_drafter_acceptance"] <= 1
    )
    with pytest.raises(ValueError, match="does not match the model"):
        run(adapter.update_weights(iter([(WEIGHT, original[:3])]), global_steps=6))
    assert greedy().token_ids == after.token_ids, "a refused update changes nothing"
    run(adapter.update_weights(iter([(WEIGHT, original)]), global_steps=7))
    assert greedy().token_ids == before.token_ids


# ----------------------------------------------------------------------------------------------- HTTP at server_address
# verl's agent loops, reward loops and users' multi-turn code call the OpenAI-compatible server at a replica's
# `server_address`. Here on a tiny random model over SmolLM2's vocabulary (its tokenizer and chat template saved
# beside the weights, where verl and the replica both read them): seconds per test, and no near-ties in greedy
# choices (sharp lm_head). Its replica is rank 1, beside the SmolLM2 one (rank 0) in this module's Ray.

TINY_RANK, TINY_LEN = 1, 512
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tiny_verl_folder(tmp_path_factory, smol_tokenizer):
    folder = build_tiny(tmp_path_factory, "llama", scale_head=40.0, vocab_size=len(smol_tokenizer))
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_config(tiny_verl_folder):
    return verl_config(tiny_verl_folder, overrides=[f"engine.max_model_len={TINY_LEN}", "engine.tune_matmul=false"])


@pytest.fixture(scope="module")
def tiny_manager(ray_local, tiny_config):
    from verl.workers.rollout.llm_server import LLMServerManager

    return LLMServerManager.create(tiny_config, start_rank=TINY_RANK)  # as verl starts it: registry, replica, balancer


@pytest.fixture(scope="module")
def tiny_client(tiny_manager):
    return tiny_manager.get_client()


@pytest.fixture(scope="module")
def url(tiny_manager):
    (address,) = tiny_manager.get_addresses()
    return f"http://{address}"


@pytest.fixture(scope="module")
def openai_client(url):
    openai = pytest.importorskip("openai")
    # Generous timeout: the whole machine (this process and the Ray workers) may be paused for a while under load.
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def verl_greedy(client, prompt_ids: list[int], max_tokens: int):
    """The same prompt through verl's own path: LLMServerClient -> load balancer -> the server actor's `generate`."""
    params = {"temperature": 0, "max_tokens": max_tokens, "logprobs": True}
    return run(client.generate("g", prompt_ids=list(prompt_ids), sampling_params=params))


def test_server_address_is_verls_ip_port_and_answers_health(tiny_manager, url, openai_client, tiny_verl_folder):
    requests = pytest.importorskip("requests")
    replica = tiny_manager.get_replicas()[0]
    assert isinstance(replica, SpecRolloutReplica)
    # verl's vLLM replica's format: "ip:port" ("[ip]:port" for IPv6), which callers prefix with http://
    assert re.fullmatch(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:]+\]):\d+", replica._server_address), replica._server_address
    assert requests.get(f"{url}/health", timeout=600).status_code == 200
    # The model's id is the path verl gave, as vLLM names a model it was started on.
    assert [m.id for m in openai_client.models.list().data] == [str(tiny_verl_folder)]


def test_http_greedy_equals_verls_generate(tiny_client, openai_client, smol_tokenizer, tiny_verl_folder):
    model = str(tiny_verl_folder)
    chat = openai_client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        temperature=0,
        max_completion_tokens=24,
        logprobs=True,
        extra_body={"return_token_ids": True},
    )
    (choice,) = chat.choices
    # The template's rendering, as verl's agent loop tokenizes a conversation.
    prompt = smol_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.prompt_token_ids == prompt
    direct = verl_greedy(tiny_client, prompt, 24)
    assert 1 <= len(choice.token_ids) <= 24
    assert choice.token_ids == direct.token_ids, "greedy over HTTP equals greedy through verl's generate"
    assert choice.message.content == smol_tokenizer.decode(direct.token_ids, skip_special_tokens=True)
    # The same numbers, not merely the same argmax (rounding of differently batched forwards aside).
    assert [c.logprob for c in choice.logprobs.content] == pytest.approx(direct.log_probs, abs=1e-4)

    ids = chat_ids(smol_tokenizer, "Count to five.")
    completion = openai_client.completions.create(
        model=model, prompt=ids, temperature=0, max_tokens=16, logprobs=0, extra_body={"return_token_ids": True}
    )
    (choice,) = completion.choices
    direct = verl_greedy(tiny_client, ids, 16)
    assert choice.prompt_token_ids == ids
    assert choice.token_ids == direct.token_ids and len(choice.token_ids) >= 1
    assert choice.logprobs.token_logprobs == pytest.approx(direct.log_probs, abs=1e-4)


def test_http_and_verl_share_one_engine(tiny_client, tiny_config, openai_client, url, tiny_verl_folder):
    """New weights through verl's weight sync reach the HTTP API: one engine, not two that happen to agree."""
    requests = pytest.importorskip("requests")
    from safetensors.torch import load_file

    original = load_file(str(next(tiny_verl_folder.glob("*.safetensors"))))["lm_head.weight"]
    ids = list(range(100, 120))

    def http_greedy():
        body = {"model": str(tiny_verl_folder), "prompt": ids, "temperature": 0, "max_tokens": 12}
        response = requests.post(f"{url}/v1/completions", json={**body, "return_token_ids": True}, timeout=600)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    before = http_greedy()
    rollout, model = tiny_config.actor_rollout_ref.rollout, tiny_config.actor_rollout_ref.model
    adapter = SpecRolloutServerAdapter(rollout, model, replica_rank=TINY_RANK)
    try:
        run(adapter.update_weights(iter([("lm_head.weight", -original)]), global_steps=3))
        after = http_greedy()
        assert after != before, "a negated lm_head changes the greedy continuation over HTTP"
        assert after == verl_greedy(tiny_client, ids, 12).token_ids
        assert requests.get(f"{url}/server_info", timeout=600).json()["policy_version"] == 3
    finally:
        run(adapter.update_weights(iter([("lm_head.weight", original)]), global_steps=4))
    assert http_greedy() == before

    # HTTP rollouts land in the engine's history, grouped by prompt as verl's calls are.
    def groups(server):
        server.worker.engine.flush_history()
        table = server.worker.engine.history.table()
        return list(zip(table["prompt_key"].to_pylist(), table["group"].to_pylist()))

    seen = ray.get(ray.get_actor(server_name(TINY_RANK)).__ray_call__.remote(groups))
    key = group_of(ids).removeprefix("verl-")
    assert sum(k == key for k, _ in seen) >= 4 and all(g == f"verl-{k}" for k, g in seen)


def test_http_calls_batch_together_and_pause_for_weight_sync(tiny_manager, url, smol_tokenizer, tiny_verl_folder):
    """Concurrent HTTP calls run in the engine together (not one at a time), and they obey verl's pause: aborted in
    flight, parked or turned away while a weight sync holds admission, resumed with verl's `resume_generation`."""
    requests = pytest.importorskip("requests")
    replica = tiny_manager.get_replicas()[0]
    server = ray.get_actor(server_name(TINY_RANK))
    ids = chat_ids(smol_tokenizer, "Tell me a long story.")
    answers: dict[str, requests.Response] = {}

    def post(name: str, max_tokens: int, **extra):
        body = {"model": str(tiny_verl_folder), "prompt": ids, "max_tokens": max_tokens, "temperature": 1.0, **extra}
        answers[name] = requests.post(f"{url}/v1/completions", json={**body, "return_token_ids": True}, timeout=600)

    def in_flight() -> int:
        return ray.get(server.health.remote())["unfinished"]

    def wait_for(condition, what: str, timeout_s: float = 600):
        deadline = time.time() + timeout_s
        while not condition():
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    long = threading.Thread(target=post, args=("long", TINY_LEN - len(ids)), kwargs={"ignore_eos": True})
    long.start()
    wait_for(lambda: in_flight() >= 1, "the long request to reach the engine")
    post("short", 2)  # blocks until answered: with calls serialised, only after the long one had finished
    assert answers["short"].status_code == 200, answers["short"].text
    assert long.is_alive(), "the short call waited for the long one to finish: HTTP calls were serialised"
    run(replica.abort_all_requests())
    long.join(timeout=600)
    choice = answers["long"].json()["choices"][0]
    assert choice["finish_reason"] == "abort" and len(choice["token_ids"]) < TINY_LEN - len(ids)

    # Admission stays closed until verl resumes: an HTTP call arriving meanwhile waits, then runs.
    parked = threading.Thread(target=post, args=("parked", 3))
    parked.start()
    time.sleep(0.5)
    assert parked.is_alive() and in_flight() == 0
    run(replica.resume_generation())
    parked.join(timeout=600)
    assert answers["parked"].status_code == 200 and len(answers["parked"].json()["choices"][0]["token_ids"]) >= 1

    # Told to turn requests away (the replica is leaving): a 503, and serving again after the resume.
    run(replica.abort_all_requests(reject_request=True))
    post("rejected", 3)
    assert answers["rejected"].status_code == 503, answers["rejected"].text
    run(replica.resume_generation())
    post("again", 3)
    assert answers["again"].status_code == 200


def test_http_refusals_on_the_replica(url, tiny_verl_folder):
    requests = pytest.importorskip("requests")
    # verl's weight sync owns the weights: the HTTP weight routes are refused before any group is joined.
    info = {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2, "backend": "gloo"}
    response = requests.post(f"{url}/init_weight_transfer_engine", json={"init_info": info}, timeout=600)
    assert response.status_code == 501 and "weight sync" in response.text
    legacy = {"host": "127.0.0.1", "port": 1, "world_size": 2}
    assert requests.post(f"{url}/init_communicator/", json=legacy, timeout=600).status_code == 501
    # Bad requests get a 4xx naming the problem; the server keeps serving.
    for body, message in [
        ({"prompt": [10**12], "max_tokens": 2}, "vocab"),
        ({"prompt": [1, 2], "max_tokens": 2, "min_p": 0.1}, "min_p"),
        ({"prompt": [1, 2], "max_tokens": 2, "model": "other"}, "not served"),
    ]:
        response = requests.post(f"{url}/v1/completions", json=body, timeout=600)
        assert 400 <= response.status_code < 500 and message in response.text, (body, response.text)
    ok = requests.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=600)
    assert ok.status_code == 200 and ok.json()["model"] == str(tiny_verl_folder)


@pytest.mark.slow
def test_http_on_smollm2(manager, smol_tokenizer, reference):
    """The SmolLM2 replica that verl's agent loop drives above serves chat at its server_address too."""
    openai = pytest.importorskip("openai")
    (address,) = manager.get_addresses()
    client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=0, timeout=600)
    response = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_completion_tokens=12,
        extra_body={"return_token_ids": True},
    )
    assert response.choices[0].token_ids == local_greedy(reference, [response.prompt_token_ids], 12)[0]


def test_token_output_carries_the_drafter_health_alarm():
    from rollout.result import RolloutResult, SpecStats

    result = RolloutResult("r", [1], [5, 6], [-0.1, -0.2], "stop", SpecStats(drafted=4, accepted=1, target_forwards=2))
    stale = to_token_output(result, True, 3, {"drafter_acceptance": 0.05, "drafter_collapsed": True})
    assert stale.extra_fields["spec_drafter_acceptance"] == 0.05 and stale.extra_fields["spec_drafter_collapsed"]
    fresh = to_token_output(result, True, 3)
    assert fresh.extra_fields["spec_drafter_acceptance"] is None and not fresh.extra_fields["spec_drafter_collapsed"]
