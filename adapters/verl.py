"""verl rollout backend: `actor_rollout_ref.rollout.name=specrollout`.

verl (>= 0.9) finds rollout backends by name in `RolloutReplicaRegistry`, and on `import verl` it imports every
entry point of the group `verl.plugins`. This package declares one (pyproject.toml) that names this module, and
importing it registers:

- "specrollout" in `RolloutReplicaRegistry` -> `SpecRolloutReplica`, which verl's `LLMServerManager` builds for each
  replica. Instead of vLLM's HTTP server it starts one Ray actor, `SpecRolloutServer`, that hosts our engine.
- ("specrollout", "async") in verl's rollout-class table -> `SpecRolloutServerAdapter`, the trainer-side object that
  verl's hybrid workers build to push new weights to the rollout (here: to the server actor, over Ray).

`SpecRolloutServer.generate` has the signature verl's `LLMServerClient` calls (token ids in, `TokenOutput` out).
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


def to_token_output(result: RolloutResult, logprobs: bool, global_steps: int | None) -> TokenOutput:
    """Our RolloutResult -> verl's TokenOutput, with the speculation counters under verl's metric names."""
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
        },
    )


# ---------------------------------------------------------------------------------------------------- server actor


class _Worker(RolloutWorker):
    """RolloutWorker (continuous batching across concurrent calls) plus aborting requests in flight."""

    def abort(self, request_ids: list[str] | None = None) -> int:
        """Abort the given requests (default: all in flight); their callers get the partial rollout with
        finish_reason "abort", which verl's partial rollout resumes from. Returns how many were aborted."""
        aborted = 0
        for rid in list(self._futures) if request_ids is None else request_ids:
            future = self._futures.pop(rid, None)
            result = self.engine.abort(rid)
            if future is not None and result is not None and not future.done():
                result.worker = self.index
                future.set_result(result)
                aborted += 1
        return aborted


class SpecRolloutServer:
    """One engine replica serving verl's token-in-token-out calls. Wrapped with `ray.remote` by the replica.

    verl's agent loops call `generate` once per sample, concurrently; the engine batches them continuously, so
    the n samples of a prompt run together and the suffix drafter drafts each from its siblings.
    """

    def __init__(self, service_config: ServiceConfig, rollout_config, replica_rank: int = 0):
        self.config = rollout_config
        self.replica_rank = replica_rank
        self.worker = _Worker(service_config, index=replica_rank)
        self.global_steps: int | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._reject = False

    async def health(self) -> dict:
        return self.worker.health()

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
        if not self._open.is_set():  # paused for a weight update
            if self._reject:
                return TokenOutput(
                    token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps}
                )
            await self._open.wait()
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
        return to_token_output(result, logprobs, self.global_steps)

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
    """One specrollout engine per replica, in its own Ray actor on CPUs (no GPU resource pool, no HTTP server).

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
        # No HTTP endpoint: the address only names this server in verl's load balancer.
        self._server_address = f"{NAME}://{server_name(self.replica_rank, self.name_suffix)}"


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
