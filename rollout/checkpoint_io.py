"""Reading a transformers checkpoint folder's safetensors: which tensors it has, their shapes, the tensors.

One reader for everything that opens a target's weights: the embedded engine (rollout/engine/model.py), the
parametric drafter (drafters/model.py, which builds on the target's first layers) and the vLLM engine's weight
checks (rollout/vllm_engine.py, which needs names and shapes only). It lives outside rollout/engine/ so drafters can
use it without depending on the engine; it imports nothing of this project, and safetensors/torch only when tensors
are read (names and shapes come from the files' JSON headers: the vLLM engine's process never loads a tensor here).

A sharded checkpoint names its files in model.safetensors.index.json; when it has one, that index says which file
holds which tensor, otherwise every *.safetensors file of the folder is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

INDEX = "model.safetensors.index.json"


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's weight files, sorted: those its index names, else every *.safetensors of the folder."""
    folder = Path(folder)
    index = folder / INDEX
    if index.exists():
        return sorted({folder / file for file in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


def _header(path: Path) -> dict:
    """A safetensors file's header: name -> {dtype, shape, data_offsets}, plus __metadata__ (read without torch)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))


def tensor_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the file holding it."""
    folder = Path(folder)
    index = folder / INDEX
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    return {name: path for path in safetensors_files(folder) for name in _header(path) if name != "__metadata__"}


def tensor_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the files' headers: no tensor is loaded."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files(folder):
        for name, meta in _header(path).items():
            if name != "__metadata__":
                shapes[name] = tuple(meta["shape"])
    return shapes


def read_tensors(folder: str | Path, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, "object"]]:
    """(name, torch.Tensor) for every tensor of the checkpoint (those `wanted` accepts), file by file, in each
    file's order; tensors are loaded one at a time, as they are asked for."""
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if wanted is None or wanted(name):
                    yield name, f.get_tensor(name)
