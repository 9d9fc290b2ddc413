"""Pushed policy weights, one way for every engine host: checked as they arrive, kept until commit, cut in buckets.

- `WeightStager` holds one update in the making. Each bucket of (name, tensor) is checked whole against the model
  (its name, shape and dtype: the model's `check_weight`) before any of it is kept; a refused bucket abandons the
  update (everything staged so far is dropped), so a half-staged update never leaks into the next one. `commit()`
  hands the staged tensors over, all together, and starts the next update empty; `discard()` drops them.
- `buckets` cuts a stream of named tensors into lists of at most `limit_bytes` each: a bucket closes before the
  tensor that would take it past the limit, and a tensor larger than the limit travels alone.

Used by RolloutWorker (the cluster's and verl's engine actors), the OpenRLHF actor, the vLLM-compatible server, the
vLLM engine (its RPCs to vLLM's workers) and the senders that bucket (RolloutCluster, verl's trainer side).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

# (name, tensor) -> the model's name for it once checked, or None for a tensor the model skips (rotary buffers);
# raises ValueError/TypeError naming the parameter. TargetModel.check_weight and CheckpointWeights.check_weight.
CheckWeight = Callable[[str, Any], "str | None"]


class WeightStager:
    """One weight update in the making: checked buckets, kept until `commit`.

    `check=None` keeps tensors as they come, for a holder whose receiver checks them itself when they are applied
    (a RolloutCluster checks every bucket on every worker before anything changes)."""

    def __init__(self, check: CheckWeight | None = None):
        self._check = check
        self._staged: list[tuple[str, Any]] = []

    def stage(self, bucket: Iterable[tuple[str, Any]]) -> int:
        """Check every tensor of the bucket, then keep them all; returns how many tensors wait for commit.

        A bad tensor raises (the check's ValueError/TypeError) before any of the bucket is kept, and drops what
        earlier buckets staged: the update it belonged to can no longer be applied whole."""
        checked: list[tuple[str, Any]] = []
        try:
            for name, tensor in bucket:
                key = name if self._check is None else self._check(name, tensor)
                if key is not None:
                    checked.append((key, tensor))
        except Exception:
            self.discard()
            raise
        self._staged.extend(checked)
        return len(self._staged)

    def commit(self) -> list[tuple[str, Any]]:
        """The staged tensors, under the model's names, to apply together; the stager is empty afterwards."""
        staged, self._staged = self._staged, []
        return staged

    def discard(self) -> None:
        self._staged = []

    def __len__(self) -> int:
        return len(self._staged)


def nbytes(tensor: Any) -> int:
    """Bytes a tensor's data takes (0 for anything that is not a tensor: the receiver's check refuses it)."""
    return tensor.numel() * tensor.element_size() if hasattr(tensor, "numel") else 0


def to_host(tensor: Any) -> Any:
    """A tensor as it travels between processes: detached, on the CPU, contiguous; anything else as it is."""
    return tensor.detach().to("cpu").contiguous() if hasattr(tensor, "detach") else tensor


def buckets(named: Iterable[tuple[str, Any]], limit_bytes: int) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive lists of the named tensors of at most `limit_bytes` each, streamed (a generator of weights is
    read as buckets are taken). A bucket closes before the tensor that would take it past the limit; a tensor
    larger than the limit is a bucket of its own. Nothing is yielded for no tensors."""
    if limit_bytes < 1:
        raise ValueError(f"bucket limit must be >= 1 byte, got {limit_bytes}")
    bucket: list[tuple[str, Any]] = []
    size = 0
    for name, tensor in named:
        n = nbytes(tensor)
        if bucket and size + n > limit_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
    if bucket:
        yield bucket
