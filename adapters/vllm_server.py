"""A vLLM-compatible HTTP server in front of the rollout service, for trainers that talk to `vllm serve`.

    specrollout serve --http [--host 127.0.0.1] [--port 8000] [--config configs/default.yaml]

TRL's `VLLMClient` (vllm_mode="server") works against it unchanged:

- trl >= 1.11 uses vLLM's own API: GET /health, /v1/models, /server_info, /get_world_size; POST /v1/completions
  (token-id prompts, n, sampling fields, logprobs, return_token_ids), /v1/chat/completions (VLLMClient.chat),
  /reset_prefix_cache and the weight-transfer routes /init_weight_transfer_engine, /start_weight_update,
  /update_weights, /finish_weight_update.
- trl <= 1.10 used TRL's own `trl vllm-serve` routes, also served: /health/, /get_world_size/, /generate/,
  /init_communicator/, /update_named_param/, /reset_prefix_cache/, /close_communicator/.

Agentic RL loops talk to /v1/chat/completions as to `vllm serve`: the messages are rendered with the model's chat
template, and `return_token_ids` returns the prompt's and each completion's token ids, so a trainer trains on
exactly what was sampled.

The n completions of one prompt (or one conversation) are one GRPO group: they go to one worker together, where
the suffix drafter drafts each from its siblings. Every completion is sampled exactly from the policy
(rollout/verify.py), and its logprobs are those of the processed distribution, the sampled token first, as vLLM
returns them; top-N logprobs (`logprobs: N` on completions, `top_logprobs: N` on chat, N <= 20) are the N likeliest
tokens of that same distribution, computed only for a request that asks.

Weights travel over a torch.distributed process group in which the trainer is one extra rank, as with vLLM. On a
machine without CUDA the group is gloo (`WeightSender` below is the trainer side); TRL's own client insists on
CUDA and vLLM's packed NCCL protocol, which this server does not implement, so `backend: nccl` is refused with a
501 that says so. Bodies are JSON validated field by field (pydantic); nothing from the network is unpickled; an
option this server cannot honour (repetition_penalty != 1, min_p > 0, guided decoding, images, tool-call parsing) is
a 400 naming it, never silently ignored. It binds 127.0.0.1 unless told otherwise.
"""

# No `from __future__ import annotations`: FastAPI reads the body models from the handlers' annotations at runtime.
import asyncio
import dataclasses
import functools
import inspect
import ipaddress
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.sampling_fields import translate
from adapters.server_runtime import Admission, Call, QueueFull, WeightGate, runner_for
from adapters.weight_transfer import broadcast, gloo_group, parse_dtype
from rollout.result import RolloutResult
from rollout.sampling import SamplingParams, sample_seed
from rollout.tasks import chat_ids
from rollout.weights import WeightStager, to_host
from rollout.worker import RolloutRequest

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless the operator opens it up
    port: int = 8000
    model_name: str | None = None  # the id /v1/models reports; default: the engine's model
    group_timeout_s: float = 300.0  # rendezvous and broadcast timeout of the weight group
    # Every route but /health needs `Authorization: Bearer <api_key>` when set (`vllm serve --api-key`).
    api_key: str | None = None
    # Per request: at most max_n completions per prompt (a 400 beyond). vLLM has no such bound; GRPO groups are
    # rarely above 64, and one request of n=100000 would hold the engine for hours.
    max_n: int = 64
    # Across requests: at most this many completions queued or running; a request that would go beyond gets a 429
    # (one that could never fit, a 400). Room for a large GRPO batch in one request (e.g. 256 prompts x 16).
    max_queued_seqs: int = 4096
    # On shutdown (SIGTERM, SIGINT): requests in flight get this long to finish, then are aborted.
    shutdown_grace_s: float = 5.0
    # How often a generating request checks whether its client is still connected (and aborts when not).
    disconnect_poll_s: float = 0.25

    def __post_init__(self):
        for name in ("max_n", "max_queued_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ---------------------------------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # Unknown fields are errors: a sampling option we do not know is one we would otherwise silently ignore.
    model_config = ConfigDict(extra="forbid", strict=False)


class _CommonSampling(_Body):
    """The sampling fields /v1/completions and /v1/chat/completions spell alike."""

    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM: -1 and 0 both mean "off"
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)  # stop tokens masked below it, as in vLLM
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    # Accepted at their neutral values only (clients send frequency_penalty=0, stop=[]); the shared table refuses
    # any other, naming it.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None


