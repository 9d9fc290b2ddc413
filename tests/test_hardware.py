"""Loading a model on the CPU keeps freed memory in the heap: what torch frees is reused without page faults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocates, touches and frees a 64 MB tensor eight times after loading the model, and counts the page faults the
# last seven cost: a heap that keeps freed memory serves them from pages already touched.
PROBE = """
import resource, sys, torch
from rollout.engine.hardware import describe
from rollout.engine.model import TargetModel
TargetModel.from_folder(sys.argv[1], max_model_len=64)
torch.ones(16 * 1024 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(7):
    torch.ones(16 * 1024 * 1024)
print(describe(torch.device("cpu"))["heap"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(folder: Path, **env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    heap, faults = out.stdout.split()[-2:]
    return heap, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's")
def test_cpu_model_keeps_freed_memory_and_the_opt_out_does_not(tiny_folder):
    heap, faults = probe(tiny_folder)
    assert heap == "kept"
    default, default_faults = probe(tiny_folder, SPECROLLOUT_KEEP_FREED_MEMORY="0")
    assert default == "default"
    # Each 64 MB touched afresh costs a fault per page (16384 of 4 KB; 32 where transparent huge pages back it).
    # Kept, the freed pages come back: at most the first allocation or two of the seven fault.
    assert faults <= 2 * 16384 + 1000
    assert default_faults >= 7 * 32
    assert default_faults > 3 * faults
