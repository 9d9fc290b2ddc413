"""Which engine serves rollouts: engine backends by name, so the worker, the local service and the CLI build one from
the config and never name a class.

"embedded" is our own engine (rollout/engine/engine.py); "vllm" is vLLM with our drafters as its proposer
(rollout/vllm_engine.py). A backend's module is imported only when it is chosen: vLLM is an optional extra that pins
its own torch, and a machine without it must still run the embedded engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # rollout.config imports this module for the backend names: nothing of it at import time
    from rollout.config import EngineConfig, HistoryConfig, SpeculationConfig

# The one list of backends: name -> "module:Class" (rollout.config.ENGINE_BACKENDS is its names). Each class has
# from_config(engine, speculation, history, log=...) and the Engine API (add_request, step, abort, update_weights...).
BACKENDS: dict[str, str] = {
    "embedded": "rollout.engine.engine:Engine",
    "vllm": "rollout.vllm_engine:VLLMEngine",
}


def check_backend(name: str) -> str:
    """The "module:Class" of a backend name (nothing is imported); ValueError naming the known ones for any other."""
    target = BACKENDS.get(name)
    if target is None:
        raise ValueError(f"engine.backend: unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    return target


def backend_class(name: str) -> type:
    """The engine class of a backend name; ValueError naming the known ones for any other."""
    module, _, attr = check_backend(name).partition(":")
    return getattr(importlib.import_module(module), attr)


def make_engine(
    engine: EngineConfig | None = None,
    speculation: SpeculationConfig | None = None,
    history: HistoryConfig | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Any:
    """Build the engine that `engine.backend` names, from the same three config sections for every backend."""
    from rollout.config import EngineConfig

    engine = engine or EngineConfig()
    return backend_class(engine.backend).from_config(engine, speculation, history, log=log)
