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
import dataclasses
import inspect
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
from adapters.weight_transfer import broadcast, gloo_group, parse_dtype
from rollout.result import RolloutResult
from rollout.sampling import SamplingParams, sample_seed
from rollout.tasks import chat_ids
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
        tokens the context leaves after the prompt (the default max_tokens, and a cap on any other)."""
        fields = self.model_dump(include=set(_CommonSampling.model_fields))
        fields["max_tokens"] = min(self.max_completion_tokens or self.max_tokens or room, room)
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

    def _sampling(self, fields: dict) -> tuple[SamplingParams, int, int]:
        """vLLM's sampling fields -> (params, n, the request's base seed: random when unseeded)."""
        try:
            # 16 is vLLM's default max_tokens (the bodies fill theirs in anyway). top_logprobs: the responses carry
            # the alternatives a logprobs=N request asks for, so N becomes the params' top_logprobs.
            params, n, _ = translate(fields, default_max_tokens=16, top_logprobs=True)
        except ValueError as e:
            raise HTTPError(400, str(e)) from e
        return params, n, (secrets.randbits(62) if params.seed is None else params.seed)

    def generate(self, prompts: list[list[int]], fields: dict) -> list[RolloutResult]:
        """n completions per prompt, prompt-major; a prompt's completions form one group."""
        params, n, seed = self._sampling(fields)
        call = uuid.uuid4().hex[:12]
        requests = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                index = i * n + j
                seeded = dataclasses.replace(params, seed=sample_seed(seed, index))
                requests.append(RolloutRequest(f"http-{call}-{index}", ids, seeded, group=f"http-{call}-{i}"))
        with self._lock:
            self._commit_legacy()
            try:
                return self.service.generate(requests)
            except ValueError as e:  # a prompt over the max length, a bad token id, a backend's refusal, ...
                raise HTTPError(400, str(e)) from e

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise HTTPError(404, f"model {model!r} is not served here; /v1/models lists {self.model_name!r}")

    def completions(self, body: CompletionBody) -> dict:
        self._check_model(body.model)
        if body.stream or body.echo:
            raise HTTPError(400, "stream and echo are not supported")
        results = self.generate(self._prompt_ids(body.prompt), body.sampling_fields())
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

    def chat_completions(self, body: ChatBody) -> dict:
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
        results = self.generate([prompt], body.sampling_fields(room))
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
        results = self.generate(prompts, merged.sampling_fields())
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
    route("POST", "/v1/chat/completions", server.chat_completions, ChatBody)
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
