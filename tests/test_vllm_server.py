"""The vLLM-compatible server, driven over HTTP on loopback by TRL's real VLLMClient (on SmolLM2) and by the real
`openai` client (chat completions, top-N logprobs, token ids; on a tiny random model with SmolLM2's tokenizer).

TRL's client refuses to start unless the `vllm` package is importable; vLLM cannot be installed beside the CPU torch
here, so that one availability check is patched to True. Everything else is the real client: its requests, its
parsing of our responses. Its weight sync needs CUDA and vLLM's NCCL engine, so weights are pushed over the
server's gloo path instead, with the test process as rank 0 (WeightSender) or, for the legacy routes, as last rank.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import build_tiny, reference_distributions

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from adapters.vllm_server import LOGPROB_FLOOR, BackgroundServer, CompletionServer, ServerConfig, WeightSender
from adapters.weight_transfer import broadcast, gloo_group
from rollout.config import load_config
from rollout.sampling import SamplingParams
from rollout.service import LocalService
from rollout.tasks import chat_ids, chat_prompt_ids
from rollout.worker import RolloutRequest

WEIGHT = "model.layers.3.mlp.down_proj.weight"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service():
    # Its own model: the weight tests change it.
    return LocalService(load_config(None, ["engine.max_model_len=256", "speculation.budget=fixed:4"]))


@pytest.fixture(scope="module")
def server(service, smol_tokenizer):
    core = CompletionServer(service, smol_tokenizer, ServerConfig(port=free_port()), model_name="smollm2-135m")
    with BackgroundServer(core) as running:
        yield running


@pytest.fixture(scope="module")
def client(server, monkeypatch_module):
    import trl.generation.vllm_client as vllm_client

    monkeypatch_module.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    return vllm_client.VLLMClient(base_url=server.url, connection_timeout=10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def prompt(tokenizer, text: str) -> list[int]:
    return chat_prompt_ids(tokenizer, text)


def greedy(server, ids, max_tokens=12) -> list[int]:
    body = {"prompt": ids, "temperature": 0, "max_tokens": max_tokens, "return_token_ids": True}
    response = requests.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


@pytest.mark.slow
def test_trl_client_generates_groups_with_logprobs(client, service, smol_tokenizer):
    pytest.importorskip("trl")
    prompts = [prompt(smol_tokenizer, "Name three colours."), prompt(smol_tokenizer, "Count to five.")]
    out = client.generate(
        prompts, n=3, temperature=1.0, top_p=0.95, max_tokens=20, logprobs=0, generation_kwargs={"seed": 11}
    )
    assert out["prompt_ids"] == prompts
    assert len(out["completion_ids"]) == 6
    for completion, lps, lp_ids in zip(out["completion_ids"], out["logprobs"], out["logprob_token_ids"]):
        assert 1 <= len(completion) <= 20
        assert len(lps) == len(completion) and all(len(x) == 1 and x[0] <= 0 for x in lps)
        assert [x[0] for x in lp_ids] == completion, "logprob index 0 is the sampled token"
    # The same requests straight to the service, with the seeds the server derives: the same tokens and logprobs,
    # so nothing was lost or reordered on the way (n completions of a prompt consecutive).
    direct = service.generate(
        [
            RolloutRequest(
                f"d{i}",
                prompts[i // 3],
                SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=(11 * 1_000_003 + i) % 2**63),
            )
            for i in range(6)
        ]
    )
    assert [r.token_ids for r in direct] == out["completion_ids"]
    for r, lps in zip(direct, out["logprobs"]):
        # Not bit-equal: the drafter, fed by the first call, drafts other trees, so the forwards batch other rows,
        # and at top_p=0.95 a token at the nucleus's edge can fall in or out by that rounding, which shifts its
        # row's logprobs by the token's mass (4.6e-4 seen). A lost or reordered completion would be off by ~1.
        assert [x[0] for x in lps] == pytest.approx(r.logprobs, abs=2e-3)
    assert len({tuple(c) for c in out["completion_ids"][:3]}) > 1, "the n samples of a prompt differ"


@pytest.mark.slow
def test_trl_client_server_routes(client, server):
    assert client.get_world_size() == 1
    info = client.get_server_info()
    assert info["weight_transfer_config"]["backend"] == "gloo"
    client.reset_prefix_cache()
    assert client.model == "smollm2-135m"
    client.check_server(total_timeout=5)


@pytest.mark.slow
def test_weights_over_gloo_change_the_output(server, service, smol_folder, smol_tokenizer):
    from safetensors.torch import load_file

    original = {k: v for k, v in load_file(str(next(smol_folder.glob("*.safetensors")))).items() if k == WEIGHT}
    ids = prompt(smol_tokenizer, "What is the capital of France?")
    before, version = greedy(server, ids), service.policy_version
    with WeightSender(server.url, port=free_port()) as sender:
        changed = sender.send([(WEIGHT, original[WEIGHT] * -3.0)])
        assert changed == version + 1
        after = greedy(server, ids)
        assert after != before, "a sign-flipped, scaled MLP weight changes the greedy continuation"
        assert requests.get(f"{server.url}/server_info").json()["policy_version"] == version + 1
        # A tensor of the wrong shape: received (the group stays in step), then refused; nothing is applied.
        with pytest.raises(RuntimeError, match="does not match the model"):
            sender.send([(WEIGHT, torch.zeros(3, 5))])
        assert greedy(server, ids) == after
        restored = sender.send([(WEIGHT, original[WEIGHT])])
        assert restored == version + 2
    assert greedy(server, ids) == before, "the original weights give the original output back"


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prompt": [1, 2], "n": 0}, 400, "n: Input should be greater than or equal to 1"),
        ({"prompt": [1, 2], "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": [1, 2], "model": "gpt-9"}, 404, "model 'gpt-9' is not served"),
        ({"prompt": [1, 2], "repetition_penalty": 1.2}, 400, "repetition_penalty=1.2 is not supported"),
        ({"prompt": [1, 2], "min_p": 0.1}, 400, "min_p=0.1 is not supported"),
        ({"prompt": [1, 2], "logprobs": 21}, 400, "logprobs=21 is not supported: at most 20"),
        ({"prompt": [1, 2], "frequency_penalty": 0.5}, 400, "frequency_penalty=0.5 is not supported"),
        ({"prompt": [1, 2], "guided_json": "{}"}, 400, "guided_json: Extra inputs are not permitted"),
        ({"prompt": [1, 2], "top_p": 0}, 400, "top_p"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [1, 10**9]}, 400, "outside the vocabulary"),
        ({"prompt": [1, 2], "temperature": "hot"}, 400, "temperature"),
        ({"prompt": [1, 2], "n": 65}, 400, "n=65 is over this server's limit of 64 completions per prompt"),
        ({"prompt": [1, 2], "max_tokens": 300}, 400, "max_tokens=300 is more than the context leaves"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, smol_tokenizer, body, status, message):
    response = requests.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert len(greedy(server, prompt(smol_tokenizer, "Hi"), max_tokens=3)) >= 1


@pytest.mark.slow
def test_malformed_json_and_bad_weight_requests(server):
    response = requests.post(
        f"{server.url}/v1/completions", data="{not json", timeout=30, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    no_group = requests.post(
        f"{server.url}/update_weights",
        timeout=30,
        json={"update_info": {"names": [WEIGHT], "dtype_names": ["float32"], "shapes": [[2]]}},
    )
    assert no_group.status_code == 409 and "no weight group" in no_group.json()["error"]["message"]
    bad_dtype = requests.post(
        f"{server.url}/update_weights",
        timeout=30,
        json={"update_info": {"names": [WEIGHT], "dtype_names": ["int8"], "shapes": [[2]]}},
    )
    assert bad_dtype.status_code == 400 and "dtype 'int8' is not supported" in bad_dtype.json()["error"]["message"]
    nccl = requests.post(
        f"{server.url}/init_weight_transfer_engine",
        timeout=30,
        json={"init_info": {"master_address": "127.0.0.1", "master_port": 1234, "world_size": 2, "backend": "nccl"}},
    )
    assert nccl.status_code == 501 and "gloo" in nccl.json()["error"]["message"]
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_pushed_tensors_are_checked_on_arrival_and_a_refused_one_leaves_nothing_staged(service):
    from adapters.vllm_server import HTTPError

    core = CompletionServer(service)
    core._stage([(WEIGHT, torch.zeros(576, 1536))])
    with pytest.raises(HTTPError, match=f"parameter '{WEIGHT}': shape \\(3, 5\\) does not match") as refused:
        core._stage([(WEIGHT, torch.zeros(3, 5))])
    assert refused.value.status == 400 and len(core._staged) == 0, "the update staged so far is dropped"
    version = service.policy_version
    core._commit_legacy()  # nothing to apply: a refused legacy push does not fail the generations after it
    assert service.policy_version == version


def _legacy_group(port: int):
    """The trainer side of trl <= 1.10's group on CPU: the last rank, the store on the server."""
    return gloo_group("127.0.0.1", port, 1, 2, False, 60.0)


