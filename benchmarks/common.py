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


def add_run_options(parser, name: str) -> None:
    """--device, --out, --model, --quick: where a benchmark runs and where its figures go."""
    parser.add_argument("--device", default="cpu", help="torch device to run the engine on (default: cpu)")
    parser.add_argument("--out", type=Path, help=f"JSON path (default: results/{name}[_<device type>][_quick].json)")
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or a checkpoint folder")
    parser.add_argument("--quick", action="store_true", help="a reduced run that checks the wiring, not the figures")


def check_run_options(parser, args, name: str) -> None:
    """Turn --device into a torch.device it can use, and default --out so that figures from another device or a
    --quick run sit next to the CPU figures, never over them."""
    import torch

    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.out is None:
        suffix = ("" if args.device.type == "cpu" else f"_{args.device.type}") + ("_quick" if args.quick else "")
        args.out = RESULTS / f"{name}{suffix}.json"
