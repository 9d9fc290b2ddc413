"""OpenRLHF 0.11: specrollout engines in place of OpenRLHF's vLLM rollout actors.

    python -m adapters.openrlhf --specrollout-config configs/default.yaml \\
        --vllm.sync_backend gloo --vllm.sync_with_ray <the usual train_ppo_ray flags>

`SpecRolloutActor` has the methods (names, parameters, defaults, sync/async) of OpenRLHF's `RolloutRayActor`, so
OpenRLHF's trainer and its `SamplesGenerator` drive it unchanged; `create_engines` has the signature of
`create_vllm_engines` and starts one actor per requested engine, each hosting one engine in a `RolloutWorker`
(rollout/worker.py: the request loop the cluster's and verl's actors run too).
`launch_train_ppo_ray` swaps `create_engines` in and runs OpenRLHF's `train_ppo_ray` CLI.

- Generation: `generate` takes a vLLM `SamplingParams` (or anything with its attributes, or a dict) and returns a
  `RequestOutput` shaped like vLLM's (`.prompt_token_ids`, `.outputs[i].token_ids / .text / .logprobs /
  .finish_reason`). Concurrent calls share the engine's steps (continuous batching); the `num_samples` of one
  `generate_responses` call form one GRPO group, so the suffix drafter drafts each sample from its siblings.
  Every token is sampled exactly from the policy (rollout/verify.py) and its logprob is that of the processed
  distribution, which is what OpenRLHF's `logprobs_mode="processed_logprobs"` asks for.
- Refused with a ValueError rather than ignored (the table in adapters/sampling_fields.py, shared by the
  adapters): penalties, min_p, stop strings, bad words, logit bias, allowed token ids, structured outputs, logits
  processors, prompt logprobs, top-N logprobs (N > 1), images, tensor parallelism, raw logprobs. `min_tokens`
  (OpenRLHF's PPO always sends 1) is honoured as vLLM does: stop tokens are masked out of the processed
  distribution below it.
  `logprobs=1` returns the sampled token's logprob only (all OpenRLHF reads), not also the top-1 alternative.
  Accepted without effect, because there is nothing for them to act on: prefix caching (no prefix cache),
  enforce_eager (no CUDA graphs), gpu_memory_utilization and sleep/wake_up (the engine holds no GPU memory),
  full_determinism (a seeded request is reproducible anyway).
- Weights: the trainer is rank 0 of a gloo group, each engine one rank (`rank_offset`). `update_weight` receives
  one tensor by broadcast, checks its name, shape and dtype against the model and stages it; the staged tensors
  are applied together, as one new policy version, before the next generation, once no request is in flight. A
  wrong name or shape is refused (and the update staged so far dropped) after the tensor has been received, so
  the group stays in step and the engine keeps serving. With `use_ray=True` (OpenRLHF's `--vllm.sync_with_ray`)
  the group is Ray's gloo collective group, which is what the OpenRLHF trainer can join without CUDA; with
  `use_ray=False` it is a plain gloo group on a TCPStore whose master is rank 0 (`trainer_weight_group` below is
  that end, for trainers of your own and for the tests).
  NCCL and CUDA IPC weight sharing need CUDA engines and are refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import runpy
import sys
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from adapters.sampling_fields import FIELDS, translate
from adapters.weight_transfer import broadcast, gloo_group, parse_dtype
from rollout.cluster import worker_env
from rollout.config import ServiceConfig, load_config
from rollout.sampling import SamplingParams, sample_seed
from rollout.weights import to_host
from rollout.worker import RolloutRequest, RolloutWorker


@dataclass
class AdapterConfig:
    """What OpenRLHF's arguments do not say: the specrollout service config."""

    config_path: str | None = None  # specrollout YAML (engine, speculation, history, cluster sections)
    overrides: list[str] = field(default_factory=list)  # dotlist overrides, e.g. speculation.budget=fixed:4
    group_timeout_s: float = 300.0  # rendezvous and broadcast timeout of the weight group


