"""A vLLM-compatible HTTP server in front of the rollout service, for trainers that talk to `vllm serve`.

    specrollout serve --http [--host 127.0.0.1] [--port 8000] [--config configs/default.yaml]

TRL's `VLLMClient` (vllm_mode="server") works against it unchanged:

- trl >= 1.11 uses vLLM's own API: GET /health, /v1/models, /server_info, /get_world_size; POST /v1/completions
  (token-id prompts, n, sampling fields, logprobs, return_token_ids), /reset_prefix_cache and the weight-transfer
  routes /init_weight_transfer_engine, /start_weight_update, /update_weights, /finish_weight_update.
- trl <= 1.10 used TRL's own `trl vllm-serve` routes, also served: /health/, /get_world_size/, /generate/,
  /init_communicator/, /update_named_param/, /reset_prefix_cache/, /close_communicator/.

The n completions of one prompt are one GRPO group: they go to one worker together, where the suffix drafter
drafts each from its siblings. Every completion is sampled exactly from the policy (rollout/verify.py), and its
logprobs are those of the processed distribution, the sampled token first, as vLLM returns them.

Weights travel over a torch.distributed process group in which the trainer is one extra rank, as with vLLM. On a
machine without CUDA the group is gloo (`WeightSender` below is the trainer side); TRL's own client insists on
CUDA and vLLM's packed NCCL protocol, which this server does not implement, so `backend: nccl` is refused with a
501 that says so. Bodies are JSON validated field by field (pydantic); nothing from the network is unpickled; an
option this server cannot honour (repetition_penalty != 1, min_p > 0, top-N logprobs, guided decoding) is a 400
naming it, never silently ignored. It binds 127.0.0.1 unless told otherwise.
"""

# No `from __future__ import annotations`: FastAPI reads the body models from the handlers' annotations at runtime.
import dataclasses
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.sampling_fields import translate
from adapters.weight_transfer import broadcast, gloo_group, parse_dtype
from rollout.result import RolloutResult
from rollout.sampling import SamplingParams, sample_seed
from rollout.weights import WeightStager, to_host
from rollout.worker import RolloutRequest


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless the operator opens it up
    port: int = 8000
    model_name: str | None = None  # the id /v1/models reports; default: the engine's model
    group_timeout_s: float = 300.0  # rendezvous and broadcast timeout of the weight group


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # Unknown fields are errors: a sampling option we do not know is one we would otherwise silently ignore.
    model_config = ConfigDict(extra="forbid", strict=False)


class SamplingFields(_Body):
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM: -1 and 0 both mean "off"
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)  # stop tokens masked below it, as in vLLM
    logprobs: int | None = Field(0, ge=0)
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False


class CompletionBody(SamplingFields):
    model: str | None = None
    prompt: list[int] | list[list[int]] | str | list[str]
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    stream: bool = False
    echo: bool = False
    user: str | None = None


class LegacyGenerateBody(SamplingFields):
    prompts: list[list[int]] | list[str]
    images: list | None = None
    structured_outputs_regex: str | None = None
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)


class InitInfo(_Body):
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(1, ge=0)
    world_size: int = Field(ge=2)
    backend: Literal["gloo", "nccl"] | None = None
    packed: bool | None = None


class InitBody(_Body):
    init_info: InitInfo


class UpdateInfo(_Body):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    packed: bool | None = None


class UpdateBody(_Body):
    update_info: UpdateInfo


class LegacyInitBody(_Body):
    host: str
    port: int = Field(ge=1, le=65535)
    world_size: int = Field(ge=2)
    client_device_uuid: str | None = None


class LegacyParamBody(_Body):
    name: str
    dtype: str
    shape: list[int]


# ------------------------------------------------------------------------------------------------------------ core


def _dtype(name: str) -> torch.dtype:
    try:
        return parse_dtype(name)
    except ValueError as e:
        raise HTTPError(400, str(e)) from e


