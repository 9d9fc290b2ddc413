"""Receiving policy weights over torch.distributed without CUDA: the gloo group and the dtypes accepted.

Shared by the vLLM-compatible server (adapters/vllm_server.py) and the OpenRLHF engine actor (adapters/openrlhf.py):
the trainer is one rank of a small gloo group, the engine another, and each tensor is one broadcast from the
trainer, announced beforehand by name, dtype and shape.
"""

from __future__ import annotations

from datetime import timedelta

import torch

# vLLM and the trainers name dtypes with or without the "torch." prefix; only these are accepted from a peer.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype from its name ("bfloat16", "torch.bfloat16"), or a torch.dtype as it is (the model checks it is
    floating when the tensor arrives); ValueError for any other name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = DTYPES.get(str(dtype).removeprefix("torch."))
    if resolved is None:
        raise ValueError(f"dtype {str(dtype)!r} is not supported; use one of {sorted(DTYPES)}")
    return resolved


def gloo_group(address: str, port: int, rank: int, world_size: int, is_master: bool, timeout_s: float):
    """A gloo process group that leaves torch.distributed's default group alone (the trainer may have its own)."""
    from torch.distributed import PrefixStore, TCPStore
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    timeout = timedelta(seconds=timeout_s)
    store = TCPStore(address, port, world_size, is_master, timeout=timeout)
    return ProcessGroupGloo(PrefixStore("specrollout-weights", store), rank, world_size, timeout)


def broadcast(group, tensor: torch.Tensor, src: int) -> None:
    """One tensor from rank `src` to every rank of `group`, in place; blocks until done."""
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank, opts.rootTensor = src, 0
    group.broadcast([tensor], opts).wait()
