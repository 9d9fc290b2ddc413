"""How the HTTP server (adapters/vllm_server.py) runs generations: several requests at once, each one abortable,
weights changed only between them, and a bound on the work waiting.

- A runner hands a request's rollouts to the service and can end them early. A `RolloutCluster` already batches
  concurrent calls (each worker actor steps its engine for all of them) and aborts on its workers; a `LocalService`'s
  engine is driven by a `RolloutWorker` on an event loop of its own thread, the same continuous batching and aborts
  as on Ray. Any other service runs one call at a time and cannot abort.
- `WeightGate`: generations share the engine, a weight update has it to itself (no rollout mixes two policies); an
  update that waits keeps new generations out, so a stream of requests cannot starve it.
- `Admission`: at most `bound` sequences queued or running across all requests; beyond it `QueueFull` (a 429).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

from rollout.result import RolloutResult
from rollout.worker import RolloutRequest, RolloutWorker

T = TypeVar("T")


@dataclass(eq=False)
class Call:
    """One HTTP request's generation: its request ids (known once dispatched) and whether it was aborted."""

    sequences: int = 0  # completions it asked for, admitted against the bound
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    request_ids: list[str] = field(default_factory=list)
    aborted: bool = False


class QueueFull(Exception):
    pass


class Admission:
    """Counts the sequences admitted and not yet released."""

    def __init__(self, bound: int):
        self.bound = bound
        self.queued = 0
        self._lock = threading.Lock()

    def admit(self, count: int) -> None:
        with self._lock:
            if self.queued + count > self.bound:
                raise QueueFull(f"{self.queued} of at most {self.bound} sequences are queued or running")
            self.queued += count

    def release(self, count: int) -> None:
        with self._lock:
            self.queued -= count


class WeightGate:
    """A readers-writer lock that prefers the writer: generations share, a weight update is exclusive."""

    def __init__(self):
        self._cond = threading.Condition()
        self._sharing = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writing and not self._sharing)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


# ------------------------------------------------------------------------------------------------------------ runners


class ServiceRunner:
    """A service that batches concurrent `generate` calls itself and has `abort(request_ids)` (RolloutCluster)."""

    def __init__(self, service):
        self.service = service

    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        return self.service.generate(requests)

    def abort(self, request_ids: list[str]) -> int:
        return self.service.abort(request_ids)

    def exclusive(self, fn: Callable[[], T]) -> T:
        """Run fn where the engine may be changed (weights); the caller holds the WeightGate exclusively."""
        return fn()

    def close(self) -> None:
        pass


class SerialRunner(ServiceRunner):
    """Any other service: one call at a time, nothing to abort."""

    def __init__(self, service):
        super().__init__(service)
        self._lock = threading.Lock()

    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        with self._lock:
            return self.service.generate(requests)

    def abort(self, request_ids: list[str]) -> int:
        return 0


class LocalRunner(ServiceRunner):
    """A LocalService's engine behind a RolloutWorker on an event loop of its own thread: every engine call (steps,
    aborts, weight loads) runs on that thread, so the engine is never touched by two threads at once."""

    def __init__(self, service):
        super().__init__(service)
        self.worker = RolloutWorker(None, engine=service.engine)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="specrollout-engine", daemon=True)
        self._thread.start()

    def _on_loop(self, fn: Callable[..., T], *args) -> T:
        async def call():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        return asyncio.run_coroutine_threadsafe(self.worker.generate(requests), self._loop).result()

    def abort(self, request_ids: list[str]) -> int:
        return self._on_loop(self.worker.abort, request_ids)

    def exclusive(self, fn: Callable[[], T]) -> T:
        return self._on_loop(fn)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def runner_for(service) -> ServiceRunner:
    from rollout.service import LocalService

    if isinstance(service, LocalService):
        return LocalRunner(service)
    if callable(getattr(service, "abort", None)):
        return ServiceRunner(service)
    return SerialRunner(service)