class CompletionServer:
    """The logic behind the routes, free of HTTP so that it can be tested and reused (OpenRLHF, verl)."""

    def __init__(self, service, tokenizer=None, config: ServerConfig | None = None, model_name: str = "policy"):
        self.service = service
        self.tokenizer = tokenizer
        self.config = config or ServerConfig()
        self.model_name = self.config.model_name or model_name
        # The engine runs one batch at a time, and weights may change only between rollouts: one lock orders both.
        self._lock = threading.RLock()
        self._group = None
        self._src_rank = 0  # the trainer's rank in the weight group
        # Received tensors wait here until applied as one policy version. An in-process engine checks each on
        # arrival; a RolloutCluster checks every bucket on every worker when the update is applied, before anything
        # changes.
        model = getattr(getattr(service, "engine", None), "model", None)
        self._staged = WeightStager(getattr(model, "check_weight", None))
        self._updating = False

    # -------------------------------------------------------------------- generation

    def _prompt_ids(self, prompt) -> list[list[int]]:
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not prompts:
            raise HTTPError(400, "prompt: at least one prompt is required")
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise HTTPError(400, f"prompt[{i}]: text prompts need a tokenizer; send token ids")
                p = self.tokenizer(p).input_ids
            if not p:
                raise HTTPError(400, f"prompt[{i}] is empty")
            ids.append(list(p))
        return ids

    def _sampling(self, body: SamplingFields) -> tuple[SamplingParams, int]:
        """The body's sampling fields and the request's base seed (random when unseeded)."""
        fields = body.model_dump(include=set(SamplingFields.model_fields))
        try:
            # 16 is vLLM's default (pydantic fills it in anyway). max_logprobs=0: the response's top_logprobs would
            # lack the alternatives a logprobs=N request asks for.
            params, _, _ = translate(fields, default_max_tokens=16, max_logprobs=0)
        except ValueError as e:
            raise HTTPError(400, str(e)) from e
        return params, (secrets.randbits(62) if params.seed is None else params.seed)

    def generate(self, prompts: list[list[int]], body: SamplingFields) -> list[RolloutResult]:
        """n completions per prompt, prompt-major; a prompt's completions form one group."""
        params, seed = self._sampling(body)
        call = uuid.uuid4().hex[:12]
        requests = []
        for i, ids in enumerate(prompts):
            for j in range(body.n):
                index = i * body.n + j
                seeded = dataclasses.replace(params, seed=sample_seed(seed, index))
                requests.append(RolloutRequest(f"http-{call}-{index}", ids, seeded, group=f"http-{call}-{i}"))
        with self._lock:
            self._commit_legacy()
            try:
                return self.service.generate(requests)
            except ValueError as e:  # a prompt over the max length, a bad token id, ...
                raise HTTPError(400, str(e)) from e

    def completions(self, body: CompletionBody) -> dict:
        if body.model is not None and body.model != self.model_name:
            raise HTTPError(404, f"model {body.model!r} is not served here; /v1/models lists {self.model_name!r}")
        if body.stream or body.echo:
            raise HTTPError(400, "stream and echo are not supported")
        results = self.generate(self._prompt_ids(body.prompt), body)
        choices = []
        for index, r in enumerate(results):
            tokens = [f"token_id:{t}" for t in r.token_ids] if body.return_tokens_as_token_ids else None
            if tokens is None and self.tokenizer is not None:
                tokens = [self.tokenizer.decode([t]) for t in r.token_ids]
            logprobs = None
            if body.logprobs is not None:
                tokens = tokens or [str(t) for t in r.token_ids]
                logprobs = {
                    "tokens": tokens,
                    "token_logprobs": r.logprobs,
                    "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, r.logprobs)],
                    "text_offset": [],
                }
            choice = {
                "index": index,
                "text": self.tokenizer.decode(r.token_ids) if self.tokenizer is not None else "",
                "logprobs": logprobs,
                "finish_reason": r.finish_reason,
                "stop_reason": None,
                "spec": {
                    "target_forwards": r.spec.target_forwards,
                    "drafted": r.spec.drafted,
                    "accepted": r.spec.accepted,
                },
            }
            if body.return_token_ids:
                choice |= {"prompt_token_ids": r.prompt_token_ids, "token_ids": r.token_ids}
            choices.append(choice)
        prompt_tokens = sum(len(r.prompt_token_ids) for r in results[:: body.n])
        completion_tokens = sum(len(r.token_ids) for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def legacy_generate(self, body: LegacyGenerateBody) -> dict:
        if body.images:
            raise HTTPError(400, "images are not supported")
        if body.structured_outputs_regex is not None:
            raise HTTPError(400, "structured_outputs_regex (guided decoding) is not supported")
        try:
            merged = SamplingFields(
                **{**body.model_dump(include=set(SamplingFields.model_fields)), **body.generation_kwargs}
            )
        except ValidationError as e:
            raise HTTPError(400, f"generation_kwargs: {_describe(e)}") from e
        prompts = self._prompt_ids(body.prompts)
        results = self.generate(prompts, merged)
        return {
            "prompt_ids": prompts,
            "completion_ids": [r.token_ids for r in results],
            "logprobs": [[[lp] for lp in r.logprobs] for r in results],
            "logprob_token_ids": [[[t] for t in r.token_ids] for r in results],
        }

    # -------------------------------------------------------------------- information

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "owned_by": "specrollout", "root": self.model_name}],
        }

    def server_info(self) -> dict:
        return {
            "vllm_config": {
                "model_config": {"model": self.model_name},
                "parallel_config": {"tensor_parallel_size": 1, "data_parallel_size": 1},
                "weight_transfer_config": {"backend": "gloo" if not torch.cuda.is_available() else "nccl"},
            },
            "policy_version": self.service.policy_version,
        }

    # -------------------------------------------------------------------- weights

    def init_weight_transfer(self, info: InitInfo) -> dict:
        backend = info.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend != "gloo":
            raise HTTPError(
                501,
                "NCCL weight transfer (vLLM's packed protocol) is not implemented by this server; "
                "use init_info.backend='gloo' (adapters.vllm_server.WeightSender)",
            )
        if not 0 < info.rank_offset < info.world_size or info.world_size - info.rank_offset != 1:
            raise HTTPError(
                400,
                f"this server is one rank: world_size - rank_offset must be 1, got world_size="
                f"{info.world_size}, rank_offset={info.rank_offset}",
            )
        self._open_group(info.master_address, info.master_port, info.rank_offset, info.world_size, False, src=0)
        return {}

    def legacy_init_communicator(self, body: LegacyInitBody) -> dict:
        # trl <= 1.10: the server's workers are ranks 0.., the client the last rank, the store on the server.
        if body.world_size != 2:
            raise HTTPError(400, f"this server is one rank: world_size must be 2, got {body.world_size}")
        self._open_group(body.host, body.port, 0, body.world_size, True, src=body.world_size - 1)
        return {}

    def _open_group(self, address, port, rank, world_size, is_master, src) -> None:
        self.close_group()
        try:
            self._group = gloo_group(address, port, rank, world_size, is_master, self.config.group_timeout_s)
        except Exception as e:  # rendezvous failure: nothing is half-open
            raise HTTPError(400, f"could not join the weight group at {address}:{port}: {e}") from e
        self._src_rank = src

    def close_group(self) -> dict:
        self._group = None
        return {}

    def _receive(self, name: str, dtype_name: str, shape: list[int]) -> torch.Tensor:
        if self._group is None:
            raise HTTPError(409, "no weight group: call /init_weight_transfer_engine (or /init_communicator/) first")
        dtype = _dtype(dtype_name)
        if any(d < 0 for d in shape):
            raise HTTPError(400, f"{name}: negative dimension in shape {shape}")
        buffer = torch.empty(shape, dtype=dtype)
        try:
            broadcast(self._group, buffer, self._src_rank)
        except Exception as e:  # a peer gone or out of step: the group cannot be trusted any more
            self.close_group()
            raise HTTPError(500, f"{name}: weight broadcast failed ({e}); the weight group was closed") from e
        return buffer

    def start_weight_update(self) -> dict:
        self._staged.discard()
        self._updating = True
        return {}

    def _stage(self, received: list[tuple[str, torch.Tensor]]) -> None:
        """Keep received tensors for the next apply; a bad one is a 400 and drops the update staged so far."""
        try:
            self._staged.stage(received)
        except (ValueError, TypeError) as e:  # wrong names, shapes or dtypes: checked before anything is written
            raise HTTPError(400, str(e)) from e

    def update_weights(self, info: UpdateInfo) -> dict:
        if not len(info.names) == len(info.dtype_names) == len(info.shapes):
            raise HTTPError(400, "update_info: names, dtype_names and shapes must have the same length")
        for dtype_name in info.dtype_names:  # before receiving anything: an unknown dtype has no size to receive
            _dtype(dtype_name)
        received = [(n, self._receive(n, d, s)) for n, d, s in zip(info.names, info.dtype_names, info.shapes)]
        self._stage(received)  # after receiving all of them: the group stays in step
        if not self._updating:  # a single update outside start/finish applies at once
            return self.finish_weight_update()
        return {}

    def finish_weight_update(self) -> dict:
        self._updating = False
        return {"policy_version": self._apply(self._staged.commit())}

    def legacy_update_named_param(self, body: LegacyParamBody) -> dict:
        # Applied lazily (before the next generation or reset): one policy version per sync, not per tensor.
        self._stage([(body.name, self._receive(body.name, body.dtype, body.shape))])
        return {}

    def _commit_legacy(self) -> None:
        if len(self._staged) and not self._updating:
            self._apply(self._staged.commit())

    def _apply(self, staged: list[tuple[str, torch.Tensor]]) -> int:
        with self._lock:
            if not staged:
                return self.service.policy_version
            try:
                return self.service.update_weights([(n, t.float()) for n, t in staged])
            except (ValueError, TypeError) as e:  # wrong names or shapes: checked before anything is written
                raise HTTPError(400, str(e)) from e

    def reset_prefix_cache(self) -> dict:
        # No cross-request prefix cache to drop; pending legacy weights are applied here, as TRL resets after a sync.
        with self._lock:
            self._commit_legacy()
        return {"success": True}


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())


