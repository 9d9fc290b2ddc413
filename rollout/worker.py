"""One engine replica as a Ray actor: thin, every method delegates to the engine.

The actor is asynchronous: `generate` queues its requests into the engine and awaits them while one background
task steps the engine, so requests from concurrent calls share each step (continuous batching across calls).
`generate(requests, plain=True)` decodes a call without speculation (a benchmark's twin): it waits until the engine
is idle, runs alone in the engine's plain mode, and speculative calls that arrive meanwhile wait for it.
`abort(ids)` ends requests in flight early: their calls get the partial rollouts (finish_reason "abort"), which stay
out of the history. Weights arrive in buckets (`stage_weights`, one call per bucket) and take effect atomically at
`commit_weights(version)`, which also refreshes the drafter; a bucket with a wrong name, shape or dtype is refused
when staged, before anything changes.

The class is plain Python; rollout/cluster.py wraps it with `ray.remote`, so importing this module needs no Ray.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from rollout.config import ServiceConfig
from rollout.engines import make_engine
from rollout.history import SCHEMA, results_to_batch
from rollout.result import RolloutResult
from rollout.sampling import SamplingParams
from rollout.weights import WeightStager

if TYPE_CHECKING:
    from rollout.frontend import EngineFrontend


@dataclass
class RolloutRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    group: str | None = None


class RolloutWorker:
    def __init__(self, config: ServiceConfig | None, index: int = 0, engine: EngineFrontend | None = None):
        """`engine`: an engine built already (the HTTP server drives a LocalService's engine through this class, for
        its batching across calls and its aborts); otherwise one is built from `config`."""
        self.index = index
        self.engine = engine if engine is not None else make_engine(config.engine, config.speculation, config.history)
        self._futures: dict[str, asyncio.Future] = {}
        self._stream_queues: dict[str, asyncio.Queue] = {}
        self._stepper: asyncio.Task | None = None
        self._plain_call = asyncio.Lock()  # held by a plain call from before it starts until its last result
        self.staged = WeightStager(self.engine.model.check_weight)  # the weight update being pushed

    # ------------------------------------------------------------------ generation

    def _add(self, requests: list[RolloutRequest]) -> list[str]:
        """Queue all requests or none: a bad one aborts those of its call already queued."""
        added: list[str] = []
        try:
            for r in requests:
                added.append(self.engine.add_request(r.prompt_token_ids, r.params, r.request_id, r.group))
        except Exception:
            for rid in added:
                self.engine.abort(rid)
            raise
        return added

    def _ensure_stepping(self) -> None:
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.get_running_loop().create_task(self._step_loop())

    async def _step_loop(self) -> None:
        while self.engine.has_unfinished():
            try:
                finished = self.engine.step()
            except Exception as exc:  # a drafter or engine fault: fail the waiting calls, keep the actor alive
                for rid in list(self._futures):
                    self.engine.abort(rid)
                    self._futures.pop(rid).set_exception(exc)
                return
            for result in finished:
                result.worker = self.index
                future = self._futures.pop(result.request_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
            # Let other calls (new requests, health checks) in between steps.
            await asyncio.sleep(0)

    async def drained(self) -> None:
        """Return once no request is in flight (weights may then change); new calls may still add requests after."""
        while self.engine.has_unfinished():
            self._ensure_stepping()
            # Shielded: a caller cancelled while waiting must not cancel the step loop other calls wait on.
            await asyncio.shield(self._stepper)

    async def generate(
        self, requests: list[RolloutRequest], plain: bool = False, oracle: dict[str, list[int]] | None = None
    ) -> list[RolloutResult]:
        """Generate to completion; results in request order. plain=True: without speculation, unseen by the
        drafter and the history (see the module docstring); oracle: drafted from these known rollouts (request
        id -> tokens), likewise unseen (Engine.oracle)."""
        if not plain and oracle is None:
            async with self._plain_call:  # only waits while a plain call runs
                futures = self._queue(requests)
            return list(await asyncio.gather(*futures))
        async with self._plain_call:
            await self.drained()
            with self.engine.plain() if plain else self.engine.oracle(oracle):
                futures = self._queue(requests)
                return list(await asyncio.gather(*futures))

    def abort(self, request_ids: list[str] | None = None) -> int:
        """Abort the given requests (default: all in flight): their callers get the partial rollout with
        finish_reason "abort", which never enters the history. Ids not in flight are skipped. Returns how many were
        aborted."""
        aborted = 0
        for rid in list(self._futures) if request_ids is None else request_ids:
            future = self._futures.pop(rid, None)
            result = self.engine.abort(rid)
            if future is not None and result is not None and not future.done():
                result.worker = self.index
                future.set_result(result)
                aborted += 1
        return aborted

    def _queue(self, requests: list[RolloutRequest]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [self._futures.setdefault(rid, loop.create_future()) for rid in self._add(requests)]
        self._ensure_stepping()
        return futures

    # ------------------------------------------------------------------ weights

    def stage_weights(self, bucket: list[tuple[str, object]]) -> int:
        """Check one bucket of (name, tensor) against the model and keep it until commit; returns tensors staged.
        A bad tensor refuses the bucket and drops the update staged so far (rollout/weights.py)."""
        return self.staged.stage(bucket)

    def commit_weights(self, version: int) -> int:
        """Apply the staged buckets as policy `version` and refresh the drafter."""
        return self.engine.update_weights(self.staged.commit(), version)

    def discard_weights(self) -> None:
        self.staged.discard()

    # ------------------------------------------------------------------ history

    def export_rollouts(self) -> pa.Table:
        """Rollouts finished here since the last export (they also enter this worker's own history)."""
        new = self.engine.take_finished()
        if not new:
            return SCHEMA.empty_table()
        return pa.Table.from_batches([results_to_batch(new)])

    def import_rollouts(self, table: pa.Table) -> int:
        """Other workers' rollouts: appended to the history the drafter refreshes from."""
        if table.num_rows and self.engine.history is not None:
            self.engine.history.append(table)
        return table.num_rows

    def refresh(self) -> int:
        self.engine.refresh_drafter()
        return self.engine.policy_version

    # ------------------------------------------------------------------ introspection

    def health(self) -> dict:
        return {
            "worker": self.index,
            "ok": True,
            "policy_version": self.engine.policy_version,
            "unfinished": self.engine.num_unfinished(),
            "pid": os.getpid(),
        }

    def stats(self) -> dict:
        return {"worker": self.index, **self.engine.counters()}
