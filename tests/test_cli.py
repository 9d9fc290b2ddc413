"""The `specrollout` command end to end, in a subprocess as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "benchmarks" / "traces" / "smollm2_t0.6.parquet"


def specrollout(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "rollout.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_replay_a_committed_trace(tmp_path):
    out = tmp_path / "replay.json"
    run = specrollout("replay", str(TRACE), "--drafter", "ngram", "--drafter", "none", "--json", str(out))
    assert run.returncode == 0, run.stderr
    assert "ngram: acceptance length" in run.stdout
    report = json.loads(out.read_text())
    assert report["none"]["acceptance_length"] == 1.0
    assert report["ngram"]["acceptance_length"] > 1.0


def test_replay_warm_started_from_an_earlier_trace(tmp_path):
    # The T=0.6 trace's prompts are the T=1.0 trace's: warm-started from it, ngram is unchanged (it reads only the
    # request itself) while suffix drafts its first round from the earlier rollouts of the same prompts.
    other = ROOT / "benchmarks" / "traces" / "smollm2_t1.0.parquet"
    out = {}
    for name, extra in (("cold", []), ("warm", ["--warm-start", str(other)])):
        out[name] = tmp_path / f"{name}.json"
        run = specrollout("replay", str(TRACE), "--drafter", "suffix", "--json", str(out[name]), *extra)
        assert run.returncode == 0, run.stderr
    cold, warm = (json.loads(out[k].read_text())["suffix"]["per_version"]["0"] for k in ("cold", "warm"))
    assert warm["acceptance_length"] > cold["acceptance_length"]
    run = specrollout("replay", str(TRACE), "--drafter", "suffix", "--warm-start", str(tmp_path / "nope.parquet"))
    assert run.returncode == 2 and "history.warm_start:" in run.stderr and "nope.parquet is not a file" in run.stderr


def test_unknown_drafter_is_a_clear_error():
    run = specrollout("replay", str(TRACE), "--drafter", "nope")
    assert run.returncode == 2
    assert "unknown drafter 'nope'; known drafters:" in run.stderr


def test_bad_option_is_a_clear_error():
    run = specrollout("replay", str(TRACE), "--drafter", "suffix", "--option", "decay")
    assert run.returncode == 2 and "--option expects key=value" in run.stderr


@pytest.mark.slow
def test_generate_is_resumable(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"id": "a", "prompt": "Count to five.", "n": 2}\n{"id": "b", "prompt_ids": [1, 2, 3], "n": 1}\n'
    )
    out = tmp_path / "r.parquet"
    args = [
        "generate",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-tokens",
        "8",
        "speculation.budget=fixed:2",
        "engine.max_model_len=256",
    ]
    first = specrollout(*args)
    assert first.returncode == 0, first.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert sorted(table["request_id"].to_pylist()) == ["a:0", "a:1", "b:0"]
    again = specrollout(*args)
    assert again.returncode == 0 and "2 of 2 prompts already done" in again.stdout


def test_bad_prompts_file_names_the_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"oops": 1}\n')
    run = specrollout("generate", "--prompts", str(prompts), "--out", str(tmp_path / "r.parquet"))
    assert run.returncode == 2 and "p.jsonl:2: each line needs one of" in run.stderr


@pytest.mark.slow
def test_ray_job_submission_example(tmp_path):
    out = tmp_path / "job.parquet"
    run = subprocess.run(
        ["bash", "examples/ray_job.sh", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        # The `ray` CLI of this interpreter's environment, whether or not that environment is activated.
        env=dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            RAY_AUTH_MODE="disabled",
            PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        ),
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 32
