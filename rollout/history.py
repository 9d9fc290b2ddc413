"""Finished rollouts kept in Arrow: what the drafters learn from, what a trace file holds.

One row per rollout: which prompt (a hash of its token ids, so rollouts of one prompt meet across steps whatever
their request ids), which GRPO group, which policy version produced it, its tokens and logprobs. Rows arrive in
record batches, one per append; eviction drops whole policy versions, oldest first, so a drafter never sees half a
step. Parquet files written by `save` are the traces that `specrollout replay` reads.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("prompt_key", pa.string()),
        ("group", pa.string()),
        ("policy_version", pa.int64()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("token_ids", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float32())),
        ("length", pa.int32()),
        ("finish_reason", pa.string()),
        # The target's top-k tokens and logprobs at each generated position ([length][k]); null where the engine
        # did not record them (no drafter asked) and in traces written before they existed.
        ("top_token_ids", pa.list_(pa.list_(pa.int32()))),
        ("top_logprobs", pa.list_(pa.list_(pa.float32()))),
    ]
)
OPTIONAL = ("top_token_ids", "top_logprobs")  # a trace may lack these columns

log = logging.getLogger(__name__)


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """A stable 16-hex-digit name for a prompt's token ids."""
    return hashlib.blake2b(np.asarray(prompt_ids, dtype=np.int32).tobytes(), digest_size=8).hexdigest()


def conform(batch: pa.RecordBatch | pa.Table):
    """The columns of SCHEMA in its order and types; optional columns a batch lacks are added as nulls."""
    for name in OPTIONAL:
        if name not in batch.column_names:
            batch = batch.append_column(SCHEMA.field(name), pa.nulls(batch.num_rows, SCHEMA.field(name).type))
    return batch.select(SCHEMA.names).cast(SCHEMA)


def rows_to_batch(rows: Iterable[dict]) -> pa.RecordBatch:
    rows = list(rows)
    columns = {name: [r.get(name) for r in rows] for name in SCHEMA.names}
    columns["prompt_key"] = [k or prompt_key(p) for k, p in zip(columns["prompt_key"], columns["prompt_ids"])]
    columns["length"] = [len(t) for t in columns["token_ids"]]
    columns["logprobs"] = [lp if lp is not None else [] for lp in columns["logprobs"]]
    return pa.RecordBatch.from_pydict(columns, schema=SCHEMA)


def results_to_batch(results: Iterable, policy_version: int | None = None) -> pa.RecordBatch:
    """RolloutResults (rollout/result.py) -> one record batch."""
    return rows_to_batch(
        {
            "request_id": r.request_id,
            "prompt_key": None,
            "group": r.group,
            "policy_version": r.policy_version if policy_version is None else policy_version,
            "prompt_ids": r.prompt_token_ids,
            "token_ids": r.token_ids,
            "logprobs": r.logprobs,
            "finish_reason": r.finish_reason,
            "top_token_ids": r.top_token_ids,
            "top_logprobs": r.top_logprobs,
        }
        for r in results
    )


