"""RolloutCluster: N engine replicas on Ray, group-affine dispatch, versioned weight broadcast, restarts.

- Dispatch: all samples of a prompt (its GRPO group) go to one worker, in one call, so that worker's drafter sees
  every sibling; groups go to the worker with the fewest outstanding tokens.
- Weights: the trainer's named tensors are cut into buckets of at most `cluster.weight_bucket_mb` (a larger tensor
  travels alone; rollout/weights.py); each bucket is put in Ray's object store once and staged on every worker with
  one call; `commit(version)` then applies them atomically everywhere. A wrong name, shape or dtype is refused at
  staging, on every worker, before anything changes.
- History: at each weight sync the rollouts finished on each worker are shared with all the others, so every
  drafter learns from the whole batch; the cluster keeps the merged window for workers that restart.
- Faults: a worker that dies mid-rollout is replaced, brought to the current weights, version and history before
  it serves again, and the groups it had not answered are dispatched again. Every request is answered once.

Ray is imported lazily, so the engine and drafters work without it.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Iterable

import pyarrow as pa

from rollout.config import ServiceConfig
from rollout.history import RolloutHistory, prompt_key
from rollout.result import RolloutResult
from rollout.weights import buckets, to_host
from rollout.worker import RolloutRequest

log = logging.getLogger(__name__)

# The environment every engine actor gets from the process that starts it (this cluster, verl's replicas, OpenRLHF's
# create_engines): Ray's workers start from the raylet's environment, which is not the driver's when Ray was
# started elsewhere (`ray start`, a shared cluster).
WORKER_ENV = (
    "HF_HUB_OFFLINE",  # the model and tokenizer resolve from the local cache as in the driver, never from the Hub
    "TRANSFORMERS_OFFLINE",  # likewise for transformers' own loaders
    "SPECROLLOUT_CACHE",  # converted checkpoints and measured matmul plans: the driver's, not converted again
    "HOME",  # where ~/.cache/huggingface and the default SPECROLLOUT_CACHE live
    "SPECROLLOUT_VLLM_KWARGS",  # extra vllm.LLM arguments (engine.backend=vllm), read where the engine is built
    "RAY_AUTH_MODE",  # the actor's own Ray calls (ray.util.collective's weight group for OpenRLHF) authenticate alike
)


def worker_env(**defaults: str) -> dict[str, str]:
    """The WORKER_ENV variables set here, over `defaults` (what a worker gets when the driver sets nothing)."""
    return {**defaults, **{k: os.environ[k] for k in WORKER_ENV if k in os.environ}}


@dataclass
class _Weights:
    """The latest value of every parameter pushed so far, as object-store buckets, for workers that restart."""

    version: int = 0
    buckets: list[tuple[object, set[str]]] = field(default_factory=list)  # (object ref, names it still provides)

    def add(self, ref, names: set[str]) -> None:
        for _, held in self.buckets:
            held -= names
        self.buckets = [(r, held) for r, held in self.buckets if held] + [(ref, set(names))]


class RolloutCluster:
    def __init__(self, config: ServiceConfig):
        import ray
        from ray.util.placement_group import placement_group

        self.config = config.validate()
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=config.cluster.ray_address, ignore_reinit_error=True, log_to_driver=False)
        c = config.cluster
        bundle = {"CPU": c.num_cpus_per_worker}
        if c.num_gpus_per_worker:
            bundle["GPU"] = c.num_gpus_per_worker
        self._pg = placement_group([dict(bundle)] * c.num_workers, strategy=c.placement_strategy)
        ray.get(self._pg.ready(), timeout=600)
        self._actor_cls = ray.remote(max_restarts=0)(_worker_class())
        self.workers = [self._spawn(i) for i in range(c.num_workers)]
        self.restarts = [0] * c.num_workers
        self._outstanding = [0] * c.num_workers
        # generate() may run in several threads at once (the HTTP server's concurrent requests): one replacement per
        # dead worker, whichever thread sees it die first.
        self._restart_lock = threading.Lock()
        self._alarms: set[tuple[int, str]] = set()  # drafter alarms already relayed
        self._weights = _Weights()
        self.history = RolloutHistory(config.history.max_bytes, config.history.window_versions)
        self.info = ray.get(self.workers[0].info.remote())
        ray.get([w.health.remote() for w in self.workers])

    def _spawn(self, index: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        c = self.config.cluster
        return self._actor_cls.options(
            num_cpus=c.num_cpus_per_worker,
            num_gpus=c.num_gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=index
            ),
            runtime_env={"env_vars": worker_env(HF_HUB_OFFLINE="1")},
        ).remote(self.config, index)

    # ------------------------------------------------------------------ generation

    def _validate(self, requests: list[RolloutRequest]) -> None:
        from rollout.frontend import validate_prompt

        seen = set()
        for r in requests:
            validate_prompt(r.prompt_token_ids, self.info["vocab_size"], self.info["max_model_len"])
            if r.request_id in seen:
                raise ValueError(f"request_id {r.request_id!r} appears twice in one call")
            seen.add(r.request_id)

    def generate(
        self, requests: list[RolloutRequest], plain: bool = False, oracle: dict[str, list[int]] | None = None
    ) -> list[RolloutResult]:
        """Run the requests to completion across the workers; results in request order, each exactly once.
        plain=True: without speculation, unseen by the drafters and the histories (a benchmark's twin); oracle:
        each request drafted from its known rollout (request id -> tokens), likewise unseen."""
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        requests = [r if r.request_id else replace(r, request_id=uuid.uuid4().hex) for r in requests]
        self._validate(requests)  # every bad request is refused before any is dispatched
        groups: OrderedDict[str, list[RolloutRequest]] = OrderedDict()
        for r in requests:
            groups.setdefault(r.group or prompt_key(r.prompt_token_ids), []).append(r)
        pending: dict[object, tuple[int, object, list[RolloutRequest], int]] = {}

        def least_loaded(load: list[int]) -> int:
            return min(range(len(load)), key=load.__getitem__)

        def submit(reqs: list[RolloutRequest], w: int | None = None) -> None:
            if w is None:
                w = least_loaded(self._outstanding)
            tokens = sum(r.params.max_tokens for r in reqs)
            self._outstanding[w] += tokens
            actor = self.workers[w]
            known = None if oracle is None else {r.request_id: oracle.get(r.request_id, []) for r in reqs}
            pending[actor.generate.remote(reqs, plain, known)] = (w, actor, reqs, tokens)

        if plain or oracle is not None:
            # A twin runs alone on a worker (the mode is the engine's), so one call per worker carries all of its
            # groups: sent group by group, they would run one after the other, not batched as the speculative call.
            per_worker: dict[int, list[RolloutRequest]] = {}
            load = list(self._outstanding)
            for reqs in groups.values():
                w = least_loaded(load)
                load[w] += sum(r.params.max_tokens for r in reqs)
                per_worker.setdefault(w, []).extend(reqs)
            for w, reqs in per_worker.items():
                submit(reqs, w)
        else:
            for reqs in groups.values():
                submit(reqs)
        results: dict[str, RolloutResult] = {}
        while pending:
            ready, _ = self._ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            w, actor, reqs, tokens = pending.pop(ref)
            self._outstanding[w] -= tokens
            try:
                out = self._ray.get(ref)
            except (RayActorError, ActorUnavailableError):
                with self._restart_lock:
                    if self.workers[w] is actor:  # first failure seen from this incarnation: replace it
                        self._restart(w)
                submit(reqs)
                continue
            except RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
            for r in out:
                if r.request_id in results:
                    raise RuntimeError(f"request {r.request_id} was answered twice")
                results[r.request_id] = r
        return [results[r.request_id] for r in requests]

    def abort(self, request_ids: list[str]) -> int:
        """End these requests early wherever they run: their `generate` call gets the partial rollouts (finish_reason
        "abort"), which no history keeps. Ids not in flight are skipped; returns how many were aborted."""
        ids = list(request_ids)
        return sum(self._ray.get([w.abort.remote(ids) for w in self.workers]))

    # ------------------------------------------------------------------ weights and history

    def update_weights(self, named_tensors: Iterable[tuple[str, object]], version: int | None = None) -> int:
        """Broadcast new policy weights (one call per bucket per worker), then switch every worker to `version`."""
        from ray.exceptions import RayTaskError

        version = self._weights.version + 1 if version is None else int(version)
        self.stats()  # the version ending now: relay a drafter alarm raised during it
        self.sync_history()
        refs = []
        try:
            named = ((name, to_host(tensor)) for name, tensor in named_tensors)
            for bucket in buckets(named, self.config.cluster.weight_bucket_mb * 2**20):
                ref = self._ray.put(bucket)
                refs.append((ref, {name for name, _ in bucket}))
                self._ray.get([w.stage_weights.remote(ref) for w in self.workers])
            self._ray.get([w.commit_weights.remote(version) for w in self.workers])
        except RayTaskError as exc:
            self._ray.get([w.discard_weights.remote() for w in self.workers])
            raise exc.as_instanceof_cause() from None
        for ref, names in refs:
            self._weights.add(ref, names)
        self._weights.version = version
        return version

    def sync_history(self) -> int:
        """Share the rollouts each worker finished since the last sync with all the others."""
        tables = self._ray.get([w.export_rollouts.remote() for w in self.workers])
        calls = []
        for i, w in enumerate(self.workers):
            others = [t for j, t in enumerate(tables) if j != i and t.num_rows]
            if others:
                calls.append(w.import_rollouts.remote(pa.concat_tables(others)))
        self._ray.get(calls)
        for t in tables:
            if t.num_rows:
                self.history.append(t)
        return sum(t.num_rows for t in tables)

    def rollouts(self) -> RolloutHistory:
        """Every rollout the workers finished (within the history window), shared first."""
        self.sync_history()
        return self.history

    def refresh(self) -> None:
        """Share histories and refresh every drafter at the current version (between rounds without new weights)."""
        self.sync_history()
        self._ray.get([w.refresh.remote() for w in self.workers])

    # ------------------------------------------------------------------ faults

    def _restart(self, index: int) -> None:
        c = self.config.cluster
        self.restarts[index] += 1
        if self.restarts[index] > c.max_worker_restarts:
            raise RuntimeError(f"worker {index} died {self.restarts[index]} times; giving up")
        try:
            self._ray.kill(self.workers[index], no_restart=True)
        except Exception:
            pass  # already gone
        worker = self._spawn(index)
        self._ray.get(worker.health.remote())
        if self.history.num_rows:
            self._ray.get(worker.import_rollouts.remote(self.history.table()))
        for ref, _ in self._weights.buckets:
            self._ray.get(worker.stage_weights.remote(ref))
        self._ray.get(worker.commit_weights.remote(self._weights.version))
        self.workers[index] = worker
        self._outstanding[index] = 0

    # ------------------------------------------------------------------ introspection

    @property
    def policy_version(self) -> int:
        return self._weights.version

    @property
    def max_model_len(self) -> int:
        return self.info["max_model_len"]

    def health(self) -> list[dict]:
        return self._ray.get([w.health.remote() for w in self.workers])

    def stats(self) -> list[dict]:
        rows = self._ray.get([w.stats.remote() for w in self.workers])
        self._relay_alarms(rows)
        return rows

    def _relay_alarms(self, rows: list[dict]) -> None:
        """A worker's drafter alarm (rollout/drafter_health.py) is logged in its own process, which Ray does not
        forward here: log each one again in the driver, once."""
        for row in rows:
            alarm = row.get("drafter_alarm")
            if alarm and (row["worker"], alarm) not in self._alarms:
                self._alarms.add((row["worker"], alarm))
                log.warning("worker %s: %s", row["worker"], alarm)

    def shutdown(self) -> None:
        """Kill the workers and free their placement group; calling it again does nothing."""
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            try:
                self._ray.kill(w, no_restart=True)
            except Exception:
                pass
        self.workers = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def _worker_class():
    """The actor class: RolloutWorker plus what the cluster needs to know about the model."""
    from rollout.worker import RolloutWorker

    class RolloutWorkerActor(RolloutWorker):
        def info(self) -> dict:
            return {
                "vocab_size": self.engine.vocab_size,
                "max_model_len": self.engine.max_model_len,
                "architecture": self.engine.architecture,
            }

    return RolloutWorkerActor
