"""TRL's GRPO loss computed in length-sorted chunks, so that a long-tailed batch does not train on its padding.

TRL pads every completion of a generation batch to the longest one, so a step where 8 of 32 completions run to
288 tokens and the rest end after 10-60 trains the model on 32 x 288 completion positions, most of them padding
(measured on the main job's tail task: 70-85 s of the step's training against 14-16 s of rollouts). With TRL's
default loss (`loss_type="dapo"`), the loss is a sum over tokens divided by one normaliser that spans the whole
generation batch (`num_items_in_batch`), so it is additive over samples: computing it on chunks of samples of
similar length, each with its all-padding columns cut off, and adding the chunks' losses gives the same loss and
the same gradient (up to float summation order), for a fraction of the forward and backward work.

Only the sample-additive loss is chunked; any other loss type, or inputs this module does not know how to cut
(images, tools), goes through TRL's own computation unchanged. The metrics TRL logs inside the loss (entropy, clip
ratios) are then appended once per chunk, so the logged means weight chunks alike rather than tokens.
"""

from __future__ import annotations

import torch

# Inputs of a text-only GRPO batch: row-indexed [B, ...]; completion-shaped ones are cut to the chunk's length.
PROMPT_KEYS = ("prompt_ids", "prompt_mask")  # [B, P], left-padded
COMPLETION_KEYS = (
    "completion_ids",
    "completion_mask",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
    "importance_sampling_ratio",
)  # [B, C] (or [B, 1] for a sequence-level ratio), right-padded
ROW_KEYS = ("advantages",)  # [B]
SHARED_KEYS = ("num_items_in_batch",)  # the batch-wide normaliser, the same for every chunk
KNOWN_KEYS = frozenset(PROMPT_KEYS + COMPLETION_KEYS + ROW_KEYS + SHARED_KEYS)


def length_chunks(inputs: dict, chunk_size: int) -> list[dict] | None:
    """The batch as chunks of up to `chunk_size` samples, sorted by completion length, each cut to its own longest
    prompt and completion; None when the batch holds inputs this cannot cut."""
    if set(inputs) - KNOWN_KEYS or any(inputs.get(k) is None for k in ("prompt_mask", "completion_mask")):
        return None
    completion_len = inputs["completion_mask"].sum(1)  # [B]
    prompt_len = inputs["prompt_mask"].sum(1)  # [B]
    width = inputs["completion_mask"].shape[1]
    order = torch.argsort(completion_len, stable=True)
    chunks = []
    for start in range(0, len(order), chunk_size):
        rows = order[start : start + chunk_size]
        keep_c = max(int(completion_len[rows].max()), 1)
        keep_p = max(int(prompt_len[rows].max()), 1)
        chunk = {}
        for key, value in inputs.items():
            if value is None or key in SHARED_KEYS:
                chunk[key] = value
            elif key in PROMPT_KEYS:
                chunk[key] = value[rows][:, value.shape[1] - keep_p :]
            elif value.dim() == 2 and value.shape[1] == width:  # per completion token (advantages may be too)
                chunk[key] = value[rows][:, :keep_c]
            else:
                chunk[key] = value[rows]
        chunks.append(chunk)
    return chunks


def length_chunked(trainer_cls: type, chunk_size: int = 8) -> type:
    """A subclass of TRL's GRPOTrainer whose loss runs in length-sorted chunks of `chunk_size` samples."""

    class LengthChunkedGRPOTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Only where the loss is a plain sum over samples (a batch-wide entropy quantile would not be).
            additive = self.loss_type == "dapo" and self.top_entropy_quantile == 1.0
            chunks = length_chunks(inputs, chunk_size) if additive else None
            if return_outputs or chunks is None or len(chunks) == 1:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return sum(super(LengthChunkedGRPOTrainer, self).compute_loss(model, c) for c in chunks)

    LengthChunkedGRPOTrainer.__name__ = f"LengthChunked{trainer_cls.__name__}"
    return LengthChunkedGRPOTrainer
