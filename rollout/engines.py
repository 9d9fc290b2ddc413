"""Which engine serves rollouts: engine backends by name, so the worker, the local service and the CLI build one from
the config and never name a class.

"embedded" is our own engine (rollout/engine/engine.py); "vllm" is vLLM with our drafters as its proposer
(rollout/vllm_engine.py). A backend's module is imported only when it is chosen: vLLM is an optional extra that pins
its own torch, and a machine without it must still run the embedded engine.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from rollout.config import EngineConfig, HistoryConfig, SpeculationConfig

# name -> "module:Class", for the names in rollout.config.ENGINE_BACKENDS. Each class has
# from_config(engine, speculation, history, log=...) and the Engine API (add_request, step, abort, update_weights...).
BACKENDS: dict[str, str] = {
    "embedded": "rollout.engine.engine:Engine",
    "vllm": "rollout.vllm_engine:VLLMEngine",
}


def backend_class(name: str) -> type:
    """The engine class of a backend name; ValueError naming the known ones for any other."""
    target = BACKENDS.get(name)
    if target is None:
        raise ValueError(f"engine.backend: unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_engine(
    engine: EngineConfig | None = None,
    speculation: SpeculationConfig | None = None,
    history: HistoryConfig | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Any:
    """Build the engine that `engine.backend` names, from the same three config sections for every backend."""
    engine = engine or EngineConfig()
    return backend_class(engine.backend).from_config(engine, speculation, history, log=log)