# What create_engines uses; launch_train_ppo_ray sets it from its own flags (create_engines' signature is OpenRLHF's).
ADAPTER_CONFIG = AdapterConfig()

# The group of the generate() calls made under one generate_responses call (its tasks inherit the context).
_GROUP: contextvars.ContextVar[str | None] = contextvars.ContextVar("specrollout_group", default=None)


# ------------------------------------------------------------------------------------------ vLLM-shaped results


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # vLLM's rank of the token; not computed here
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id when one of stop_token_ids ended the sequence
    spec: dict | None = None  # speculation counters of this sample (drafted, accepted, target_forwards)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    policy_version: int = 0


# ------------------------------------------------------------------------------------------ sampling params

# Fields that shape only `CompletionOutput.text` (read by `_completion`), or nothing: the sampler does not read them.
_TEXT_ONLY = (
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "detokenize",
    "include_stop_str_in_output",
    "output_kind",
)


def _field(sp: Any, name: str, default: Any = None) -> Any:
    return sp.get(name, default) if isinstance(sp, dict) else getattr(sp, name, default)


def translate_sampling(sp: Any, prompt_len: int, max_model_len: int) -> tuple[SamplingParams, int, int | None]:
    """vLLM SamplingParams (object or dict) -> (our SamplingParams, n, logprobs); unsupported options are errors."""
    # A dict's every key is checked; an object is read for the fields we know, since vLLM's has internal ones too.
    fields = sp if isinstance(sp, dict) else {name: getattr(sp, name, None) for name in FIELDS}
    # vLLM generates to the end of the context when max_tokens is None. max_logprobs=1: OpenRLHF asks for
    # logprobs=1 and reads only the sampled token's.
    return translate(fields, default_max_tokens=max_model_len - prompt_len, max_logprobs=1, passthrough=_TEXT_ONLY)


# ------------------------------------------------------------------------------------------------- the actor


