"""`specrollout serve --http` as an operator runs it (a process of its own, real Ray): SIGTERM stops it like Ctrl-C,
within the grace period, aborting the generation in flight, with exit status 0.

Its own module: the server's process starts a Ray of its own, which should not meet test_server_limits' Ray.
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server_limits import AUTH, KEY, LONG, MAX_LEN, Held, build_long_context_tiny, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
GRACE = 2.0


@pytest.mark.slow
def test_serve_exits_0_on_sigterm_within_the_grace_period_aborting_the_work_in_flight(tmp_path, smol_tokenizer):
    folder = tmp_path / "tiny-long"
    build_long_context_tiny(folder)
    smol_tokenizer.save_pretrained(folder)  # `serve --http` loads the model's tokenizer; prompts here are token ids
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "rollout.cli",
        "serve",
        "--http",
        "--port",
        str(port),
        "--config",
        str(ROOT / "configs" / "default.yaml"),
        "--api-key",
        KEY,
        "--shutdown-grace",
        str(GRACE),
        f"engine.model={folder}",
        f"engine.max_model_len={MAX_LEN}",
        "engine.max_num_seqs=16",
        "engine.tune_matmul=false",
        "speculation.drafter=none",
        "cluster.num_cpus_per_worker=1",
    ]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:

        def up() -> bool:
            assert process.poll() is None, f"serve exited early:\n{log.read_text()[-3000:]}"
            try:
                return requests.get(f"{url}/health", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, 600, "the server answers /health")
        long = Held(url, {"prompt": [1, 2, 3], "n": 2, **LONG})  # ~20 s of work if nothing stops it

        def generating() -> bool:
            info = requests.get(f"{url}/server_info", headers=AUTH, timeout=10).json()
            return info["limits"]["queued_seqs"] == 2

        wait_for(generating, 60, "the long request is admitted")
        time.sleep(1.0)  # and generating
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=GRACE + 120)
        elapsed = time.monotonic() - started
        output = log.read_text()
        assert status == 0, output[-3000:]
        # The grace period, then the abort and Ray's teardown: far less than the request would have taken.
        assert elapsed < GRACE + 30, f"{elapsed:.1f} s\n{output[-3000:]}"
        try:
            answer = long.conn.getresponse().status
        except (http.client.HTTPException, OSError):  # the connection closed without an answer
            answer = None
        assert answer in (503, None), "the long request was aborted (a 503 or a closed connection), not run to its end"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
