"""The suffix drafter: continuations retrieved from the policy's own rollouts, group first.

Sources, in the order they usually pay:
1. the group: the GRPO siblings in flight (their tokens are visible as soon as the engine observes them) and the
   earlier rollouts of the same prompt kept from the history window. Siblings sample the same distribution from
   the same prompt, so where one has been, another is likely to go;
2. the request itself (prompt and output so far): copied spans and repeated formats, as prompt lookup finds them;
3. other groups in flight (formats shared across prompts), indexed by their last three tokens;
4. the global window: recent rollouts of all prompts, in a token index (drafters/token_index.py explains it).

Every match is a candidate continuation, weighted by its source, by how recent the policy version that wrote it is
(decay ** versions_old) and by how long the match is; the candidates are merged into a trie and expanded best-first
into a tree of at most max_tokens nodes, cut where the estimated path probability falls below min_prob. refresh()
rebuilds the global window and the per-prompt store from the history; between refreshes, finished rollouts are added
as they end.

`SuffixDrafter` runs all of that in a compiled core (drafters/csrc/suffix_core.h, loaded by drafters/native.py,
which says why C++), once per engine step for the whole batch: `propose_batch` and `observe_batch`. What stays in
Python is the request-id -> slot map and the Arrow reading at refresh. `drafters/suffix_reference.py` is the same
algorithm in Python and numpy, registered as `suffix_reference`: the tests hold the core to it draft for draft.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drafters.base import EMPTY_DRAFT, BaseDrafter, Draft, register_drafter
from drafters.matching import TreeConfig
from drafters.native import load_native
from drafters.options import DrafterOptions, build_options
from rollout.history import prompt_key

BUCKET_BITS = 20  # the global index's hash table: 2**20 chains (4 MiB)


@dataclass
class SuffixConfig(DrafterOptions):
    drafter: ClassVar[str] = "suffix"

    decay: float = 0.5  # weight of a rollout one policy version old, relative to the current version
    window_versions: int = 8  # global window and per-prompt store keep this many versions (GRPO revisits a
    # prompt every dataset/prompts-per-step steps: 4 in the main job)
    group_weight: float = 4.0  # a match in a sibling counts this many times a global one
    # The request's own prompt and output: prompt lookup. One matching token is enough (as vLLM's n-gram drafter
    # allows) because a copied span is usually entered by a token that occurs once in the prompt; the extra weight
    # lets such a match outvote a global one of the same length.
    self_weight: float = 3.0
    global_weight: float = 1.0  # finished rollouts of other prompts, and in-flight outputs of other groups
    min_match_group: int = 1
    min_match_self: int = 1
    min_match_global: int = 2  # the global index is keyed by token pairs; in-flight outputs of other groups need 3
    max_rollouts_per_prompt: int = 64  # earlier rollouts of one prompt kept for its group
    global_max_tokens: int = 2_000_000
    prompt_tail: int = 16  # prompt tokens stored ahead of each rollout in the global index
    max_walk: int = 32  # candidates examined per query of the global window and of other groups in flight
    tree: TreeConfig = field(default_factory=TreeConfig)  # its fields are options by their own names, flat

    def validate(self) -> None:
        if _is_number(self.decay) and not 0 < self.decay <= 1:
            raise ValueError(f"suffix drafter decay must be in (0, 1], got {self.decay}")
        for part in (self, self.tree):
            for f in fields(part):
                value = getattr(part, f.name)
                if f.name not in _LIMITS or not _is_number(value):
                    continue  # a value of the wrong type is named by the type check that follows
                low, inclusive = _LIMITS[f.name]
                if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
                    raise ValueError(
                        f"suffix drafter option {f.name} must be {'>=' if inclusive else '>'} {low}, got {value}"
                    )
        for name in ("min_prob", "logprob_trust"):
            value = getattr(self.tree, name)
            if _is_number(value) and value > 1:
                raise ValueError(f"suffix drafter option {name} must be <= 1, got {value}")
        if _is_number(self.tree.match_power) and not math.isfinite(self.tree.match_power):
            raise ValueError(f"suffix drafter option match_power must be finite, got {self.tree.match_power}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# option -> (lowest allowed value, whether the lowest is allowed)
_LIMITS = {
    "window_versions": (1, True),
    "group_weight": (0.0, False),
    "self_weight": (0.0, False),
    "global_weight": (0.0, False),
    "min_match_group": (1, True),
    "min_match_self": (1, True),
    "min_match_global": (1, True),
    "max_rollouts_per_prompt": (0, True),
    "global_max_tokens": (0, True),
    "prompt_tail": (0, True),
    "max_walk": (1, True),
    "max_candidates": (1, True),
    "max_match": (1, True),
    "max_depth": (1, True),
    "prior": (0.0, True),
    "min_prob": (0.0, True),
    "logprob_trust": (0.0, True),
}


def suffix_options(options: dict[str, Any]) -> SuffixConfig:
    """The suffix drafters' options (SuffixConfig and TreeConfig fields, flat), copied and validated."""
    return build_options(SuffixConfig, options)