class SpecRolloutActor:
    """One specrollout engine with OpenRLHF's RolloutRayActor interface (wrap with ray.remote; see create_engines)."""

    def __init__(
        self,
        config: ServiceConfig | None = None,
        adapter: AdapterConfig | None = None,
        agent_func_path: Optional[str] = None,
        remote_rm_url: Optional[str] = None,
    ):
        self.adapter = adapter or AdapterConfig()
        # The request loop every Ray-hosted engine shares: continuous batching across concurrent calls.
        self.worker = RolloutWorker((config or ServiceConfig()).validate())
        self.engine = self.worker.engine
        self._tokenizer = None  # loaded on first use, for CompletionOutput.text
        self.executor = _agent_executor(agent_func_path, remote_rm_url)
        self._waiting = 0  # requests of calls held back (paused, or waiting to apply new weights)
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._group = None  # gloo process group, or the Ray collective group's name
        self._use_ray = False

    # -------------------------------------------------------------------- generation

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        """Token ids in, a vLLM-shaped RequestOutput out (n samples of one prompt, one group)."""
        from rollout.frontend import validate_prompt

        if multi_modal_data:
            raise ValueError("multi_modal_data is not supported: specrollout serves text-only models")
        ids = validate_prompt(prompt_token_ids, self.engine.vocab_size, self.engine.max_model_len)
        params, n, logprobs = translate_sampling(sampling_params, len(ids), self.engine.max_model_len)
        bad_stop = [t for t in params.stop_token_ids if t >= self.engine.vocab_size]
        if bad_stop:  # checked here, so a bad request cannot fail the batch it would have joined
            raise ValueError(f"stop_token_ids {bad_stop} are outside the vocabulary [0, {self.engine.vocab_size})")
        rid = f"orlhf-{uuid.uuid4().hex[:16]}"
        group = _GROUP.get() or rid
        requests = []
        for j in range(n):  # a seeded request with n > 1: distinct, reproducible seeds per sample
            p = params if params.seed is None or n == 1 else replace(params, seed=sample_seed(params.seed, j))
            requests.append(RolloutRequest(f"{rid}-{j}", ids, p, group))
        results = await self._submit(requests)
        return RequestOutput(
            rid,
            None,
            ids,
            [self._completion(j, r, params, logprobs, sampling_params) for j, r in enumerate(results)],
            policy_version=results[0].policy_version,
        )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from rollout.checkpoint import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.engine.config.model))
        return self._tokenizer

    def _completion(self, index, result, params, logprobs, sp) -> CompletionOutput:
        skip = bool(_field(sp, "skip_special_tokens", True))
        text = (
            self.tokenizer.decode(result.token_ids, skip_special_tokens=skip) if _field(sp, "detokenize", True) else ""
        )
        last = result.token_ids[-1] if result.token_ids else None
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=list(result.token_ids),
            cumulative_logprob=float(sum(result.logprobs)) if logprobs is not None else None,
            logprobs=[{t: Logprob(lp)} for t, lp in zip(result.token_ids, result.logprobs)]
            if logprobs is not None
            else None,
            finish_reason=result.finish_reason,
            stop_reason=last if result.finish_reason == "stop" and last in params.stop_token_ids else None,
            spec={
                "drafted": result.spec.drafted,
                "accepted": result.spec.accepted,
                "target_forwards": result.spec.target_forwards,
            },
        )

    async def _submit(self, requests: list[RolloutRequest]):
        """Into the worker's running batch once generation is open; the weights pushed since the last generation
        are applied first, as one policy version, when no request is in flight (a rollout has one policy)."""
        self._waiting += len(requests)
        try:
            while True:
                await self._resumed.wait()
                if not (len(self.worker.staged) and self.engine.has_unfinished()):
                    break
                await self.worker.drained()
            if len(self.worker.staged):
                self.worker.commit_weights(self.engine.policy_version + 1)
        finally:
            self._waiting -= len(requests)
        # No await between the checks above and the requests joining the engine: nothing can slip in between.
        return await self.worker.generate(requests)

    def get_num_unfinished_requests(self) -> int:
        """Requests waiting or being generated (OpenRLHF balances prompts across engines by it)."""
        return self._waiting + self.engine.num_unfinished()

    async def generate_responses(
        self, prompt: str, label: str, sampling_params, max_length: int, hf_tokenizer, num_samples: int = 1, images=None
    ):
        """num_samples rollouts of one prompt through OpenRLHF's agent executor, as one GRPO group."""
        if images:
            raise ValueError("images are not supported: specrollout serves text-only models")
        if self.executor is None:
            raise RuntimeError("generate_responses needs OpenRLHF installed in the actor's environment")
        _GROUP.set(f"orlhf-group-{uuid.uuid4().hex[:16]}")  # the gathered tasks copy this context
        return await asyncio.gather(
            *[
                self.executor.execute(
                    prompt=prompt,
                    label=label,
                    sampling_params=sampling_params,
                    max_length=max_length,
                    hf_tokenizer=hf_tokenizer,
                    llm_engine=self,
                    images=images,
                )
                for _ in range(num_samples)
            ]
        )

    async def pause_generation(self):
        """Admit no new request, and return once those in flight have finished (weights may then change)."""
        self._resumed.clear()
        await self.worker.drained()

    async def resume_generation(self):
        self._resumed.set()

    # -------------------------------------------------------------------- weights

    async def init_process_group(
        self, master_address, master_port, rank_offset, world_size, group_name, backend, use_ray
    ):
        """Join the trainer's weight group as rank `rank_offset` (one rank per engine: no tensor parallelism)."""
        if backend != "gloo":
            raise ValueError(
                f"backend={backend!r}: specrollout engines receive weights over gloo; start OpenRLHF "
                "with --vllm.sync_backend gloo --vllm.sync_with_ray"
            )
        if not 0 < rank_offset < world_size:
            raise ValueError(f"rank_offset={rank_offset} must be in [1, world_size={world_size})")
        if use_ray:
            from ray.util import collective

            await asyncio.to_thread(
                collective.init_collective_group,
                world_size,
                rank_offset,
                backend="gloo",
                group_name=group_name,
                gloo_timeout=int(self.adapter.group_timeout_s * 1000),
            )
            self._group, self._use_ray = group_name, True
        else:
            self._group = await asyncio.to_thread(
                gloo_group, master_address, master_port, rank_offset, world_size, False, self.adapter.group_timeout_s
            )
            self._use_ray = False

    async def update_weight(self, name, dtype, shape, empty_cache=False):
        """Receive one tensor from rank 0 and stage it; applied with the others before the next generation."""
        if self._group is None:
            raise RuntimeError("no weight group: call init_process_group first")
        buffer = torch.empty(tuple(shape), dtype=parse_dtype(dtype))
        await asyncio.to_thread(self._receive, buffer)
        # Checked after receiving: the trainer has sent it anyway, and the group must stay in step.
        try:
            self.worker.stage_weights([(name, buffer)])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{e}; not applied") from e

    def _receive(self, buffer: torch.Tensor) -> None:
        if self._use_ray:
            from ray.util import collective

            collective.broadcast(buffer, 0, group_name=self._group)
        else:
            broadcast(self._group, buffer, 0)

    async def update_weight_cuda_ipc(self, name, dtype, shape, ipc_handles, empty_cache=False):
        raise NotImplementedError(
            "CUDA IPC weight sharing needs a CUDA engine colocated with the trainer; "
            "specrollout engines run on CPU: use --vllm.sync_backend gloo --vllm.sync_with_ray"
        )

    async def reset_prefix_cache(self):
        """Nothing to reset: the engine keeps no prefix cache across requests."""

    async def sleep(self, level=1):
        """Accepted without effect: the engine holds no GPU memory to release."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")

    async def wake_up(self, tags=None):
        unknown = set(tags or ()) - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"unknown wake_up tags {sorted(unknown)}; known: ['kv_cache', 'weights']")

    # -------------------------------------------------------------------- introspection (not in OpenRLHF's API)

    def policy_version(self) -> int:
        return self.engine.policy_version


def _agent_executor(agent_func_path: str | None, remote_rm_url):
    """OpenRLHF's executor (single-turn, or the user's AgentExecutor from a .py file); None without OpenRLHF."""
    try:
        from openrlhf.utils.agent import AgentExecutorBase, SingleTurnAgentExecutor
    except ImportError:
        return None
    if not agent_func_path:
        return SingleTurnAgentExecutor(remote_rm_url)
    import importlib.util

    if not agent_func_path.endswith(".py"):
        raise ValueError(f"agent_func_path must be a Python file, got {agent_func_path!r}")
    spec = importlib.util.spec_from_file_location("specrollout_agent", agent_func_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, "AgentExecutor", None)
    if not (isinstance(cls, type) and issubclass(cls, AgentExecutorBase)):
        raise ValueError(f"{agent_func_path} must define AgentExecutor, a subclass of AgentExecutorBase")
    return cls()


# ----------------------------------------------------------------------------------------------- the engines


def create_engines(
    num_engines: int,
    tensor_parallel_size: int,
    pretrain: str,
    seed: int,
    full_determinism: bool,
    enable_prefix_caching: bool,
    enforce_eager: bool,
    max_model_len: int,
    shared_pg=None,
    gpu_memory_utilization=None,
    vllm_enable_sleep=False,
    logprobs_mode=None,
    agent_func_path: Optional[str] = None,
    remote_rm_url: Optional[str] = None,
    max_images_per_prompt: int = 0,
):
    """OpenRLHF's create_vllm_engines, with specrollout engines: one SpecRolloutActor per engine.

    The model is `pretrain` (the trainer's policy), the context `max_model_len`, engine i seeded with seed + i;
    the rest of the service config comes from ADAPTER_CONFIG (its YAML and overrides).
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size}: a specrollout engine is one process (use 1)")
    if max_images_per_prompt:
        raise ValueError("max_images_per_prompt > 0: specrollout serves text-only models")
    if logprobs_mode not in (None, "processed_logprobs"):
        raise ValueError(f"logprobs_mode={logprobs_mode!r}: specrollout returns processed logprobs only")
    adapter = ADAPTER_CONFIG
    env = worker_env()
    actor_cls = ray.remote(SpecRolloutActor)
    engines = []
    for i in range(num_engines):
        config = load_config(adapter.config_path, adapter.overrides)
        config.engine.model, config.engine.max_model_len, config.engine.seed = str(pretrain), max_model_len, seed + i
        config.validate()
        options: dict[str, Any] = {
            "num_cpus": config.cluster.num_cpus_per_worker,
            "num_gpus": config.cluster.num_gpus_per_worker,
            "runtime_env": {"env_vars": env},
        }
        if shared_pg is not None:  # hybrid mode: share the trainer's bundles, as OpenRLHF's engines do
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=shared_pg, placement_group_capture_child_tasks=True, placement_group_bundle_index=i
            )
            options["num_cpus"] = min(options["num_cpus"], 0.2)
        engines.append(actor_cls.options(**options).remote(config, adapter, agent_func_path, remote_rm_url))
    if vllm_enable_sleep:
        ray.get([e.sleep.remote() for e in engines])
    return engines