@pytest.mark.slow
def test_legacy_routes_and_weight_push(server, service, smol_folder, smol_tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    ids = prompt(smol_tokenizer, "Say hello.")
    legacy = requests.post(
        f"{server.url}/generate/",
        timeout=120,
        json={
            "prompts": [ids],
            "images": None,
            "n": 2,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "max_tokens": 8,
            "logprobs": 0,
            "structured_outputs_regex": None,
            "generation_kwargs": {"seed": 3},
        },
    ).json()
    assert legacy["prompt_ids"] == [ids] and len(legacy["completion_ids"]) == 2
    assert [len(x) for x in legacy["logprobs"]] == [len(c) for c in legacy["completion_ids"]]

    weight = load_file(str(next(smol_folder.glob("*.safetensors"))))[WEIGHT]
    before, version = greedy(server, ids), service.policy_version
    port = free_port()
    with ThreadPoolExecutor(1) as pool:
        # The server hosts the store (is_master) and blocks until this side joins.
        joined = pool.submit(
            requests.post,
            f"{server.url}/init_communicator/",
            timeout=60,
            json={"host": "127.0.0.1", "port": port, "world_size": 2, "client_device_uuid": "cpu"},
        )
        group = None
        for _ in range(100):
            try:
                group = _legacy_group(port)
                break
            except Exception:  # the server's store may not be listening yet
                time.sleep(0.1)
        assert joined.result().status_code == 200 and group is not None
        for tensor in (weight * -3.0, weight):
            sent = pool.submit(
                requests.post,
                f"{server.url}/update_named_param/",
                timeout=60,
                json={"name": WEIGHT, "dtype": "torch.float32", "shape": list(tensor.shape)},
            )
            broadcast(group, tensor.contiguous(), 1)
            assert sent.result().status_code == 200
            assert requests.post(f"{server.url}/reset_prefix_cache/", timeout=60).status_code == 200
            out = greedy(server, ids)
            assert (out != before) if tensor is not weight else (out == before)
    assert service.policy_version == version + 2
    assert requests.post(f"{server.url}/close_communicator/", timeout=10).status_code == 200


LEGACY_TRL = os.environ.get("SPECROLLOUT_TRL_LEGACY")  # a folder holding trl 1.10 (.ci/run unpacks it there)


@pytest.mark.slow
@pytest.mark.skipif(not LEGACY_TRL, reason="set SPECROLLOUT_TRL_LEGACY to a folder with trl 1.10 (.ci/run does)")
def test_trl_1_10_client_on_the_legacy_routes(server, smol_tokenizer):
    ids = prompt(smol_tokenizer, "Name a fruit.")
    script = f"""
import json, trl.generation.vllm_client as v
assert v.__file__.startswith({LEGACY_TRL!r}), v.__file__
v.is_vllm_available = lambda *a, **k: True   # vLLM cannot be installed beside CPU torch here
client = v.VLLMClient(base_url={server.url!r}, connection_timeout=10)
out = client.generate([{ids!r}], n=2, temperature=1.0, max_tokens=6, logprobs=0, generation_kwargs={{"seed": 1}})
client.reset_prefix_cache()
print(json.dumps(out))
"""
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=LEGACY_TRL),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["prompt_ids"] == [ids] and len(out["completion_ids"]) == 2
    assert all(len(lp) == len(c) for lp, c in zip(out["logprobs"], out["completion_ids"]))


