"""The HTTP server holds under load and abuse, over real HTTP on loopback, in-process and on real Ray: an API key on
every route but /health, per-request limits (400), a bound on queued work (429), a normal request answered beside a
long one, and a client that disconnects stops its generation (nothing of it in the history).

The model is a tiny random Llama with a 16k context, token-id prompts only: 2 x 16000 tokens take ~20 s on 2 cores,
so a "long" request is one that would still be running long after each test's checks are done.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.parse
from dataclasses import dataclass

import pytest
import torch

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import tiny_config  # noqa: E402

from adapters.vllm_server import (
    WEIGHT_ROUTES,
    BackgroundServer,
    CompletionServer,
    ServerConfig,
    WeightSender,
    build_app,
    open_bind_warning,
)
from rollout.config import load_config
from rollout.service import LocalService

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_LEN = 16384
MAX_N, MAX_QUEUED = 8, 16
WEIGHT = "model.layers.0.mlp.down_proj.weight"
LONG = {"max_tokens": MAX_LEN - 16, "ignore_eos": True, "temperature": 1.0}  # ~20 s for two sequences


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_long_context_tiny(folder) -> None:
    import transformers

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_config(max_len=MAX_LEN), dtype=torch.float32).save_pretrained(
        folder
    )


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-long")
    build_long_context_tiny(folder)
    return folder


@dataclass
class Served:
    url: str
    core: CompletionServer
    service: object
    on_ray: bool

    # What the engine(s) behind the server are doing, read the same way in-process and on Ray.
    def unfinished(self) -> int:
        if self.on_ray:
            return sum(s["unfinished"] for s in self.service.stats())
        return self.service.engine.num_unfinished()

    def forwards(self) -> int:
        if self.on_ray:
            return sum(s["target_forwards"] for s in self.service.stats())
        return self.service.engine.total_forwards

    def history_prompts(self) -> list[list[int]]:
        return self.service.rollouts().table().column("prompt_ids").to_pylist()

    def post(self, path: str, body: dict, headers: dict | None = AUTH, timeout: float = 60) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, headers=headers, timeout=timeout)


@pytest.fixture(scope="module", params=["local", "ray"])
def served(request, long_folder):
    overrides = [
        f"engine.model={long_folder}",
        f"engine.max_model_len={MAX_LEN}",
        "engine.max_num_seqs=16",
        "engine.tune_matmul=false",
        "speculation.drafter=none",  # one token per step: a long request's length is its number of steps
    ]
    on_ray = request.param == "ray"
    if on_ray:
        request.getfixturevalue("ray_local")
        from rollout.cluster import RolloutCluster

        service = RolloutCluster(load_config(None, overrides + ["cluster.num_cpus_per_worker=1"]))
    else:
        service = LocalService(load_config(None, overrides))
    config = ServerConfig(port=free_port(), api_key=KEY, max_n=MAX_N, max_queued_seqs=MAX_QUEUED, disconnect_poll_s=0.1)
    core = CompletionServer(service, None, config, model_name="tiny")
    try:
        with BackgroundServer(core) as running:
            yield Served(running.url, core, service, on_ray)
    finally:
        if on_ray:
            service.shutdown()


class Held:
    """A generation request sent over its own connection and not waited for; `close()` is a client that leaves."""

    def __init__(self, url: str, body: dict, path: str = "/v1/completions"):
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **AUTH})

    def close(self) -> None:
        self.conn.close()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"not within {timeout} s: {what}")


def settle(served: Served) -> None:
    """Each test starts and ends with nothing in flight and nothing admitted."""
    wait_for(lambda: served.unfinished() == 0, 30, "the engine is idle")
    wait_for(lambda: served.core._admission.queued == 0, 30, "no sequence is admitted")


# ------------------------------------------------------------------------------------------------------ the API key


def test_every_route_but_health_needs_the_key_and_a_refused_call_changes_nothing(served):
    settle(served)
    forwards, version = served.forwards(), served.service.policy_version
    for path in ("/health", "/health/"):
        assert requests.get(f"{served.url}{path}", timeout=10).status_code == 200
    update = {"update_info": {"names": [WEIGHT], "dtype_names": ["float32"], "shapes": [[64, 128]]}}
    calls = [
        ("GET", "/v1/models", None),
        ("GET", "/server_info", None),
        ("POST", "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4}),
        ("POST", "/generate/", {"prompts": [[1, 2, 3]], "max_tokens": 4}),
        ("POST", "/start_weight_update", None),
        ("POST", "/update_weights", update),
        ("POST", "/finish_weight_update", None),
        ("POST", "/init_weight_transfer_engine", {"init_info": {"master_address": "127.0.0.1", "master_port": 1}}),
        ("POST", "/update_named_param/", {"name": WEIGHT, "dtype": "float32", "shape": [64, 128]}),
        ("POST", "/reset_prefix_cache", None),
        ("GET", "/no-such-route", None),
    ]
    refusals = [None, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}]
    for method, path, body in calls:
        for headers in refusals:
            response = requests.request(method, f"{served.url}{path}", json=body, headers=headers, timeout=10)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert "API key" in response.json()["error"]["message"]
            assert response.headers["WWW-Authenticate"] == "Bearer"
    # Nothing ran: no step, no weight update started or staged, the same policy version.
    assert served.forwards() == forwards and served.service.policy_version == version
    assert not served.core._updating and len(served.core._staged) == 0 and served.core._group is None
    # The key opens them.
    assert requests.get(f"{served.url}/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"] == "tiny"
    short = {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True, "return_token_ids": True}
    answer = served.post("/v1/completions", short)
    assert answer.status_code == 200 and len(answer.json()["choices"][0]["token_ids"]) == 4


def test_weights_are_pushed_only_with_the_key(served, long_folder):
    from safetensors.torch import load_file

    settle(served)
    original = load_file(str(next(long_folder.glob("*.safetensors"))))[WEIGHT]
    version = served.service.policy_version
    # (Joining the weight group first would wait for the server's rank until a timeout: the routes are asked alone.)
    wrong = WeightSender(served.url, port=free_port(), api_key="wrong", timeout_s=30)
    for path in ("/start_weight_update", "/finish_weight_update"):
        with pytest.raises(RuntimeError, match=f"{path}: 401"):
            wrong._post(path)
    assert served.service.policy_version == version and not served.core._updating
    with WeightSender(served.url, port=free_port(), api_key=KEY, timeout_s=60) as sender:
        assert sender.send([(WEIGHT, original)]) == version + 1  # the same tensor: a new version, the same model


def test_trls_client_with_the_key_in_its_session_as_the_docs_say(served, monkeypatch):
    vllm_client = pytest.importorskip("trl.generation.vllm_client")
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)  # vLLM cannot sit beside CPU torch

    class KeyedClient(vllm_client.VLLMClient):
        def check_server(self, *args, **kwargs):  # runs before the constructor's first keyed request
            self.session.headers["Authorization"] = f"Bearer {KEY}"
            return super().check_server(*args, **kwargs)

    with pytest.raises(Exception, match="401"):
        vllm_client.VLLMClient(base_url=served.url, connection_timeout=10)
    client = KeyedClient(base_url=served.url, connection_timeout=10)
    out = client.generate([[1, 2, 3]], n=2, max_tokens=4, logprobs=0, generation_kwargs={"seed": 0})
    assert len(out["completion_ids"]) == 2 and all(len(c) == 4 for c in out["completion_ids"])


def test_binding_beyond_loopback_without_a_key_warns_naming_the_weight_routes(caplog):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert open_bind_warning(ServerConfig(host=host)) is None
    assert open_bind_warning(ServerConfig(host="0.0.0.0", api_key=KEY)) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "rollouts.example.org"):
        warning = open_bind_warning(ServerConfig(host=host))
        assert warning is not None and host in warning and "--api-key" in warning
        assert all(route in warning for route in WEIGHT_ROUTES)
    assert "/update_weights" in WEIGHT_ROUTES and "/update_named_param/" in WEIGHT_ROUTES
    with caplog.at_level(logging.WARNING, logger="adapters.vllm_server"):
        build_app(CompletionServer(object(), config=ServerConfig(host="0.0.0.0")))
    assert any("/init_weight_transfer_engine" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/completions", {"prompt": [1, 2], "n": 100000}, f"n=100000 is over this server's limit of {MAX_N}"),
        ("/generate/", {"prompts": [[1, 2]], "n": 100000}, f"n=100000 is over this server's limit of {MAX_N}"),
        (
            "/generate/",
            {"prompts": [[1, 2]], "generation_kwargs": {"n": 9}},
            f"n=9 is over this server's limit of {MAX_N}",
        ),
        (
            "/v1/completions",
            {"prompt": [[1, 2]] * 3, "n": MAX_N},
            f"asks for 24 completions (3 prompts x n=8); this server queues at most {MAX_QUEUED} (max_queued_seqs)",
        ),
        (
            "/v1/completions",
            {"prompt": list(range(10)), "max_tokens": MAX_LEN},
            f"max_tokens={MAX_LEN} is more than the context leaves: prompt[0] has 10 tokens and max_model_len is "
            f"{MAX_LEN}, so max_tokens can be at most {MAX_LEN - 10}",
        ),
    ],
)
def test_an_oversized_request_is_refused_at_once_naming_the_limit(served, path, body, message):
    settle(served)
    forwards = served.forwards()
    started = time.monotonic()
    response = served.post(path, body, timeout=30)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert time.monotonic() - started < 10, "refused before any work"
    assert served.forwards() == forwards and served.unfinished() == 0
    assert served.core._admission.queued == 0


def test_beyond_the_queue_bound_a_429_and_a_normal_request_is_answered_beside_a_long_one(served):
    settle(served)
    long = Held(served.url, {"prompt": [[5, 6, 7], [8, 9]], "n": 6, **LONG})  # 12 of the 16 sequences
    try:
        wait_for(lambda: served.unfinished() == 12, 60, "the long request is generating")
        over = served.post("/v1/completions", {"prompt": [1, 2], "n": 5, "max_tokens": 4})
        assert over.status_code == 429, over.text
        assert "12 of at most 16 sequences" in over.json()["error"]["message"] and over.headers["Retry-After"]
        started = time.monotonic()
        short = {"prompt": [1, 2], "n": 4, "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}
        beside = served.post("/v1/completions", short)
        assert beside.status_code == 200, beside.text
        assert [len(c["token_ids"]) for c in beside.json()["choices"]] == [8] * 4
        assert served.unfinished() == 12, "answered while the long request still runs, not after it"
        assert time.monotonic() - started < 30
    finally:
        long.close()
    settle(served)  # the long request was aborted with its client, and its sequences released
    again = served.post("/v1/completions", {"prompt": [1, 2], "n": 5, "max_tokens": 4})
    assert again.status_code == 200, again.text


def test_a_disconnected_clients_request_stops_consuming_steps(served):
    settle(served)
    prompt = [11, 12, 13, 14, 15]  # no other test uses it: its rollouts would be this request's
    before = served.forwards()
    long = Held(served.url, {"prompt": prompt, "n": 2, **LONG})
    wait_for(lambda: served.unfinished() == 2, 60, "the long request is generating")
    wait_for(lambda: served.forwards() > before + 20, 60, "the long request takes steps")
    long.close()
    wait_for(lambda: served.unfinished() == 0, 10, "the engine drops the request of a client that left")
    stopped = served.forwards()
    time.sleep(0.5)
    assert served.forwards() == stopped, "no step runs for it any more"
    assert stopped - before < LONG["max_tokens"] // 2, "cut short, not run to its end"
    settle(served)
    assert prompt not in served.history_prompts(), "the half-done rollouts are not in the history"