# ------------------------------------------------------------------------------------------------ the launcher


def trainer_weight_group(master_address: str, master_port: int, world_size: int, timeout_s: float = 300.0):
    """The trainer's end (rank 0, the store's master) of the use_ray=False weight group; broadcast with
    `broadcast_weight`. Every engine's init_process_group must be under way while this rendezvous runs."""
    return gloo_group(master_address, master_port, 0, world_size, True, timeout_s)


def broadcast_weight(group, tensor: torch.Tensor) -> None:
    broadcast(group, to_host(tensor), 0)


def split_argv(argv: list[str]) -> tuple[AdapterConfig, list[str]]:
    """Our --specrollout-* flags -> AdapterConfig; everything else is left, in order, for train_ppo_ray."""
    parser = argparse.ArgumentParser(prog="adapters.openrlhf", add_help=False, allow_abbrev=False)
    parser.add_argument("--specrollout-config", dest="config_path")
    parser.add_argument("--specrollout-override", dest="overrides", action="append", default=[])
    parser.add_argument("--specrollout-group-timeout", dest="group_timeout_s", type=float, default=300.0)
    ours, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--specrollout")]
    if stray:
        raise ValueError(f"unknown specrollout flag(s) {stray}")
    return AdapterConfig(**vars(ours)), rest