@dataclass
class HistoryRows:
    """The rollouts a refresh reads, as flat arrays: row i's prompt is prompts[prompt_offsets[i]:prompt_offsets[i+1]],
    likewise its output; output_logprobs holds each output token's logprob, NaN where the row has none."""

    keys: list[str]  # prompt key per row ("" where the history has none)
    versions: np.ndarray  # [R] int64
    prompts: np.ndarray  # [P] int32
    prompt_offsets: np.ndarray  # [R + 1] int64
    outputs: np.ndarray  # [O] int32
    output_offsets: np.ndarray  # [R + 1] int64
    output_logprobs: np.ndarray  # [O] float32


def _flat_lists(column: pa.ChunkedArray | pa.Array, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (values, offsets [rows + 1]); a null list counts as empty."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return values, offsets


def history_rows(history: Any, window_versions: int) -> HistoryRows:
    """The newest `window_versions` policy versions of a RolloutHistory (or all rows of a pyarrow Table)."""
    table = history.window(window_versions) if hasattr(history, "window") else history
    table = table.select(["prompt_key", "policy_version", "prompt_ids", "token_ids", "logprobs"])
    prompts, prompt_offsets = _flat_lists(table.column("prompt_ids"), np.int32)
    outputs, output_offsets = _flat_lists(table.column("token_ids"), np.int32)
    logprobs, logprob_offsets = _flat_lists(table.column("logprobs"), np.float32)
    out_len, lp_len = np.diff(output_offsets), np.diff(logprob_offsets)
    known = (lp_len == out_len) & (out_len > 0)  # a row's logprobs count only when there is one per output token
    aligned = np.full(len(outputs), np.nan, dtype=np.float32)
    if known.any():
        aligned[np.repeat(known, out_len)] = logprobs[np.repeat(known, lp_len)]
    return HistoryRows(
        keys=[k or "" for k in table.column("prompt_key").to_pylist()],
        versions=table.column("policy_version").to_numpy(zero_copy_only=False).astype(np.int64),
        prompts=prompts,
        prompt_offsets=prompt_offsets,
        outputs=outputs,
        output_offsets=output_offsets,
        output_logprobs=aligned,
    )


def core_config(cfg: SuffixConfig) -> dict[str, Any]:
    """The options the compiled core reads, flat."""
    flat = {k: v for k, v in asdict(cfg).items() if k not in ("tree", "window_versions")}
    flat.update(asdict(cfg.tree))
    flat["bucket_bits"] = BUCKET_BITS
    return flat


@register_drafter("suffix")
class SuffixDrafter(BaseDrafter):
    def __init__(self, **options):
        self.cfg = suffix_options(options)
        self.core = load_native().SuffixCore(core_config(self.cfg), Draft, EMPTY_DRAFT)  # holds the policy version
        self.slots: dict[str, int] = {}  # request id -> the core's slot

    # ------------------------------------------------------------------ lifecycle

    def begin(self, request_id, prompt_ids, group):
        if request_id in self.slots:
            raise ValueError(f"suffix drafter: request {request_id!r} began twice (end it first)")
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        key = prompt_key(prompt)
        self.slots[request_id] = self.core.begin(prompt, key if group is None else str(group), key)

    def observe(self, request_id, token_ids, logprobs=None):
        self.observe_batch([request_id], [token_ids], None if logprobs is None else [logprobs])

    def observe_batch(
        self,
        request_ids: Sequence[str],
        token_ids: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[float] | None] | None = None,
    ) -> None:
        """Emitted tokens of many requests in one call, with the policy's logprob of each where known (a request's
        logprobs count only when there is one per token)."""
        slots = self.slots
        self.core.observe([slots[r] for r in request_ids], token_ids, logprobs)

    def end(self, request_id):
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.core.end(slot)

    def refresh(self, history, policy_version: int) -> None:
        """Rebuild the per-prompt store and the global window from the history's newest versions."""
        version = int(policy_version)
        if history is None:
            self.core.set_version(version)
            return
        rows = history_rows(history, self.cfg.window_versions)
        self.core.refresh(
            version,
            rows.keys,
            rows.versions,
            rows.prompts,
            rows.prompt_offsets,
            rows.outputs,
            rows.output_offsets,
            rows.output_logprobs,
        )

    # ------------------------------------------------------------------ drafting

    def propose(self, request_id, max_tokens):
        return self.propose_batch([request_id], [max_tokens])[0]

    def propose_batch(self, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[Draft]:
        """One draft per request, all in one call of the core."""
        slots = self.slots
        return self.core.propose([slots[r] for r in request_ids], max_tokens)

    # ------------------------------------------------------------------ introspection

    @property
    def nbytes(self) -> int:
        """Bytes held by the global window and the per-prompt stores (array capacities)."""
        return self.core.nbytes

    def check_integrity(self) -> None:
        self.core.check_integrity()
        if self.core.live_requests != len(self.slots):
            raise AssertionError(f"{len(self.slots)} requests tracked but {self.core.live_requests} in the core")