class RolloutHistory:
    """Append-only record batches with a window over policy versions and a cap on memory."""

    def __init__(self, max_bytes: int | None = None, window_versions: int | None = None):
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"history max_bytes must be positive, got {max_bytes}")
        if window_versions is not None and window_versions < 1:
            raise ValueError(f"history window_versions must be >= 1, got {window_versions}")
        self.max_bytes = max_bytes
        self.window_versions = window_versions
        self._batches: list[pa.RecordBatch] = []
        # Versions the memory cap evicted while the window still wanted them: drafters then learn from fewer
        # versions than configured (recording the target's top-k for a learning drafter adds 128 bytes a token).
        self.versions_evicted_by_cap = 0

    # ------------------------------------------------------------------ writing

    def append(self, batch: pa.RecordBatch | pa.Table) -> None:
        if isinstance(batch, pa.Table):
            batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else None
            if batch is None:
                return
        if not batch.schema.equals(SCHEMA):
            batch = conform(batch)
        if batch.num_rows:
            self._batches.append(batch)
            self._evict()

    def append_results(self, results: Iterable, policy_version: int | None = None) -> None:
        self.append(results_to_batch(results, policy_version))

    def _evict(self) -> None:
        versions = self.versions()
        if self.window_versions is not None and len(versions) > self.window_versions:
            self._drop_versions_below(versions[-self.window_versions])
        if self.max_bytes is None:
            return
        while self.nbytes > self.max_bytes and len(self.versions()) > 1:
            if self.window_versions is not None:  # the window wanted this version: say so the first time
                if not self.versions_evicted_by_cap:
                    log.warning(
                        "rollout history: max_bytes=%d MB holds %d policy versions, fewer than window_versions=%d; "
                        "drafters learn from fewer versions than configured (raise history.max_bytes)",
                        self.max_bytes >> 20,
                        len(self.versions()) - 1,
                        self.window_versions,
                    )
                self.versions_evicted_by_cap += 1
            self._drop_versions_below(self.versions()[1])
        # A single version over the cap: drop its oldest batches, keeping at least the newest one.
        while self.nbytes > self.max_bytes and len(self._batches) > 1:
            self._batches.pop(0)

    def _drop_versions_below(self, version: int) -> None:
        kept = []
        for b in self._batches:
            v = b.column("policy_version").to_numpy()
            if (v >= version).all():
                kept.append(b)
            elif (v >= version).any():
                kept.append(b.filter(pa.array(v >= version)))
        self._batches = kept

    # ------------------------------------------------------------------ reading

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._batches)

    @property
    def num_rows(self) -> int:
        return sum(b.num_rows for b in self._batches)

    def __len__(self) -> int:
        return self.num_rows

    def versions(self) -> list[int]:
        seen: set[int] = set()
        for b in self._batches:
            seen.update(np.unique(b.column("policy_version").to_numpy()).tolist())
        return sorted(seen)

    def table(self, min_version: int | None = None, max_version: int | None = None) -> pa.Table:
        table = pa.Table.from_batches(self._batches, schema=SCHEMA)
        if min_version is not None or max_version is not None:
            import pyarrow.compute as pc

            mask = pa.array(np.ones(table.num_rows, dtype=bool))
            if min_version is not None:
                mask = pc.and_(mask, pc.greater_equal(table["policy_version"], min_version))
            if max_version is not None:
                mask = pc.and_(mask, pc.less_equal(table["policy_version"], max_version))
            table = table.filter(mask)
        return table

    def window(self, last_versions: int) -> pa.Table:
        """Rows of the newest `last_versions` policy versions."""
        versions = self.versions()
        if not versions:
            return self.table()
        return self.table(min_version=versions[max(0, len(versions) - last_versions)])

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.table(), path, compression="zstd")
        return path

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "RolloutHistory":
        table = pq.read_table(path)
        missing = [n for n in SCHEMA.names if n not in table.column_names and n not in OPTIONAL]
        if missing:
            raise ValueError(f"{path} is not a rollout trace: missing columns {missing}")
        history = cls(**kwargs)
        history.append(table)
        return history


def older_than(table: pa.Table, first_version: int) -> pa.Table:
    """`table` with its policy versions shifted so that its newest is first_version - 1 (order kept)."""
    import pyarrow.compute as pc

    if not table.num_rows:
        return table
    shift = first_version - 1 - pc.max(table["policy_version"]).as_py()
    index = table.schema.get_field_index("policy_version")
    return table.set_column(index, "policy_version", pc.add(table["policy_version"], shift))


def warm_start(history: RolloutHistory, paths: Sequence[str | Path], first_version: int) -> int:
    """Append the rollouts of earlier traces to `history`, older than anything the engine will generate (newest
    version first_version - 1; several files keep their versions relative to each other); returns the rows kept."""
    tables = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"history.warm_start: {path} is not a file")
        tables.append(RolloutHistory.load(path).table())
    if tables:
        history.append(older_than(pa.concat_tables(tables), first_version))
    return history.num_rows