class SamplingFields(_CommonSampling):
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(0, ge=0)  # N: the sampled token's logprob and the N likeliest tokens'

    def sampling_fields(self) -> dict:
        """vLLM's sampling fields, for the translation every adapter shares (adapters/sampling_fields.py)."""
        return self.model_dump(include=set(SamplingFields.model_fields))


class CompletionBody(SamplingFields):
    model: str | None = None
    prompt: list[int] | list[list[int]] | str | list[str]
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    stream: bool = False
    echo: bool = False
    user: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None  # a string, or OpenAI's content parts
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls, rendered by the template
    tool_call_id: str | None = None


class ChatBody(_CommonSampling):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)  # both unset: the rest of the context, as vLLM
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # template variables (Qwen3's enable_thinking, ...)
    tools: list[dict[str, Any]] | None = None  # rendered into the prompt; calls come back as text
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = False
    user: str | None = None

    def sampling_fields(self, room: int) -> dict:
        """vLLM's sampling fields of this request, mapped as vLLM's ChatCompletionRequest maps them; `room`: the
        tokens the context leaves after the prompt (the default max_tokens; a larger one is refused, as by vLLM)."""
        fields = self.model_dump(include=set(_CommonSampling.model_fields))
        fields["max_tokens"] = self.max_completion_tokens or self.max_tokens or room
        fields["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return fields


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
        # Requests generate concurrently (the engine batches them) and can be aborted; weights change only while no
        # rollout is in flight (the gate); the sequences waiting or running are bounded (admission).
        self._runner = runner_for(service)
        self._gate = WeightGate()
        self._admission = Admission(self.config.max_queued_seqs)
        self._live: set[Call] = set()  # calls generating now, for shutdown to abort
        self._live_lock = threading.Lock()
        self._closing = False
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

    def _sampling(self, fields: dict) -> tuple[SamplingParams, int, int]:
        """vLLM's sampling fields -> (params, n, the request's base seed: random when unseeded)."""
        try:
            # 16 is vLLM's default max_tokens (the bodies fill theirs in anyway). top_logprobs: the responses carry
            # the alternatives a logprobs=N request asks for, so N becomes the params' top_logprobs.
            params, n, _ = translate(fields, default_max_tokens=16, top_logprobs=True)
        except ValueError as e:
            raise HTTPError(400, str(e)) from e
        return params, n, (secrets.randbits(62) if params.seed is None else params.seed)

    # -------------------------------------------------------------------- limits, admission, aborts

    def admit(self, prompts: int, n: int) -> Call:
        """Admit a request for `prompts` x `n` completions against the limits, before anything else is done with
        it: a 400 naming the limit when it is over a per-request one, a 429 when the queue has no room now."""
        if n > self.config.max_n:
            raise HTTPError(400, f"n={n} is over this server's limit of {self.config.max_n} completions per prompt")
        count = prompts * n
        if count > self.config.max_queued_seqs:
            raise HTTPError(
                400,
                f"this request asks for {count} completions ({prompts} prompts x n={n}); this server queues at most "
                f"{self.config.max_queued_seqs} (max_queued_seqs)",
            )
        if self._closing:
            raise HTTPError(503, "the server is shutting down")
        try:
            self._admission.admit(count)
        except QueueFull as e:
            raise HTTPError(429, f"too much work queued: {e}; retry later", {"Retry-After": "1"}) from e
        return Call(sequences=count)

    def release(self, call: Call) -> None:
        self._admission.release(call.sequences)
        call.sequences = 0

    def abort(self, call: Call) -> int:
        """End a call's generation early (its client left, or the server stops); safe to repeat: a call whose
        requests have not reached the engine yet is aborted by a later repeat, or before it starts."""
        call.aborted = True
        return self._runner.abort(call.request_ids) if call.request_ids else 0

    def close(self, grace_s: float = 0.0) -> None:
        """Refuse new generations, let those in flight run for `grace_s`, then abort them and wait for them to end
        (shutdown: nothing keeps generating for a client that is gone)."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        while self._live and time.monotonic() < deadline:
            time.sleep(0.05)
        for call in list(self._live):
            self.abort(call)
        deadline = time.monotonic() + 30
        while self._live and time.monotonic() < deadline:
            time.sleep(0.05)
            for call in list(self._live):
                self.abort(call)  # requests still in transit to a worker when first aborted
        self._runner.close()

    def _check_lengths(self, prompts: list[list[int]], max_tokens: int, name: str) -> None:
        """max_tokens against the context each prompt leaves: a 400 naming both, as vLLM answers."""
        limit = self.service.max_model_len
        for i, ids in enumerate(prompts):
            room = limit - len(ids)
            if room < 1:
                raise HTTPError(
                    400, f"prompt[{i}] has {len(ids)} tokens; max_model_len is {limit}: no room to generate"
                )
            if max_tokens > room:
                raise HTTPError(
                    400,
                    f"{name}={max_tokens} is more than the context leaves: prompt[{i}] has {len(ids)} tokens and "
                    f"max_model_len is {limit}, so {name} can be at most {room}",
                )

    # -------------------------------------------------------------------- generation

    def generate(
        self, prompts: list[list[int]], fields: dict, call: Call | None = None, max_tokens_name: str = "max_tokens"
    ) -> list[RolloutResult]:
        """n completions per prompt, prompt-major; a prompt's completions form one group. `call`: admitted already
        (HTTP admits before the body reaches a thread); without one, the request is admitted here."""
        params, n, seed = self._sampling(fields)
        own = call is None
        call = self.admit(len(prompts), n) if own else call
        try:
            self._check_lengths(prompts, params.max_tokens, max_tokens_name)
            requests = []
            for i, ids in enumerate(prompts):
                for j in range(n):
                    index = i * n + j
                    seeded = dataclasses.replace(params, seed=sample_seed(seed, index))
                    requests.append(RolloutRequest(f"http-{call.id}-{index}", ids, seeded, group=f"http-{call.id}-{i}"))
            self._commit_legacy()
            with self._gate.shared():
                results = self._run(call, requests)
        finally:
            if own:
                self.release(call)
        if call.aborted:  # partial rollouts are never answered: the client is gone or the server is stopping
            raise HTTPError(499, "the request was aborted before it finished")
        return results

    def _run(self, call: Call, requests: list[RolloutRequest]) -> list[RolloutResult]:
        if call.aborted or self._closing:
            raise HTTPError(503 if self._closing else 499, "the request was aborted before it started")
        call.request_ids = [r.request_id for r in requests]
        with self._live_lock:
            self._live.add(call)
        try:
            return self._runner.generate(requests)
        except ValueError as e:  # a bad token id, a backend's refusal, ...
            raise HTTPError(400, str(e)) from e
        finally:
            with self._live_lock:
                self._live.discard(call)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise HTTPError(404, f"model {model!r} is not served here; /v1/models lists {self.model_name!r}")

    def completions(self, body: CompletionBody, call: Call | None = None) -> dict:
        self._check_model(body.model)
        if body.stream or body.echo:
            raise HTTPError(400, "stream and echo are not supported")
        results = self.generate(self._prompt_ids(body.prompt), body.sampling_fields(), call)
        as_ids = body.return_tokens_as_token_ids
        choices = []
        for index, r in enumerate(results):
            choice = {
                "index": index,
                "text": self._text(r.token_ids),
                "logprobs": None if body.logprobs is None else self._completion_logprobs(r, as_ids),
                "finish_reason": r.finish_reason,
                "stop_reason": None,
                "spec": _spec(r),
            }
            if body.return_token_ids:
                choice |= {"prompt_token_ids": r.prompt_token_ids, "token_ids": r.token_ids}
            choices.append(choice)
        return self._response("cmpl", "text_completion", choices, results, body.n)

    def chat_completions(self, body: ChatBody, call: Call | None = None) -> dict:
        self._check_model(body.model)
        if body.stream:
            raise HTTPError(400, "stream is not supported")
        if body.top_logprobs and not body.logprobs:
            raise HTTPError(400, f"top_logprobs={body.top_logprobs} needs logprobs: true")
        prompt = self._chat_prompt(body)
        room = self.service.max_model_len - len(prompt)
        if room < 1:
            raise HTTPError(
                400,
                f"messages: the rendered prompt has {len(prompt)} tokens; max_model_len is "
                f"{self.service.max_model_len}, which leaves no room to generate",
            )
        name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        results = self.generate([prompt], body.sampling_fields(room), call, name)
        choices = []
        for index, r in enumerate(results):
            choice = {
                "index": index,
                "message": {"role": "assistant", "content": self._text(r.token_ids), "tool_calls": []},
                "logprobs": self._chat_logprobs(r, body.return_tokens_as_token_ids) if body.logprobs else None,
                "finish_reason": r.finish_reason,
                "stop_reason": None,
                "spec": _spec(r),
            }
            if body.return_token_ids:
                choice["token_ids"] = r.token_ids
            choices.append(choice)
        response = self._response("chatcmpl", "chat.completion", choices, results, body.n)
        # vLLM's place for the prompt's ids in a chat response: the response's, not a choice's
        return response | {"prompt_token_ids": prompt if body.return_token_ids else None}

    def _response(self, prefix: str, kind: str, choices: list[dict], results: list[RolloutResult], n: int) -> dict:
        """The envelope both OpenAI routes answer in: id, object, created, model, choices, usage."""
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(results, n),
        }

    def legacy_generate(self, body: LegacyGenerateBody, call: Call | None = None) -> dict:
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
        results = self.generate(prompts, merged.sampling_fields(), call)
        # trl vllm-serve's layout: per position the sampled token and the top-N, likeliest first.
        ranked = [_ranked(r) for r in results]
        return {
            "prompt_ids": prompts,
            "completion_ids": [r.token_ids for r in results],
            "logprobs": [[[_finite(lp) for _, lp in position] for position in rows] for rows in ranked],
            "logprob_token_ids": [[[t for t, _ in position] for position in rows] for rows in ranked],
        }

    # -------------------------------------------------------------------- chat prompts and response pieces

    def _chat_prompt(self, body: ChatBody) -> list[int]:
        """The conversation's token ids, rendered with the model's chat template as vLLM renders them."""
        if self.tokenizer is None:
            raise HTTPError(400, "chat completions need the model's tokenizer, which this server was not given")
        if body.add_generation_prompt and body.continue_final_message:
            raise HTTPError(400, "add_generation_prompt and continue_final_message cannot both be true")
        if body.tools and body.tool_choice != "none":
            raise HTTPError(
                400,
                f"tool_choice={body.tool_choice!r} is not supported: this server does not parse tool calls; send "
                "tool_choice='none' to have the tools rendered into the prompt and parse the calls from the text",
            )
        if not body.tools and body.tool_choice not in (None, "none"):
            raise HTTPError(400, f"tool_choice={body.tool_choice!r} needs tools")
        template_kwargs = dict(body.chat_template_kwargs or {})
        taken = sorted(set(template_kwargs) & _template_arguments(self.tokenizer))
        if taken:
            raise HTTPError(400, f"chat_template_kwargs: {', '.join(taken)}: apply_chat_template's own, not variables")
        try:
            return chat_ids(
                self.tokenizer,
                _chat_messages(body.messages),
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                tools=body.tools or None,
                **template_kwargs,
            )
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:  # the template's own refusals
            raise HTTPError(400, f"messages: the chat template cannot render them: {e}") from e

    def _text(self, ids: list[int]) -> str:
        # Special tokens (the EOS that ended a turn) are left out of the text, as vLLM's skip_special_tokens does.
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _token_names(self, ids: list[int], as_ids: bool) -> list[str]:
        """How a response names tokens: "token_id:<id>" when asked (vLLM's return_tokens_as_token_ids, for tokens
        whose text is not valid on its own), else their text, else (no tokenizer) their ids."""
        if as_ids:
            return [f"token_id:{t}" for t in ids]
        if self.tokenizer is None:
            return [str(t) for t in ids]
        return self.tokenizer.batch_decode([[t] for t in ids])

    def _named(self, r: RolloutResult, as_ids: bool) -> tuple[list[str], list[list[tuple[str, float]]]]:
        """The result's tokens by name, and at each position its top-N as (name, logprob), likeliest first
        (empty lists when the request asked for none)."""
        names = self._token_names(r.token_ids, as_ids)
        if r.top_token_ids is None:
            return names, [[] for _ in r.token_ids]
        flat = self._token_names([t for row in r.top_token_ids for t in row], as_ids)
        top, at = [], 0
        for row in r.top_logprobs:
            top.append(list(zip(flat[at : at + len(row)], row)))
            at += len(row)
        return names, top

    def _completion_logprobs(self, r: RolloutResult, as_ids: bool) -> dict:
        """vLLM's completions layout: per position {sampled token: logprob, then each top-N token: logprob}."""
        names, top = self._named(r, as_ids)
        per_position = []
        for name, lp, entries in zip(names, r.logprobs, top):
            position = {name: _finite(lp)}
            for other, value in entries:
                position.setdefault(other, _finite(value))  # the sampled token keeps its place and value
            per_position.append(position)
        return {
            "tokens": names,
            "token_logprobs": [_finite(lp) for lp in r.logprobs],
            "top_logprobs": per_position,
            "text_offset": [],
        }

    def _chat_logprobs(self, r: RolloutResult, as_ids: bool) -> dict:
        """OpenAI's chat layout: per position {token, logprob, bytes, top_logprobs: the top-N, likeliest first}."""
        names, top = self._named(r, as_ids)
        return {
            "content": [
                {**_logprob_entry(name, lp), "top_logprobs": [_logprob_entry(t, v) for t, v in entries]}
                for name, lp, entries in zip(names, r.logprobs, top)
            ]
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
            "limits": {
                "max_n": self.config.max_n,
                "max_queued_seqs": self.config.max_queued_seqs,
                "queued_seqs": self._admission.queued,
                "max_model_len": self.service.max_model_len,
            },
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
            with self._gate.exclusive():
                if len(self._staged) and not self._updating:  # not committed by a concurrent request meanwhile
                    self._load(self._staged.commit())

    def _apply(self, staged: list[tuple[str, torch.Tensor]]) -> int:
        with self._gate.exclusive():  # after the rollouts in flight, before any that waits
            return self._load(staged)

    def _load(self, staged: list[tuple[str, torch.Tensor]]) -> int:
        """Apply staged tensors as one policy version; the caller holds the gate exclusively."""
        if not staged:
            return self.service.policy_version
        named = [(n, t.float()) for n, t in staged]
        try:
            return self._runner.exclusive(lambda: self.service.update_weights(named))
        except (ValueError, TypeError) as e:  # wrong names or shapes: checked before anything is written
            raise HTTPError(400, str(e)) from e

    def reset_prefix_cache(self) -> dict:
        # No cross-request prefix cache to drop; pending legacy weights are applied here, as TRL resets after a sync.
        self._commit_legacy()
        return {"success": True}


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())


# ---------------------------------------------------------------------------------------------- response pieces

# vLLM's floor for a logprob in a response: JSON has no -inf, which top-N entries masked by top-k/top-p carry.
LOGPROB_FLOOR = -9999.0
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _logprob_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}


