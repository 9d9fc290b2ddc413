"""A slot KV cache: one fixed row of positions per running sequence.

Each sequence owns a slot; its keys/values for position i live at index i of that slot. Rolling back rejected draft
tokens is free: the engine simply keeps a shorter length, and later writes overwrite the stale entries. Running
sequences are kept in a contiguous block of slots [0, n) so that attention reads a view of the cache, never a copy;
when a sequence finishes, the last one is moved into its slot (one copy per finished sequence, not per step).
"""

from __future__ import annotations

import numpy as np
import torch


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Positions past a sequence's length are masked in attention, but a masked score times a NaN value is still NaN,
    # so never-written memory must hold finite numbers. numpy's zeros come from calloc: the kernel hands out zero pages
    # lazily, so a large cache costs memory only where sequences actually reach.
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.zeros(shape, dtype=np.uint16)).view(torch.bfloat16)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}[dtype]
    return torch.from_numpy(np.zeros(shape, dtype=np_dtype))


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        device = torch.device(device)
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = _zeros(shape, dtype, device)  # [L, S, KVH, max_len, hd]
        self.v = _zeros(shape, dtype, device)  # [L, S, KVH, max_len, hd]
        self.num_slots = num_slots
        self.max_len = max_len

    def write(self, layer: int, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values. slots, pos: [M]; k, v: [M, KVH, hd]."""
        self.k[layer, slots, :, pos] = k
        self.v[layer, slots, :, pos] = v

    def view(self, layer: int, slot_lo: int, slot_hi: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of a contiguous slot range: two views [B, KVH, ctx, hd]."""
        return self.k[layer, slot_lo:slot_hi, :, :ctx], self.v[layer, slot_lo:slot_hi, :, :ctx]

    def move_positions(self, slots: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy position src[i] to dst[i] of slot slots[i] in every layer (compacting an accepted tree path)."""
        if slots.numel() == 0:
            return
        # The engine builds these small index lists on the host; on another device they are moved once here.
        slots, src, dst = (t.to(self.k.device) for t in (slots, src, dst))
        self.k[:, slots, :, dst] = self.k[:, slots, :, src]
        self.v[:, slots, :, dst] = self.v[:, slots, :, src]

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst in every layer."""
        self.load_prefix(dst, self.k[:, src, :, :length], self.v[:, src, :, :length])

    def copy_prefix(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of a slot in every layer, as a copy that outlives the slot:
        two [L, KVH, length, hd]."""
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    def load_prefix(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a copy_prefix result into the first positions of a slot."""
        self.k[:, slot, :, : k.shape[2]] = k
        self.v[:, slot, :, : v.shape[2]] = v
