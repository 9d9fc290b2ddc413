"""What adapters talk to: a rollout service, in-process or on Ray, behind one small interface.

`RolloutService` is the protocol (generate requests, push weights with a version, refresh, history);
`RolloutCluster` (rollout/cluster.py) implements it on Ray actors, `LocalService` here on one in-process engine,
for notebooks, tests and single-process trainers that do not want Ray.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from rollout.config import ServiceConfig
from rollout.engines import make_engine
from rollout.frontend import EngineFrontend
from rollout.history import RolloutHistory
from rollout.result import RolloutResult
from rollout.weights import to_host
from rollout.worker import RolloutRequest


class RolloutService(Protocol):
    policy_version: int
    max_model_len: int  # prompt and completion together, in tokens (an HTTP chat request's default max_tokens)

    def generate(
        self, requests: list[RolloutRequest], plain: bool = False, oracle: dict[str, list[int]] | None = None
    ) -> list[RolloutResult]:
        """Results in request order; plain=True decodes without speculation, unseen by the drafter and the history
        (a benchmark's twin); oracle drafts each request from its known rollout (request id -> tokens), likewise
        unseen (the limit of speculation on that work)."""
        ...

    def stats(self) -> list[dict]:
        """Per engine replica, its running totals (EngineFrontend.counters)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, object]], version: int | None = None) -> int: ...

    def refresh(self) -> None: ...

    def rollouts(self) -> RolloutHistory: ...

    def shutdown(self) -> None: ...


class LocalService:
    """One engine in this process, with the cluster's interface."""

    def __init__(self, config: ServiceConfig | None = None, engine: EngineFrontend | None = None, log=print):
        config = (config or ServiceConfig()).validate()
        self.engine = engine or make_engine(config.engine, config.speculation, config.history, log=log)

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def generate(
        self, requests: list[RolloutRequest], plain: bool = False, oracle: dict[str, list[int]] | None = None
    ) -> list[RolloutResult]:
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within a call")
        args = ([r.prompt_token_ids for r in requests], [r.params for r in requests], [r.group for r in requests], ids)
        if not plain and oracle is None:
            return self.engine.generate(*args)
        with self.engine.plain() if plain else self.engine.oracle(oracle):
            return self.engine.generate(*args)

    def stats(self) -> list[dict]:
        return [{"worker": 0, **self.engine.counters()}]

    def update_weights(self, named_tensors: Iterable[tuple[str, object]], version: int | None = None) -> int:
        named = [(n, to_host(t)) for n, t in named_tensors]
        return self.engine.update_weights(named, version)

    def refresh(self) -> None:
        self.engine.refresh_drafter()

    def rollouts(self) -> RolloutHistory:
        self.engine.take_finished()
        return self.engine.history

    def shutdown(self) -> None:
        pass