def _ranked(r: RolloutResult) -> list[list[tuple[int, float]]]:
    """Per position the sampled token and the top-N as (id, logprob), likeliest first, the sampled one once."""
    top = r.top_token_ids or [[] for _ in r.token_ids]
    top_lps = r.top_logprobs or [[] for _ in r.token_ids]
    out = []
    for token, lp, ids, lps in zip(r.token_ids, r.logprobs, top, top_lps):
        position = {token: lp}
        for t, v in zip(ids, lps):
            position.setdefault(t, v)
        out.append(sorted(position.items(), key=lambda item: -item[1]))
    return out


def _spec(r: RolloutResult) -> dict:
    return {"target_forwards": r.spec.target_forwards, "drafted": r.spec.drafted, "accepted": r.spec.accepted}


def _usage(results: list[RolloutResult], n: int) -> dict:
    prompt_tokens = sum(len(r.prompt_token_ids) for r in results[::n])  # each prompt once, not once per sample
    completion_tokens = sum(len(r.token_ids) for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them; a 400 naming the first one this server cannot render."""
    if not messages:
        raise HTTPError(400, "messages: at least one message is required")
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise HTTPError(400, f"messages[{i}].role={m.role!r} is not supported (known: {', '.join(CHAT_ROLES)})")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise HTTPError(400, f"messages[{i}].content is required (only an assistant's tool call may omit it)")
        message = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            message["content"] = _text_parts(m.content, f"messages[{i}].content")
        out.append(message)
    return out


def _text_parts(parts: list[dict], where: str) -> str:
    """OpenAI's content parts as one string: the text parts joined by newlines, as vLLM renders them for a
    template that takes a string. This server serves a text model: any other part is refused."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type")
        if kind != "text":
            raise HTTPError(400, f"{where}[{j}]: content type {kind!r} is not supported (only 'text' parts)")
        if not isinstance(part.get("text"), str):
            raise HTTPError(400, f"{where}[{j}].text must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _template_arguments(tokenizer) -> set[str]:
    """apply_chat_template's own arguments: chat_template_kwargs may set template variables, not these (tokenize,
    return_dict, ... would change what comes back)."""
    parameters = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}


