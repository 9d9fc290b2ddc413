"""One dataclass per component, and the loader that fills them from YAML plus `key.sub=value` overrides.

The YAML in configs/ mirrors ServiceConfig: sections engine, speculation, history, cluster. OmegaConf merges the
file and the dotlist overrides onto the dataclass defaults and checks types; an unknown key is an error that names
the key and lists the keys that section knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from rollout.engines import BACKENDS, check_backend

# Engine backends, the names of rollout/engines.py's BACKENDS (it imports nothing heavy): "embedded" is our own
# engine; "vllm" is vLLM with our drafters plugged in as its proposer (rollout/vllm_engine.py; needs the optional
# vllm extra, a GPU for sampled rollouts).
ENGINE_BACKENDS = tuple(BACKENDS)


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"  # embedded name or a local transformers checkpoint folder
    max_num_seqs: int = 64  # KV slots: sequences decoded together
    max_model_len: int = 2048  # prompt + generated tokens per sequence
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    tune_matmul: bool = True  # measure the fastest matmul kernel per weight shape (cached per machine)
    matmul: str = "fast"  # "fast": fastest kernels incl. oneDNN; "mkl": transformers' kernels (see matmul.py)
    seed: int = 0  # seeds requests that bring no seed of their own
    # A request whose prompt a running sequence holds copies that prompt's keys/values instead of prefilling it
    # again (prefix caching for whole prompts: GRPO's G samples of a prompt pay for one prefill)
    share_prompts: bool = True
    backend: str = "embedded"  # one of ENGINE_BACKENDS; the fields above that vLLM has no use for are ignored there
    vllm_options: dict[str, Any] = field(default_factory=dict)  # extra vllm.LLM arguments (backend=vllm only)


@dataclass
class SpeculationConfig:
    drafter: str = "suffix"  # registered name or dotted path
    drafter_options: dict[str, Any] = field(default_factory=dict)
    budget: str = "auto"  # "auto" | "off" | "fixed:K"
    max_draft_tokens: int = 16  # hard cap on nodes per draft, whatever the budget says


@dataclass
class HistoryConfig:
    record: bool = True  # keep finished rollouts for the drafter's refresh (and for trace files)
    max_bytes: int = 512 * 2**20  # oldest policy versions are evicted first beyond this
    window_versions: int = 8  # versions kept at most
    # The target's top-k tokens and logprobs per generated token, kept beside each rollout: None records as many
    # as the drafter learns from (Drafter.top_logprobs, 0 for retrieval drafters); a number records that many
    # whatever the drafter (a trace meant for replay by drafters that learn from them).
    top_logprobs: int | None = None
    # Parquet traces of earlier rollouts (a previous run's trace.parquet, RolloutHistory.save) loaded into the
    # history when the engine is built, so the drafter starts from them rather than from nothing: a resumed or
    # repeated RL job drafts well from its first step. Their policy versions are renumbered to end just before the
    # engine's first version, so the run's own rollouts always count as newer.
    warm_start: list[str] = field(default_factory=list)

    def __post_init__(self):
        k = self.top_logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"history top_logprobs must be None or an int >= 0, got {k!r}")
        if isinstance(self.warm_start, (str, Path)):
            self.warm_start = [str(self.warm_start)]
        self.warm_start = [str(p) for p in self.warm_start]
        if self.warm_start and not self.record:
            raise ValueError("history.warm_start needs history.record: the rollouts it loads live in the history")

    def recorded_top_logprobs(self, wanted: int) -> int:
        """How many of the target's top logprobs per token an engine records, given what its drafter wants."""
        if not self.record:
            return 0
        return wanted if self.top_logprobs is None else self.top_logprobs


@dataclass
class ClusterConfig:
    num_workers: int = 1  # engine replicas, one Ray actor each
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    placement_strategy: str = "PACK"  # Ray placement group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    weight_bucket_mb: int = 256  # weights travel in buckets of at most this size, one call each
    max_worker_restarts: int = 3  # per worker; beyond this a dead worker's requests fail loudly
    ray_address: str | None = None  # None: start or join a local Ray


@dataclass
class ServiceConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> "ServiceConfig":
        """Checks OmegaConf's types cannot express; raises ValueError naming the field."""
        from drafters.base import known_drafters
        from rollout.budget import parse_budget

        e, s, c = self.engine, self.speculation, self.cluster
        check_backend(e.backend)
        if e.max_num_seqs < 1:
            raise ValueError(f"engine.max_num_seqs must be >= 1, got {e.max_num_seqs}")
        if e.max_model_len < 2:
            raise ValueError(f"engine.max_model_len must be >= 2, got {e.max_model_len}")
        if e.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"engine.dtype must be float32, bfloat16 or float16, got {e.dtype!r}")
        if e.matmul not in ("fast", "mkl"):
            raise ValueError(f"engine.matmul must be 'fast' or 'mkl', got {e.matmul!r}")
        if s.budget.strip().lower() in ("false", "no"):
            # YAML 1.1 reads a bare `off` (or `no`) as a boolean, which OmegaConf then stores as "False": the user
            # wrote `budget: off` or `speculation.budget=off` and meant the mode.
            s.budget = "off"
        if s.budget.strip().lower() != "auto":
            parse_budget(s.budget)
        if s.max_draft_tokens < 0:
            raise ValueError(f"speculation.max_draft_tokens must be >= 0, got {s.max_draft_tokens}")
        if "." not in s.drafter and ":" not in s.drafter and s.drafter not in known_drafters():
            raise ValueError(
                f"speculation.drafter: unknown drafter {s.drafter!r}; known drafters: {', '.join(known_drafters())}"
            )
        if c.num_workers < 1:
            raise ValueError(f"cluster.num_workers must be >= 1, got {c.num_workers}")
        if c.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(
                f"cluster.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                f"got {c.placement_strategy!r}"
            )
        if c.weight_bucket_mb < 1:
            raise ValueError(f"cluster.weight_bucket_mb must be >= 1, got {c.weight_bucket_mb}")
        return self


def _known_keys(cls, dotted: str) -> list[str]:
    """The field names of the section that `dotted` (e.g. 'engine.bogus') points into."""
    import typing

    node = cls
    for part in dotted.split(".")[:-1]:
        hint = typing.get_type_hints(node).get(part)
        if hint is None or not is_dataclass(hint):
            break
        node = hint
    return [f.name for f in fields(node)]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServiceConfig:
    """ServiceConfig from a YAML file (optional) and dotlist overrides like `speculation.budget=fixed:4`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    base = OmegaConf.structured(ServiceConfig)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:  # a YAML syntax error: say which file
            raise ValueError(f"cannot parse config file {path}: {exc}") from exc
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(base, *layers)
        config = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        known = _known_keys(ServiceConfig, key)
        raise ValueError(f"unknown config key {key!r}; known keys here: {', '.join(known)}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "?")
        message = str(exc).splitlines()[0]
        raise ValueError(f"config key {key!r}: {message}") from None
    return config.validate()