def launch_train_ppo_ray(argv: list[str] | None = None) -> None:
    """Run OpenRLHF's train_ppo_ray CLI with specrollout engines in place of vLLM's."""
    global ADAPTER_CONFIG
    adapter, rest = split_argv(sys.argv[1:] if argv is None else list(argv))
    load_config(adapter.config_path, adapter.overrides).validate()  # a bad config fails now, not in an actor
    # The trainer joins the weight group without CUDA only through Ray's gloo collective: say so before any model
    # is loaded, not when the first weight sync fails.
    missing = [
        f
        for f, ok in (
            ("--vllm.sync_backend gloo", _flag_value(rest, "--vllm.sync_backend") == "gloo"),
            ("--vllm.sync_with_ray", "--vllm.sync_with_ray" in rest),
        )
        if not ok
    ]
    if missing:
        raise ValueError(f"specrollout engines need {' '.join(missing)} (see adapters/openrlhf.py)")
    import openrlhf.trainer.ray as openrlhf_ray  # imports vllm: OpenRLHF's modules need it installed

    ADAPTER_CONFIG = adapter
    # train_ppo_ray does `from openrlhf.trainer.ray import create_vllm_engines` when it runs: patch that attribute.
    openrlhf_ray.create_vllm_engines = create_engines
    openrlhf_ray.vllm_engine.create_vllm_engines = create_engines
    sys.argv = ["openrlhf.cli.train_ppo_ray", *rest]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__":
    launch_train_ppo_ray()