# ------------------------------------------------------------------------------------------------------------ HTTP


# Routes open without the API key: a load balancer's or a client's liveness probe (vLLM's and trl <= 1.10's).
PUBLIC_ROUTES = ("/health", "/health/")
# What an open server lets anyone replace: the policy's weights.
WEIGHT_ROUTES = (
    "/init_weight_transfer_engine",
    "/start_weight_update",
    "/update_weights",
    "/finish_weight_update",
    "/init_communicator/",
    "/update_named_param/",
)


def open_bind_warning(config: ServerConfig) -> str | None:
    """The warning for a server that listens beyond loopback without a key; None when it does not."""
    if config.api_key:
        return None
    try:
        loopback = config.host == "localhost" or ipaddress.ip_address(config.host).is_loopback
    except ValueError:  # a host name other than localhost: assume reachable from elsewhere
        loopback = False
    if loopback:
        return None
    return (
        f"serving on {config.host}:{config.port} without an API key: anyone who can reach this address can replace "
        f"the policy's weights ({', '.join(WEIGHT_ROUTES)}) and generate; set --api-key or SPECROLLOUT_API_KEY"
    )


class RequireAPIKey:
    """ASGI middleware: every route but PUBLIC_ROUTES needs `Authorization: Bearer <key>`, checked before the body
    is read or anything runs (a middleware, not a route dependency: FastAPI parses bodies before dependencies, and
    unknown paths are covered too)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        from fastapi.responses import JSONResponse
        from fastapi.security.utils import get_authorization_scheme_param
        from starlette.datastructures import Headers

        if scope["type"] == "http" and scope["path"] not in PUBLIC_ROUTES:
            scheme, token = get_authorization_scheme_param(Headers(scope=scope).get("authorization"))
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), self.key):
                message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                response = JSONResponse(
                    {"error": {"message": message, "code": 401}},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _asked(body) -> tuple[int, int]:
    """(prompts, n) a generation body asks for, read before any tokenizing: what admission counts."""
    if isinstance(body, ChatBody):
        return 1, body.n
    if isinstance(body, LegacyGenerateBody):
        prompts, n = len(body.prompts), body.generation_kwargs.get("n", body.n)
    else:
        p = body.prompt
        prompts, n = (1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p)), body.n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        n = 1  # a bad generation_kwargs n: refused with its message once the fields are validated
    return max(prompts, 1), n


def build_app(server: CompletionServer):
    """The FastAPI app; every body is validated against the models above."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    cfg = server.config
    app = FastAPI(title="specrollout", docs_url=None, redoc_url=None)
    if cfg.api_key:
        app.add_middleware(RequireAPIKey, key=cfg.api_key)
    warning = open_bind_warning(cfg)
    if warning:
        log.warning(warning)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "code": status}}, status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return error(400, f"invalid request: {details}")

    # Each admitted generation waits in a thread of its own (the engine batches them): as many threads as the queue
    # bound admits, not the 40 of the shared pool, which would make the 41st request wait behind long ones.
    generation_threads = anyio.CapacityLimiter(cfg.max_queued_seqs)

    async def generate(request: Request, handler, body):
        call = server.admit(*_asked(body))  # 400 / 429 at once, before the body reaches a thread
        try:
            work = functools.partial(handler, body, call)
            task = asyncio.ensure_future(anyio.to_thread.run_sync(work, limiter=generation_threads))
            while not task.done():
                await asyncio.wait({task}, timeout=cfg.disconnect_poll_s)
                if not task.done() and await request.is_disconnected():
                    server.abort(call)  # repeated each poll until the generation returns (see abort)
            return task.result()
        except asyncio.CancelledError:
            # uvicorn's shutdown, past its grace period: stop generating for this request and tell its client so
            # (re-raised, the cancellation would reach the client as a 500 and the log as a traceback).
            server.abort(call)
            return error(503, "the server is shutting down: this request was aborted after the grace period")
        finally:
            server.release(call)

    def route(method: str, path: str, handler, body_model=None, generation: bool = False):
        # Handlers block (generation, collective receives): they run in threads, not on the event loop.
        if generation:

            async def endpoint(request: Request, body: body_model):  # type: ignore[valid-type]
                return await generate(request, handler, body)
        elif body_model is None:

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
    route("POST", "/v1/completions", server.completions, CompletionBody, generation=True)
    route("POST", "/v1/chat/completions", server.chat_completions, ChatBody, generation=True)
    route("POST", "/reset_prefix_cache", server.reset_prefix_cache)
    route("POST", "/init_weight_transfer_engine", lambda b: server.init_weight_transfer(b.init_info), InitBody)
    route("POST", "/start_weight_update", server.start_weight_update)
    route("POST", "/update_weights", lambda b: server.update_weights(b.update_info), UpdateBody)
    route("POST", "/finish_weight_update", server.finish_weight_update)
    # trl <= 1.10 (`trl vllm-serve`)
    route("GET", "/health/", ok)
    route("GET", "/get_world_size/", world)
    route("POST", "/generate/", server.legacy_generate, LegacyGenerateBody, generation=True)
    route("POST", "/init_communicator/", server.legacy_init_communicator, LegacyInitBody)
    route("POST", "/update_named_param/", server.legacy_update_named_param, LegacyParamBody)
    route("POST", "/reset_prefix_cache/", server.reset_prefix_cache)
    route("POST", "/close_communicator/", server.close_group)
    return app


