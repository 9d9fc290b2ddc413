"""The rollout history: windows over policy versions, eviction under a memory cap, Parquet round trips."""

from __future__ import annotations

import numpy as np
import pytest

from rollout.history import RolloutHistory, older_than, prompt_key, rows_to_batch, warm_start
from rollout.result import RolloutResult, SpecStats


def rows(version: int, n: int = 3, length: int = 50):
    return rows_to_batch(
        {
            "request_id": f"{version}-{i}",
            "prompt_key": None,
            "group": f"g{version}",
            "policy_version": version,
            "prompt_ids": [1, 2, i],
            "token_ids": list(range(length)),
            "logprobs": [-0.5] * length,
            "finish_reason": "stop",
        }
        for i in range(n)
    )


def test_window_and_versions():
    h = RolloutHistory()
    for v in range(5):
        h.append(rows(v))
    assert h.versions() == [0, 1, 2, 3, 4] and h.num_rows == 15
    assert h.window(2)["policy_version"].to_pylist() == [3] * 3 + [4] * 3
    assert h.table(min_version=1, max_version=2).num_rows == 6


def test_window_versions_cap_drops_the_oldest():
    h = RolloutHistory(window_versions=2)
    for v in range(4):
        h.append(rows(v))
    assert h.versions() == [2, 3]


def test_memory_cap_evicts_oldest_versions_first():
    one = rows(0).nbytes
    h = RolloutHistory(max_bytes=int(2.5 * one))
    for v in range(5):
        h.append(rows(v))
        assert h.nbytes <= 2.5 * one
    assert h.versions() == [3, 4]


def test_a_cap_that_cuts_into_the_window_is_reported_once(caplog):
    # window 4, room for 2.5 versions: from the third version on the cap, not the window, decides what drafters see.
    one = rows(0).nbytes
    h = RolloutHistory(max_bytes=int(2.5 * one), window_versions=4)
    with caplog.at_level("WARNING", logger="rollout.history"):
        for v in range(5):
            h.append(rows(v))
    assert h.versions() == [3, 4] and h.versions_evicted_by_cap == 3
    (record,) = caplog.records
    assert "fewer than window_versions=4" in record.getMessage() and "history.max_bytes" in record.getMessage()
    # Without a window the cap is the only limit: evicting is what it is for, nothing to report.
    quiet = RolloutHistory(max_bytes=int(2.5 * one))
    for v in range(5):
        quiet.append(rows(v))
    assert quiet.versions_evicted_by_cap == 0


def test_a_single_version_over_the_cap_keeps_its_newest_batch():
    h = RolloutHistory(max_bytes=1)
    h.append(rows(0))
    h.append(rows(0, n=1))
    assert h.num_rows == 1


def test_parquet_round_trip(tmp_path):
    h = RolloutHistory()
    h.append(rows(0))
    h.append_results(
        [RolloutResult("r", [5, 6], [7, 8, 9], [-0.1, -0.2, -0.3], "length", SpecStats(), group="g", policy_version=7)]
    )
    path = h.save(tmp_path / "trace.parquet")
    back = RolloutHistory.load(path)
    assert back.table().equals(h.table())
    last = back.table().to_pylist()[-1]
    assert last["prompt_key"] == prompt_key([5, 6]) and last["length"] == 3 and last["policy_version"] == 7


def test_top_logprobs_round_trip_and_traces_without_them(tmp_path):
    import pyarrow.parquet as pq

    top = RolloutResult("t", [5, 6], [7, 8], [-0.1, -0.2], "stop", SpecStats(), group="g", policy_version=1)
    top.top_token_ids, top.top_logprobs = [[7, 3], [8, 2]], [[-0.1, -2.5], [-0.2, -1.9]]
    h = RolloutHistory()
    h.append_results([top])
    path = h.save(tmp_path / "trace.parquet")
    (row,) = RolloutHistory.load(path).table().to_pylist()
    assert row["top_token_ids"] == [[7, 3], [8, 2]]
    assert np.allclose(row["top_logprobs"], [[-0.1, -2.5], [-0.2, -1.9]])  # stored as float32
    # A trace written before the columns existed loads with them null.
    old = pq.read_table(path).drop_columns(["top_token_ids", "top_logprobs"])
    pq.write_table(old, tmp_path / "old.parquet")
    (row,) = RolloutHistory.load(tmp_path / "old.parquet").table().to_pylist()
    assert row["top_token_ids"] is None and row["top_logprobs"] is None and row["token_ids"] == [7, 8]


def test_not_a_trace_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a rollout trace: missing columns"):
        RolloutHistory.load(tmp_path / "x.parquet")


def test_bad_settings():
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        RolloutHistory(max_bytes=0)
    with pytest.raises(ValueError, match="window_versions must be >= 1"):
        RolloutHistory(window_versions=0)


def test_warm_start_loads_earlier_rollouts_as_older_versions(tmp_path):
    earlier = RolloutHistory()
    for v in (3, 4, 5):
        earlier.append(rows(v))
    path = earlier.save(tmp_path / "previous" / "trace.parquet")
    h = RolloutHistory(window_versions=4)
    assert warm_start(h, [path], first_version=0) == 9
    # Renumbered to end just before the engine's first version, spacing kept: the run's own rollouts are newer.
    assert h.versions() == [-3, -2, -1]
    h.append(rows(0))
    assert h.versions() == [-3, -2, -1, 0] and h.window(1)["policy_version"].to_pylist() == [0] * 3
    h.append(rows(1))  # the window (4 versions) now drops the oldest loaded one
    assert h.versions() == [-2, -1, 0, 1]
    # Two files keep their versions relative to each other.
    other = RolloutHistory()
    other.append(rows(7))
    both = RolloutHistory()
    warm_start(both, [path, other.save(tmp_path / "other.parquet")], first_version=10)
    assert both.versions() == [5, 6, 7, 9]
    assert older_than(RolloutHistory().table(), 0).num_rows == 0  # nothing to renumber


def test_warm_start_names_a_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="history.warm_start: .*missing.parquet is not a file"):
        warm_start(RolloutHistory(), [tmp_path / "missing.parquet"], 0)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "not_a_trace.parquet")
    with pytest.raises(ValueError, match="not a rollout trace"):
        warm_start(RolloutHistory(), [tmp_path / "not_a_trace.parquet"], 0)


def test_warm_start_config():
    from rollout.config import HistoryConfig, load_config

    assert HistoryConfig(warm_start="a.parquet").warm_start == ["a.parquet"]
    with pytest.raises(ValueError, match="warm_start needs history.record"):
        HistoryConfig(warm_start=["a.parquet"], record=False)
    config = load_config(None, ["history.warm_start=[runs/a/trace.parquet,runs/b/trace.parquet]"])
    assert config.history.warm_start == ["runs/a/trace.parquet", "runs/b/trace.parquet"]
