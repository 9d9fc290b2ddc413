"""One dataclass per component."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"  # embedded name or a local transformers checkpoint folder
    max_num_seqs: int = 64  # KV slots: sequences decoded together
    max_model_len: int = 2048  # prompt + generated tokens per sequence
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    tune_matmul: bool = True  # measure the fastest matmul kernel per weight shape (cached per machine)
    matmul: str = "fast"  # "fast": fastest kernels incl. oneDNN; "mkl": transformers' kernels (see matmul.py)
    seed: int = 0  # seeds requests that bring no seed of their own


@dataclass
class SpeculationConfig:
    drafter: str = "none"  # registered name or dotted path
    drafter_options: dict[str, Any] = field(default_factory=dict)
    budget: str = "fixed:4"  # "off" | "fixed:K"
    max_draft_tokens: int = 16  # hard cap on nodes per draft, whatever the budget says


@dataclass
class HistoryConfig:
    record: bool = True  # keep finished rollouts for the drafter's refresh (and for trace files)
    max_bytes: int = 512 * 2**20  # oldest policy versions are evicted first beyond this
    window_versions: int = 8  # versions kept at most