def _uvicorn_config(server: CompletionServer, log_level: str, **kwargs):
    import uvicorn

    cfg = server.config
    # On shutdown uvicorn stops accepting at once, waits this long for the requests in flight, then cancels them
    # (each cancelled generation aborts its rollouts).
    return uvicorn.Config(
        build_app(server),
        host=cfg.host,
        port=cfg.port,
        log_level=log_level,
        timeout_graceful_shutdown=cfg.shutdown_grace_s,
        **kwargs,
    )


class BackgroundServer:
    """Run the app with uvicorn in a thread of this process (tests, notebooks); `serve()` blocks instead."""

    def __init__(self, server: CompletionServer):
        import uvicorn

        self.server = server
        self.uvicorn = uvicorn.Server(_uvicorn_config(server, "warning", lifespan="off"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.url = f"http://{server.config.host}:{server.config.port}"

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
        self.thread.join(timeout=self.server.config.shutdown_grace_s + 10)
        self.server.close()


def serve(server: CompletionServer) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn handles both alike): stop accepting, give the requests in flight
    `shutdown_grace_s`, abort what is left, return."""
    import uvicorn

    try:
        uvicorn.Server(_uvicorn_config(server, "info")).run()
    finally:
        server.close()  # anything uvicorn left generating is aborted before the service goes away


# ------------------------------------------------------------------------------------------------- trainer side


class WeightSender:
    """The trainer's end of the CPU weight path: joins the server's gloo group as rank 0 and pushes tensors.

    with WeightSender("http://127.0.0.1:8000", port=51216) as sender:
        sender.send(model.named_parameters())       # one policy version per call

    `api_key`: the server's key (sent as `Authorization: Bearer <key>`), when it has one.
    """

    def __init__(
        self,
        base_url: str,
        port: int = 51216,
        address: str = "127.0.0.1",
        timeout_s: float = 300.0,
        api_key: str | None = None,
    ):
        import requests

        self.base_url, self.session = base_url.rstrip("/"), requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
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