# ------------------------------------------------------------------------------------ chat completions, top-N logprobs
# The openai client against a tiny random model over SmolLM2's vocabulary: the real tokenizer and chat template, at
# a fraction of a second per request.

CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
IMAGE = {"type": "image_url", "image_url": {"url": "http://127.0.0.1/a.png"}}


@pytest.fixture(scope="module")
def tiny_text_folder(tmp_path_factory, smol_tokenizer):
    return build_tiny(tmp_path_factory, "llama", vocab_size=len(smol_tokenizer))


@pytest.fixture(scope="module")
def tiny_server(tiny_text_folder, smol_tokenizer):
    overrides = [f"engine.model={tiny_text_folder}", "engine.max_model_len=256", "engine.tune_matmul=false"]
    service = LocalService(load_config(None, [*overrides, "speculation.budget=fixed:4"]))
    core = CompletionServer(service, smol_tokenizer, ServerConfig(port=free_port()), model_name="tiny")
    with BackgroundServer(core) as running:
        yield running


@pytest.fixture(scope="module")
def openai_client(tiny_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_tiny_text(tiny_text_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_text_folder, dtype=torch.float32).eval()


def test_chat_n_samples_are_seeded_with_the_templates_prompt_ids(openai_client, smol_tokenizer):
    def ask(seed: int):
        return openai_client.chat.completions.create(
            model="tiny",
            messages=CONVERSATION,
            n=3,
            seed=seed,
            temperature=1.0,
            max_completion_tokens=8,
            extra_body={"return_token_ids": True},
        )

    first, again, other = ask(7), ask(7), ask(8)
    prompt = chat_ids(smol_tokenizer, CONVERSATION, add_generation_prompt=True)
    assert first.prompt_token_ids == prompt
    completions = [c.token_ids for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert completions == [c.token_ids for c in again.choices], "a seeded request is reproducible"
    assert completions != [c.token_ids for c in other.choices] and len({tuple(c) for c in completions}) == 3
    for choice in first.choices:
        assert choice.message.role == "assistant" and choice.logprobs is None  # not asked for
        assert choice.message.content == smol_tokenizer.decode(choice.token_ids, skip_special_tokens=True)
        assert 1 <= len(choice.token_ids) <= 8 and choice.finish_reason in ("stop", "length")
    usage = first.usage
    assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == sum(map(len, completions))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_top_logprobs_are_the_processed_distributions(openai_client, hf_tiny_text):
    response = openai_client.chat.completions.create(
        model="tiny",
        messages=CONVERSATION,
        n=2,
        seed=3,
        temperature=0.7,
        top_p=0.9,
        max_completion_tokens=6,
        logprobs=True,
        top_logprobs=4,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
    )
    params = SamplingParams(temperature=0.7, top_p=0.9)
    for choice in response.choices:
        tokens, content = choice.token_ids, choice.logprobs.content
        assert [entry.token for entry in content] == [f"token_id:{t}" for t in tokens]
        reference = reference_distributions(hf_tiny_text, response.prompt_token_ids, tokens, params)
        for token, entry, row in zip(tokens, content, reference):
            assert entry.bytes == list(entry.token.encode())
            assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
            values = [top.logprob for top in entry.top_logprobs]
            ids = [int(top.token.removeprefix("token_id:")) for top in entry.top_logprobs]
            assert len(values) == 4 and values == sorted(values, reverse=True)
            assert values == pytest.approx(row.topk(4).values.tolist(), abs=1e-4)
            assert values == pytest.approx(row[ids].tolist(), abs=1e-4)  # the ids too, whatever order near-ties took
            if token in ids:
                assert values[ids.index(token)] == entry.logprob, "the sampled token's row, the same number"


def test_completions_logprobs_n(openai_client, smol_tokenizer):
    prompt = chat_prompt_ids(smol_tokenizer, "Count to three.")
    response = openai_client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=5,
        seed=1,
        logprobs=3,
        extra_body={"top_k": 2, "return_token_ids": True, "return_tokens_as_token_ids": True},
    )
    choice = response.choices[0]
    names = [f"token_id:{t}" for t in choice.token_ids]
    assert choice.prompt_token_ids == prompt and choice.logprobs.tokens == names
    assert choice.text == smol_tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    for name, logprob, top in zip(names, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        # vLLM's layout: the sampled token first, then the top 3. Under top_k=2 the sampled token is one of the two
        # that carry all the mass, and the third likeliest is impossible: JSON has no -inf, so vLLM's floor.
        assert list(top.items())[0] == (name, logprob) and len(top) == 3
        possible = [v for v in top.values() if v > LOGPROB_FLOOR]
        assert len(possible) == 2 and math.fsum(math.exp(v) for v in possible) == pytest.approx(1.0, abs=1e-5)
        assert sorted(top.values())[0] == LOGPROB_FLOOR


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": []}, "messages: at least one message is required"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role='wizard' is not supported"),
        ({"messages": [{"role": "user", "content": [IMAGE]}]}, "messages[0].content[0]: content type 'image_url' is"),
        ({"logprobs": True, "top_logprobs": 21}, "logprobs=21 is not supported: at most 20"),
        ({"top_logprobs": 2}, "top_logprobs=2 needs logprobs: true"),
        ({"min_p": 0.1}, "min_p=0.1 is not supported"),
        ({"stop": ["."]}, "stop=['.'] is not supported"),
        ({"stream": True}, "stream is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice=None is not supported"),
        ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs: tokenize"),
        ({"response_format": {"type": "json_object"}}, "response_format: Extra inputs are not permitted"),
    ],
)
def test_chat_refusals_are_400s_naming_the_field(tiny_server, body, message):
    full = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body}
    response = requests.post(f"{tiny_server.url}/v1/chat/completions", json=full, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_chat_takes_text_parts_and_neutral_fields(openai_client, smol_tokenizer):
    parts = [{"type": "text", "text": "Name"}, {"type": "text", "text": "a colour."}]
    response = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": parts}],
        max_tokens=4,
        frequency_penalty=0,
        presence_penalty=0,
        extra_body={"return_token_ids": True},
    )
    joined = [{"role": "user", "content": "Name\na colour."}]  # text parts joined by newlines, as vLLM does
    assert response.prompt_token_ids == chat_ids(smol_tokenizer, joined, add_generation_prompt=True)
    assert len(response.choices) == 1 and 1 <= len(response.choices[0].token_ids) <= 4


