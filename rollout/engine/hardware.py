"""A short name for "this machine, this torch, this many threads", used to key measurements cached on disk."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_heap_kept = False


def keep_freed_memory() -> bool:
    """Keep the memory torch frees in this process's heap (glibc's mallopt), instead of handing it back to the OS.

    Every CPU forward and every draw allocates tensors of megabytes (a step's logits: rows x 49152 floats, their
    float64 CDF), and glibc serves those from fresh mmaps it unmaps on free, so each step pays page faults to touch
    them again. Measured on the 2-core CPU with SmolLM2: drawing a row 310 -> 130 us at 64 rows (microbenchmark);
    the host time of a batch-64 step with 4-node drafts 102 -> 54 ms on the service benchmark's proxy (docs/engine.md).
    The process keeps its peak heap instead (what vLLM's CPU backend gets from tcmalloc).
    SPECROLLOUT_KEEP_FREED_MEMORY=0 leaves the C library's defaults. Returns whether the heap is kept."""
    global _heap_kept
    if _heap_kept or os.environ.get("SPECROLLOUT_KEEP_FREED_MEMORY", "1") == "0":
        return _heap_kept
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library; absent outside glibc-like ones
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    _heap_kept = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
    return _heap_kept


def describe(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        # Timings cached per machine were taken with or without it: a different machine, as far as they go.
        "heap": "kept" if _heap_kept else "default",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read next measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fingerprint(device: torch.device) -> str:
    text = "|".join(f"{k}={v}" for k, v in sorted(describe(device).items()))
    return hashlib.sha1(text.encode()).hexdigest()[:12]
