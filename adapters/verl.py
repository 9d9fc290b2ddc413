"""verl rollout backend: `actor_rollout_ref.rollout.name=specrollout`.

verl (>= 0.9) finds rollout backends by name in `RolloutReplicaRegistry`, and on `import verl` it imports every
entry point of the group `verl.plugins`. This package declares one (pyproject.toml) that names this module, and
importing it registers:

- "specrollout" in `RolloutReplicaRegistry` -> `SpecRolloutReplica`, which verl's `LLMServerManager` builds for each
  replica. It starts one Ray actor, `SpecRolloutServer`, that hosts our engine and serves it twice over: to verl's
  `LLMServerClient` through the actor handle (`generate`), and as vLLM's OpenAI-compatible HTTP API
  (adapters/vllm_server.py) on a free port of the actor's node, whose "ip:port" is the replica's `server_address`,
  as with verl's vLLM replica (for agent loops, reward loops and user code that talk HTTP).
- ("specrollout", "async") in verl's rollout-class table -> `SpecRolloutServerAdapter`, the trainer-side object that
  verl's hybrid workers build to push new weights to the rollout (here: to the server actor, over Ray).

`SpecRolloutServer.generate` has the signature verl's `LLMServerClient` calls (token ids in, `TokenOutput` out).
The HTTP routes (/v1/completions, /v1/chat/completions, /v1/models, /health, ...) reach the same engine, so requests
from both paths batch together, share the policy version, and pause together while verl syncs weights.
Tokens are sampled exactly from the policy (rollout/verify.py) and every token comes back with its logprob under
the processed distribution; the speculation counters go into `extra_fields` under the names verl's trainer reads
for `rollout/spec_accept_rate` and `rollout/spec_accept_length`.

Engine settings live under `actor_rollout_ref.rollout.engine_kwargs.specrollout`: `config` (a YAML like
configs/default.yaml), `overrides` (a list such as ["speculation.budget=fixed:4"]) and `num_cpus` (of the server
actor). The model defaults to verl's `actor_rollout_ref.model.path`, `engine.max_model_len` to `max_model_len` or
prompt_length + response_length, `engine.seed` to `rollout.seed`. vLLM-only knobs (gpu_memory_utilization,
enforce_eager, dtype, ...) do not apply: the engine's own `engine.dtype` and `engine.device` decide.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import replace
from typing import Any, Generator

import ray

# verl keeps its trainer-side rollout classes in a module-level table with no register function of its own.
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, RolloutReplicaRegistry, TokenOutput

from adapters.sampling_fields import translate
from adapters.vllm_server import BackgroundServer, CompletionServer, HTTPError, ServerConfig
from rollout.config import ServiceConfig, load_config
from rollout.frontend import validate_prompt
from rollout.history import prompt_key
from rollout.result import RolloutResult
from rollout.sampling import SamplingParams
from rollout.weights import buckets, to_host
from rollout.worker import RolloutRequest, RolloutWorker

NAME = "specrollout"
logger = logging.getLogger(__name__)

# verl's names for per-request speculation counters (vllm_async_server.py, ray_trainer.compute_spec_decode_metrics):
# accept rate = accepted / drafted, accept length = 1 + accepted / verify steps. Every target forward of a request
# emits one token plus the accepted draft tokens, so our target_forwards are verl's verify steps.
SPEC_DRAFT, SPEC_ACCEPTED, SPEC_VERIFY = "spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_num_verify_steps"

# ---------------------------------------------------------------------------------------------------- sampling


def to_sampling_params(
    sampling_params: dict[str, Any], prompt_len: int, max_model_len: int, default_max_tokens: int, seed: int | None
) -> tuple[SamplingParams, bool]:
    """verl's sampling dict -> (our SamplingParams, whether logprobs were asked for); ValueError names a bad key.

    The fields are vLLM's (adapters/sampling_fields.py). max_tokens (or SGLang's max_new_tokens) defaults to
    `default_max_tokens` and is capped by the room left in the context, as verl's vLLM server does; logprobs is a
    flag (verl's `calculate_log_probs`): the sampled token's logprob, the only one this engine returns.
    """
    fields = dict(sampling_params)
    new_tokens = fields.pop("max_new_tokens", None)  # SGLang's name; max_tokens wins when both are set
    if fields.get("max_tokens") is None:
        fields["max_tokens"] = new_tokens
    # max_logprobs=1: True (== 1) is verl's "return logprobs".
    params, n, logprobs = translate(
        fields, default_max_tokens=max(1, default_max_tokens), default_seed=seed, max_logprobs=1
    )
    if n != 1:
        raise ValueError(
            f"n={n} is not supported by specrollout's verl backend (only 1): verl makes one call per sample"
        )
    room = max_model_len - prompt_len
    if room < 1:
        raise ValueError(
            f"prompt of {prompt_len} tokens leaves no room to generate within max_model_len {max_model_len}"
        )
    if params.max_tokens > room:
        params = replace(params, max_tokens=room)
    return params, bool(logprobs)


def group_of(prompt_ids: list[int]) -> str:
    """verl sends the n samples of a prompt as n separate calls with identical prompt ids and no group id (the
    trainer's `uid` does not reach the server), so the prompt itself names the GRPO group: siblings in flight on one
    engine draft from each other."""
    return f"verl-{prompt_key(prompt_ids)}"


def to_token_output(
    result: RolloutResult, logprobs: bool, global_steps: int | None, drafter: dict | None = None
) -> TokenOutput:
    """Our RolloutResult -> verl's TokenOutput, with the speculation counters under verl's metric names, and the
    engine's drafter health (rollout/drafter_health.py) beside them: this policy version's acceptance so far and
    whether it collapsed against the previous version's (a stale drafter)."""
    drafter = drafter or {}
    stop = {"stop": "completed", "length": "completed", "abort": "aborted"}.get(result.finish_reason)
    return TokenOutput(
        token_ids=list(result.token_ids),
        log_probs=list(result.logprobs) if logprobs else None,
        stop_reason=stop or result.finish_reason,
        num_preempted=0,  # sequences keep their KV slot until they finish: never preempted
        extra_fields={
            "global_steps": global_steps,
            "policy_version": result.policy_version,
            SPEC_DRAFT: result.spec.drafted,
            SPEC_ACCEPTED: result.spec.accepted,
            SPEC_VERIFY: result.spec.target_forwards,
            "spec_drafter_acceptance": drafter.get("drafter_acceptance"),
            "spec_drafter_collapsed": bool(drafter.get("drafter_collapsed", False)),
        },
    )


# ---------------------------------------------------------------------------------------------------- server actor


class SpecRolloutServer:
    """One engine replica serving verl's token-in-token-out calls. Wrapped with `ray.remote` by the replica.

    verl's agent loops call `generate` once per sample, concurrently; the engine batches them continuously, so
    the n samples of a prompt run together and the suffix drafter drafts each from its siblings.
    """

    def __init__(self, service_config: ServiceConfig, rollout_config, replica_rank: int = 0):
        self.config = rollout_config
        self.replica_rank = replica_rank
        self.model = service_config.engine.model
        self.worker = RolloutWorker(service_config, index=replica_rank)
        self.global_steps: int | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._reject = False
        self._http: BackgroundServer | None = None
        self._http_address: str | None = None

    async def health(self) -> dict:
        return self.worker.health()

    async def _admit(self) -> bool:
        """Wait while a weight sync holds admission closed (both the Ray and the HTTP path); False when verl asked
        for new requests to be rejected rather than parked."""
        if not self._open.is_set():
            if self._reject:
                return False
            await self._open.wait()
        return True

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list | None = None,
        video_data: list | None = None,
        audio_data: list | None = None,
        mm_processor_kwargs: dict | None = None,
        priority: int = 0,  # a scheduling hint for vLLM; our engine admits first come, first served
    ) -> TokenOutput:
        if image_data is not None or video_data is not None or audio_data is not None or mm_processor_kwargs:
            raise ValueError("specrollout serves text-only models: image, video and audio inputs are not supported")
        if not await self._admit():  # paused for a weight update, and told to turn requests away
            return TokenOutput(token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps})
        engine = self.worker.engine
        # The engine's own check (integer ids inside the vocabulary, room to generate), before anything else reads them.
        prompt_ids = validate_prompt(prompt_ids, engine.vocab_size, engine.max_model_len)
        cfg = self.config
        default = min(cfg.response_length, cfg.prompt_length + cfg.response_length - len(prompt_ids))
        seed = None
        if getattr(cfg, "full_determinism", False):
            # verl's request id is then stable per sample ("det-<priority>"): derive a distinct, repeatable seed.
            digest = hashlib.blake2b(f"{cfg.seed}:{request_id}".encode(), digest_size=8).digest()
            seed = int.from_bytes(digest, "little") >> 2
        params, logprobs = to_sampling_params(sampling_params, len(prompt_ids), engine.max_model_len, default, seed)
        request = RolloutRequest(str(request_id), prompt_ids, params, group=group_of(prompt_ids))
        (result,) = await self.worker.generate([request])
        return to_token_output(result, logprobs, self.global_steps, engine.drafter_health.figures())

    # ------------------------------------------------------------------ HTTP

    async def start_http(self, tokenizer_path: str | None = None) -> str:
        """Serve vLLM's OpenAI-compatible API over this actor's engine; returns its "ip:port" (verl's format).

        uvicorn runs in a thread of this actor and binds a port the OS picks on the node's IP, as verl's vLLM server
        does. Its handlers hand their requests to the engine on this actor's event loop (`_OnActorLoop`), where
        verl's calls run too: one engine, one batch, one policy version.
        """
        if self._http is not None:
            return self._http_address
        from transformers import AutoTokenizer

        from rollout.checkpoint import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or resolve_model(self.model))
        host = ray.util.get_node_ip_address().strip("[]")
        service = _OnActorLoop(self, asyncio.get_running_loop())
        # port 0: the OS picks a free port at bind time, so nothing can take it between choosing and binding. The
        # model's id is the path verl gave (as vLLM, which verl starts with `serve <local_path>`, names it).
        core = _ReplicaCompletionServer(service, tokenizer, ServerConfig(host=host, port=0), model_name=self.model)
        # __enter__ waits (blocking) for uvicorn to bind; verl's calls wait meanwhile, and there are none yet.
        self._http = BackgroundServer(core).__enter__()
        port = self._http.uvicorn.servers[0].sockets[0].getsockname()[1]
        self._http_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        logger.info("replica %d: OpenAI-compatible API on http://%s", self.replica_rank, self._http_address)
        return self._http_address

    async def _generate_http(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        """An HTTP call's requests, on this actor's loop: through the same admission gate as verl's `generate`,
        and grouped by prompt as verl's are, so HTTP samples of a prompt draft from each other and from verl's."""
        if not await self._admit():
            raise HTTPError(503, "the replica is paused for a weight update and turns new requests away")
        engine = self.worker.engine
        # Checked before the prompt is hashed into its group name (a bad id is a 400 there, not a crash here).
        for r in requests:
            validate_prompt(r.prompt_token_ids, engine.vocab_size, engine.max_model_len)
        requests = [replace(r, group=group_of(r.prompt_token_ids)) for r in requests]
        return await self.worker.generate(requests)

    # ------------------------------------------------------------------ weights

    async def stage_weights(self, bucket: list[tuple[str, Any]]) -> int:
        """One bucket of (name, tensor); checked against the model now, applied at `commit_weights`. A refused
        bucket drops the update staged so far: a half-staged update never leaks into the next one."""
        return self.worker.stage_weights(bucket)

    async def commit_weights(self, global_steps: int | None = None) -> int:
        """Apply the staged buckets as one policy version (verl's global step when given); returns it."""
        version = global_steps if global_steps is not None else self.worker.engine.policy_version + 1
        if global_steps is not None:
            self.global_steps = global_steps
        return self.worker.commit_weights(version)

    async def update_weights(self, named_tensors: list[tuple[str, Any]], global_steps: int | None = None) -> int:
        """All of a new policy's tensors (or any subset) in one call; returns the new policy version."""
        await self.stage_weights(list(named_tensors))
        return await self.commit_weights(global_steps)

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # ------------------------------------------------------------------ verl's replica life cycle

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Pause admission and finish everything in flight as aborted (verl does this before a weight sync)."""
        self._open.clear()
        self._reject = reject_request
        return {"aborted_count": self.worker.abort()}

    async def resume_generation(self) -> None:
        self._reject = False
        self._open.set()

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        return {"aborted": self.worker.abort([request_id]) == 1, "request_id": request_id}

    async def wait_for_requests_to_drain(self) -> None:
        await self.worker.drained()

    # The KV cache and weights live in host memory for the whole run: nothing to offload or restore.
    async def wake_up(self, tags: list[str] | None = None) -> None: ...

    async def sleep(self) -> None: ...

    async def clear_kv_cache(self) -> None: ...

    async def release_kv_cache(self) -> None: ...

    async def resume_kv_cache(self) -> None: ...

    async def start_profile(self, **kwargs) -> None: ...

    async def stop_profile(self) -> None: ...


class _OnActorLoop:
    """The server actor's worker as the blocking service `CompletionServer` expects.

    The HTTP handlers run in uvicorn's thread pool; the worker's engine belongs to the actor's event loop (its step
    loop runs there, between verl's calls). Each call is therefore handed to that loop and waited for, so the engine
    is only ever touched from one thread.
    """

    def __init__(self, server: SpecRolloutServer, loop: asyncio.AbstractEventLoop):
        self.server, self.loop = server, loop

    @property
    def max_model_len(self) -> int:
        return self.server.worker.engine.max_model_len

    @property
    def policy_version(self) -> int:
        return self.server.worker.engine.policy_version

    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        return asyncio.run_coroutine_threadsafe(self.server._generate_http(requests), self.loop).result()

    def abort(self, request_ids: list[str]) -> int:
        """End these requests early (their HTTP client left); they finish with what they have, as verl's aborts.
        Having `abort` also tells the HTTP server that this service batches concurrent calls itself."""

        async def on_loop() -> int:
            return self.server.worker.abort(list(request_ids))

        return asyncio.run_coroutine_threadsafe(on_loop(), self.loop).result()

    def update_weights(self, named_tensors, version: int | None = None) -> int:
        raise ValueError(WEIGHTS_FROM_VERL)


WEIGHTS_FROM_VERL = (
    "a verl replica's weights come from verl's weight sync (one policy version per global step); "
    "the HTTP weight routes are not served here"
)


class _ReplicaCompletionServer(CompletionServer):
    """`CompletionServer` as a verl replica serves it: the weight routes are refused, since verl owns the weights
    and pauses both paths around each sync. Calls run concurrently (the service has `abort`), and the actor's worker
    batches them continuously: an agent loop sends many n=1 requests at once."""

    def init_weight_transfer(self, info) -> dict:
        raise HTTPError(501, WEIGHTS_FROM_VERL)

    def legacy_init_communicator(self, body) -> dict:
        raise HTTPError(501, WEIGHTS_FROM_VERL)


# ---------------------------------------------------------------------------------------------------- replica


def service_config(rollout_config, model_config) -> ServiceConfig:
    """Our ServiceConfig from verl's rollout config (engine_kwargs.specrollout) and model path."""
    options = dict((rollout_config.engine_kwargs or {}).get(NAME) or {})
    unknown = sorted(set(options) - {"config", "overrides", "num_cpus"})
    if unknown:
        raise ValueError(f"rollout.engine_kwargs.{NAME}: unknown key(s) {unknown}; known: config, overrides, num_cpus")
    overrides = [str(o) for o in options.get("overrides") or []]
    given = {o.split("=", 1)[0].strip() for o in overrides}
    path = _get(model_config, "local_path") or _get(model_config, "path")
    defaults = {
        "engine.model": os.path.expanduser(str(path)) if path else None,
        "engine.max_model_len": rollout_config.max_model_len
        or rollout_config.prompt_length + rollout_config.response_length,
        "engine.seed": rollout_config.seed,
    }
    overrides += [f"{k}={v}" for k, v in defaults.items() if k not in given and v is not None]
    return load_config(options.get("config"), overrides).validate()


def _get(config, key: str):
    return config.get(key) if hasattr(config, "get") else getattr(config, key, None)


class SpecRolloutReplica(RolloutReplica):
    """One specrollout engine per replica, in its own Ray actor on CPUs (no GPU resource pool), serving verl's Ray
    calls and, at `server_address`, the OpenAI-compatible HTTP API.

    verl sizes replicas by GPUs: the number of replicas is n_gpus_per_node * nnodes / (tp * dp * pp), so on a CPU
    machine set tensor_model_parallel_size=1 and n_gpus_per_node to the number of engines wanted.
    """

    def __init__(
        self,
        replica_rank,
        config,
        model_config,
        gpus_per_node=8,
        is_reward_model=False,
        is_teacher_model=False,
        name_suffix="",
    ):
        super().__init__(
            replica_rank, config, model_config, gpus_per_node, is_reward_model, is_teacher_model, name_suffix
        )
        c = self.config
        if c.tensor_model_parallel_size * c.data_parallel_size * c.pipeline_model_parallel_size != 1:
            raise ValueError(
                f"{NAME} runs one engine per replica: set rollout.tensor_model_parallel_size, "
                "data_parallel_size and pipeline_model_parallel_size to 1"
            )
        self.service_config = service_config(c, model_config)
        self.num_cpus = float(((c.engine_kwargs or {}).get(NAME) or {}).get("num_cpus", 1))
        self.server_class = ray.remote(SpecRolloutServer)

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def init_hybrid(self, worker_group):
        # Beside the trainer's workers rather than inside them: the engine runs in its own actor either way.
        self.rollout_mode = RolloutMode.HYBRID
        start = self.world_size * self.replica_rank
        self.workers = worker_group.workers[start : start + self.world_size]
        await self.launch_servers()

    async def init_colocated(self, resource_pool):
        self.rollout_mode, self.resource_pool = RolloutMode.COLOCATED, resource_pool
        await self.launch_servers()

    async def init_standalone(self):
        # verl's default builds a GPU placement group of checkpoint-engine workers; the engine needs neither.
        self.rollout_mode = RolloutMode.STANDALONE
        await self.launch_servers()

    async def launch_servers(self):
        from rollout.cluster import worker_env

        server = self.server_class.options(
            name=server_name(self.replica_rank, self.name_suffix),
            num_cpus=self.num_cpus,
            max_concurrency=self.max_concurrency,
            runtime_env={"env_vars": worker_env(HF_HUB_OFFLINE="1")},
        ).remote(self.service_config, self.config, self.replica_rank)
        await server.health.remote()  # the engine is loaded: errors surface here, not at the first request
        self.servers = [server]
        self._server_handle = server
        # "ip:port" of the OpenAI-compatible API over the same engine, as verl's vLLM replica sets it; verl's load
        # balancer also keys the replica's handle by it.
        mc = self.model_config
        tokenizer = _get(mc, "local_tokenizer_path") or _get(mc, "tokenizer_path")
        self._server_address = await server.start_http.remote(os.path.expanduser(str(tokenizer)) if tokenizer else None)


def server_name(replica_rank: int, name_suffix: str = "") -> str:
    """The Ray actor name of a replica's server; the trainer-side adapter finds it by this name."""
    return f"{NAME}_server_{replica_rank}{name_suffix}"


# ---------------------------------------------------------------------------------------------------- trainer side


class SpecRolloutServerAdapter(BaseRollout):
    """What verl's hybrid workers build for `rollout.name=specrollout`: pushes the trainer's weights to the server.

    Every trainer rank of a replica receives the full tensors; only the replica's first rank sends them, in
    buckets of `checkpoint_engine.update_weights_bucket_megabytes`, and they take effect together as one policy
    version (= verl's global step) once all buckets arrived.
    """

    def __init__(self, config, model_config, device_mesh=None, *args, replica_rank: int | None = None, **kwargs):
        super().__init__(config, model_config, device_mesh)
        world = self.config.tensor_model_parallel_size * self.config.data_parallel_size
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = replica_rank if replica_rank is not None else rank // world
        self.is_leader_rank = rank % world == 0
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20

    async def update_weights(
        self, weights: Generator, wire_format: str = "named_tensors", global_steps=None, **kwargs
    ) -> None:
        if wire_format != "named_tensors":
            raise ValueError(f"{NAME} takes full named tensors; wire_format {wire_format!r} is not supported")
        if kwargs.get("peft_config") is not None:
            raise ValueError(f"{NAME} loads full weights only: LoRA adapters must be merged (model.lora.merge=True)")
        if not self.is_leader_rank:
            for _ in weights:  # every rank must drain the generator (it may run collectives)
                pass
            return
        server = ray.get_actor(server_name(self.replica_rank))
        for bucket in buckets(((name, to_host(tensor)) for name, tensor in weights), self.bucket_bytes):
            await server.stage_weights.remote(bucket)
        await server.commit_weights.remote(global_steps)

    async def resume(self, tags: list[str]) -> None: ...

    async def release(self) -> None: ...


# ---------------------------------------------------------------------------------------------------- registration


def _load_replica() -> type[RolloutReplica]:
    return SpecRolloutReplica


def register() -> None:
    """Make `rollout.name=specrollout` resolve to this module in verl's two registries (idempotent)."""
    RolloutReplicaRegistry.register(NAME, _load_replica)
    _ROLLOUT_REGISTRY[(NAME, "async")] = f"{__name__}.SpecRolloutServerAdapter"


# verl imports the `verl.plugins` entry point and does not call anything in it: registering is importing.
register()