@pytest.mark.slow
def test_trl_client_chat_and_the_openai_client_on_smollm2(client, server, smol_tokenizer):
    openai = pytest.importorskip("openai")
    conversations = [[{"role": "user", "content": "Name three colours."}], [{"role": "user", "content": "Count."}]]
    out = client.chat(conversations, n=2, temperature=1.0, max_tokens=10, logprobs=2, generation_kwargs={"seed": 5})
    assert out["prompt_ids"] == [chat_prompt_ids(smol_tokenizer, c[0]["content"]) for c in conversations]
    assert len(out["completion_ids"]) == 4
    for completion, lps, lp_ids in zip(out["completion_ids"], out["logprobs"], out["logprob_token_ids"]):
        assert len(lps) == len(lp_ids) == len(completion) >= 1
        for token, values, ids in zip(completion, lps, lp_ids):
            # TRL merges the sampled token into the top 2 and sorts: 2 entries, or 3 when it lies outside them.
            assert token in ids and len(ids) in (2, 3) and values == sorted(values, reverse=True)
    chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    greedy_chat = chat.chat.completions.create(
        model="smollm2-135m",
        messages=conversations[0],
        temperature=0,
        max_tokens=10,
        extra_body={"return_token_ids": True},
    ).choices[0]
    assert greedy_chat.token_ids == greedy(server, out["prompt_ids"][0], max_tokens=10), "the two routes agree"
    assert greedy_chat.message.content == smol_tokenizer.decode(greedy_chat.token_ids, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_answers_beside_a_long_request_and_drops_it_when_its_client_leaves(server, service, smol_tokenizer):
    """On the real model with the suffix drafter: a short greedy request is answered while a long group generates;
    the group's client disconnects and the engine stops it, keeping none of its rollouts."""
    from test_server_limits import Held, wait_for

    long_prompt = prompt(smol_tokenizer, "Write a very long story about the sea.")
    engine = service.engine
    room = service.max_model_len - len(long_prompt)  # the whole context: ~10 s for the group here
    long = Held(server.url, {"prompt": long_prompt, "n": 4, "max_tokens": room, "ignore_eos": True, "seed": 1})
    try:
        wait_for(lambda: engine.num_unfinished() == 4, 60, "the long group is generating")
        short = greedy(server, prompt(smol_tokenizer, "Hi"), max_tokens=4)
        assert len(short) >= 1
        assert engine.num_unfinished() == 4, "answered while the long group still runs"
    finally:
        long.close()
    wait_for(lambda: engine.num_unfinished() == 0, 30, "the engine drops the group of a client that left")
    forwards = engine.total_forwards
    time.sleep(0.5)
    assert engine.total_forwards == forwards
    rollouts = service.rollouts().table().column("prompt_ids").to_pylist()
    assert long_prompt not in rollouts, "no half-done rollout of it in the history"
