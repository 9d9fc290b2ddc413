"""A short name for "this machine, this torch, this many threads", used to key measurements cached on disk."""

from __future__ import annotations

import hashlib
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


def describe(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
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