# ------------------------------------------------------------------------------------------------------------ HTTP


def build_app(server: CompletionServer):
    """The FastAPI app; every body is validated against the models above."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = FastAPI(title="specrollout", docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return error(400, f"invalid request: {details}")

    def route(method: str, path: str, handler, body_model=None):
        # Handlers block (generation, collective receives): they run in the thread pool, not on the event loop.
        if body_model is None:

            async def endpoint():
                return await run_in_threadpool(handler)
        else:

            async def endpoint(body: body_model):  # type: ignore[valid-type]
                return await run_in_threadpool(handler, body)

        app.add_api_route(path, endpoint, methods=[method])

    ok = lambda: {}  # noqa: E731
    world = lambda: {"world_size": 1}  # noqa: E731
    # vLLM's API (trl >= 1.11)
    route("GET", "/health", ok)
    route("GET", "/v1/models", server.models)
    route("GET", "/server_info", server.server_info)
    route("GET", "/get_world_size", world)
    route("POST", "/v1/completions", server.completions, CompletionBody)
    route("POST", "/reset_prefix_cache", server.reset_prefix_cache)
    route("POST", "/init_weight_transfer_engine", lambda b: server.init_weight_transfer(b.init_info), InitBody)
    route("POST", "/start_weight_update", server.start_weight_update)
    route("POST", "/update_weights", lambda b: server.update_weights(b.update_info), UpdateBody)
    route("POST", "/finish_weight_update", server.finish_weight_update)
    # trl <= 1.10 (`trl vllm-serve`)
    route("GET", "/health/", ok)
    route("GET", "/get_world_size/", world)
    route("POST", "/generate/", server.legacy_generate, LegacyGenerateBody)
    route("POST", "/init_communicator/", server.legacy_init_communicator, LegacyInitBody)
    route("POST", "/update_named_param/", server.legacy_update_named_param, LegacyParamBody)
    route("POST", "/reset_prefix_cache/", server.reset_prefix_cache)
    route("POST", "/close_communicator/", server.close_group)
    return app


class BackgroundServer:
    """Run the app with uvicorn in a thread of this process (tests, notebooks); `serve()` blocks instead."""

    def __init__(self, server: CompletionServer):
        import uvicorn

        cfg = server.config
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(build_app(server), host=cfg.host, port=cfg.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.url = f"http://{cfg.host}:{cfg.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


def serve(server: CompletionServer) -> None:
    import uvicorn

    uvicorn.run(build_app(server), host=server.config.host, port=server.config.port, log_level="info")


# ------------------------------------------------------------------------------------------------- trainer side


class WeightSender:
    """The trainer's end of the CPU weight path: joins the server's gloo group as rank 0 and pushes tensors.

    with WeightSender("http://127.0.0.1:8000", port=51216) as sender:
        sender.send(model.named_parameters())       # one policy version per call
    """

    def __init__(self, base_url: str, port: int = 51216, address: str = "127.0.0.1", timeout_s: float = 300.0):
        import requests

        self.base_url, self.session = base_url.rstrip("/"), requests.Session()
        self.port, self.address, self.timeout_s = port, address, timeout_s
        self.group = None

    def _post(self, path: str, body: dict | None = None) -> dict:
        response = self.session.post(f"{self.base_url}{path}", json=body or {}, timeout=self.timeout_s)
        if response.status_code != 200:
            raise RuntimeError(f"{path}: {response.status_code} {response.text}")
        return response.json()

    def _concurrently(self, path: str, body: dict, collective) -> dict:
        """The server blocks in the collective while it answers, so post and take part at the same time."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._post, path, body)
            collective()
            return future.result()

    def __enter__(self) -> "WeightSender":
        info = {
            "master_address": self.address,
            "master_port": self.port,
            "rank_offset": 1,
            "world_size": 2,
            "backend": "gloo",
        }

        def join():
            self.group = gloo_group(self.address, self.port, 0, 2, True, self.timeout_s)

        self._concurrently("/init_weight_transfer_engine", {"init_info": info}, join)
        return self

    def send(self, named_tensors) -> int:
        named = [(n, to_host(t)) for n, t in named_tensors]
        info = {
            "names": [n for n, _ in named],
            "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": [list(t.shape) for _, t in named],
        }
        self._post("/start_weight_update")

        def push():
            for _, tensor in named:
                broadcast(self.group, tensor, 0)

        self._concurrently("/update_weights", {"update_info": info}, push)
        return int(self._post("/finish_weight_update")["policy_version"])

    def __exit__(self, *exc) -> None:
        self.group = None
        self._post("/close_communicator/")  # the server drops its end too
