"""What every benchmark records next to its figures: machine, versions, and where the JSON goes."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def versions(*packages: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in ("torch", "transformers", "numpy", *packages):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def machine(device: str = "cpu") -> dict[str, object]:
    import torch

    from rollout.engine.hardware import describe

    info = describe(torch.device(device))
    info["cores"] = os.cpu_count()
    info["date"] = time.strftime("%Y-%m-%d")
    return info


def write(name: str, payload: dict, path: Path | str | None = None) -> Path:
    """Write results/<name>.json, or `path` when given (e.g. a GPU run that must not replace the CPU figures)."""
    path = RESULTS / f"{name}.json" if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return path
