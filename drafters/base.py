"""What a drafter is: a request-lifecycle object that proposes token trees, plus a registry of drafters by name.

The engine calls, per request, begin -> (propose -> observe)* -> end, and at every new policy version
refresh(history, version). observe() hands over the emitted tokens with the policy's logprobs of them (under the
request's processed distribution): how sure the policy was is evidence about what its siblings will sample. A
drafter never sees logits: it proposes tokens, the target verifies them, and the engine stays lossless whatever the
drafter does. A bad draft only costs time.

A drafter that learns from the target's distributions rather than its samples says how many of the target's most
likely tokens per generated position it wants (`top_logprobs`, read by `wanted_top_logprobs`); the engine then
records them in the history it refreshes from. They come from the forwards that generated the rollouts, so they cost
no extra target compute and are always the policy's own at that version.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate
from operator import mul
from typing import Any, Callable, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True, eq=False)
class Draft:
    """A tree of proposed tokens, immutable. Node i follows node parents[i] (-1 = the last emitted token).

    Nodes are listed parents first; children of one node in the order they should be tried (most likely first).
    parents=None means a chain. probs[i], when given, is the drafter's estimate that node i is accepted given that
    its parent was; the budget uses it to decide how much of the draft is worth verifying.

    The engine, the budget and the vLLM proposer read a draft's parents, depths and path probabilities several
    times per step, so they are derived once, here, and a malformed tree is refused when the draft is made.
    """

    token_ids: list[int]
    parents: list[int] | None = None
    probs: list[float] | None = None
    # derived in __post_init__, never passed
    node_parents: tuple[int, ...] = field(init=False, repr=False)  # parents with a chain spelled out
    node_depths: tuple[int, ...] = field(init=False, repr=False)  # 1 for children of the root
    depth: int = field(init=False, repr=False)  # the deepest node's depth, 0 for an empty draft
    is_chain: bool = field(init=False, repr=False)

    def __post_init__(self):
        n = len(self.token_ids)
        if self.parents is not None and len(self.parents) != n:
            raise ValueError(f"draft has {n} tokens but {len(self.parents)} parents")
        if self.probs is not None and len(self.probs) != n:
            raise ValueError(f"draft has {n} tokens but {len(self.probs)} probs")
        parents = tuple(range(-1, n - 1)) if self.parents is None else tuple(self.parents)
        depths: list[int] = []
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"draft node {i} has parent {p}; parents must come before their children")
            depths.append(1 if p < 0 else depths[p] + 1)
        chain = self.parents is None or all(p == i - 1 for i, p in enumerate(parents))
        object.__setattr__(self, "node_parents", parents)
        object.__setattr__(self, "node_depths", tuple(depths))
        object.__setattr__(self, "depth", max(depths, default=0))
        object.__setattr__(self, "is_chain", chain)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Draft):
            return NotImplemented
        return (
            list(self.token_ids) == list(other.token_ids)
            and self.node_parents == other.node_parents
            and (None if self.probs is None else list(self.probs))
            == (None if other.probs is None else list(other.probs))
        )

    __hash__ = None  # type: ignore[assignment]  # lists inside: not hashable

    def parent_list(self) -> list[int]:
        return list(self.node_parents)

    def depths(self) -> list[int]:
        """Depth of each node, 1 for children of the root."""
        return list(self.node_depths)

    @cached_property
    def _default_path_probs(self) -> list[float]:
        return self._path_probs(0.5)

    def path_probs(self, default: float = 0.5) -> list[float]:
        """Estimated chance that each node is accepted (its conditional probs multiplied down the path)."""
        return self._default_path_probs if default == 0.5 else self._path_probs(default)

    def _path_probs(self, default: float) -> list[float]:
        cond = self.probs if self.probs is not None else [default] * len(self.token_ids)
        if self.is_chain:  # every step's drafts are new objects: the running product in C, the same floats
            return list(accumulate(cond, mul, initial=1.0))[1:]
        out: list[float] = []
        for c, p in zip(cond, self.node_parents):
            out.append(c * (out[p] if p >= 0 else 1.0))
        return out

    def truncated(self, max_nodes: int, max_depth: int) -> "Draft":
        """The first nodes (in order) that fit both limits; a node whose parent was cut is cut too."""
        if max_nodes <= 0 or max_depth <= 0 or not self.token_ids:
            return EMPTY_DRAFT
        if len(self.token_ids) <= max_nodes and self.depth <= max_depth:
            return self
        if self.is_chain:  # the common case: a prefix
            k = min(max_nodes, max_depth)
            return Draft(
                list(self.token_ids[:k]),
                None if self.parents is None else list(self.parents[:k]),
                None if self.probs is None else list(self.probs[:k]),
            )
        keep: list[int] = []
        new_index: dict[int, int] = {}
        for i, (p, d) in enumerate(zip(self.node_parents, self.node_depths)):
            if len(keep) == max_nodes:
                break
            if d > max_depth or (p >= 0 and p not in new_index):
                continue
            new_index[i] = len(keep)
            keep.append(i)
        return Draft(
            token_ids=[self.token_ids[i] for i in keep],
            parents=None if self.parents is None else [new_index.get(self.node_parents[i], -1) for i in keep],
            probs=None if self.probs is None else [self.probs[i] for i in keep],
        )


EMPTY_DRAFT = Draft([])


@runtime_checkable
class Drafter(Protocol):
    """Every member the engines call. BaseDrafter gives each a default, so a drafter implements only what it uses.

    Per request: begin -> (propose_batch -> observe_batch)* -> end; at every new policy version refresh(history,
    version). The engines call the batched forms once per step for all running requests; BaseDrafter's defaults
    loop over `propose` and `observe`, which is all a simple drafter writes. bind_target is called once, before
    the first request, with the target's checkpoint folder; top_logprobs asks the engine to record the target's
    top-k per generated token into the history (0: none)."""

    top_logprobs: int

    def begin(self, request_id: str, prompt_ids: Sequence[int], group: str | None) -> None: ...

    def observe(self, request_id: str, token_ids: Sequence[int], logprobs: Sequence[float] | None = None) -> None: ...

    def observe_batch(
        self,
        request_ids: Sequence[str],
        token_ids: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[float] | None] | None = None,
    ) -> None: ...

    def propose(self, request_id: str, max_tokens: int) -> Draft: ...

    def propose_batch(self, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[Draft]: ...

    def end(self, request_id: str) -> None: ...

    def refresh(self, history: Any, policy_version: int) -> None: ...

    def bind_target(self, folder: str) -> None: ...


class BaseDrafter:
    """Defaults for every Drafter protocol member: no-op lifecycle; batched calls loop over the single ones."""

    top_logprobs: int = 0  # the target's top-k per generated position this drafter learns from (0: none)

    def begin(self, request_id: str, prompt_ids: Sequence[int], group: str | None) -> None:
        pass

    def observe(self, request_id: str, token_ids: Sequence[int], logprobs: Sequence[float] | None = None) -> None:
        pass

    def observe_batch(self, request_ids, token_ids, logprobs=None) -> None:
        for i, (rid, toks) in enumerate(zip(request_ids, token_ids)):
            self.observe(rid, toks, None if logprobs is None else logprobs[i])

    def propose(self, request_id: str, max_tokens: int) -> Draft:
        return EMPTY_DRAFT

    def propose_batch(self, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[Draft]:
        return [self.propose(r, k) if k > 0 else EMPTY_DRAFT for r, k in zip(request_ids, max_tokens)]

    def end(self, request_id: str) -> None:
        pass

    def refresh(self, history: Any, policy_version: int) -> None:
        pass

    def bind_target(self, folder: str) -> None:
        pass


class TrackingDrafter(BaseDrafter):
    """Keeps each request's prompt + output tokens in self.tokens[request_id], for drafters that look at them."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}

    def begin(self, request_id, prompt_ids, group):
        self.tokens[request_id] = list(prompt_ids)

    def observe(self, request_id, token_ids, logprobs=None):
        self.tokens[request_id].extend(token_ids)

    def end(self, request_id):
        self.tokens.pop(request_id, None)


DRAFTERS: dict[str, Callable[..., Drafter]] = {}


def register_drafter(name: str):
    """Class decorator: make a drafter constructible by name from configs and the CLI."""

    def wrap(factory):
        if name in DRAFTERS and DRAFTERS[name] is not factory:
            raise ValueError(f"drafter {name!r} is registered twice")
        DRAFTERS[name] = factory
        return factory

    return wrap


@register_drafter("none")
class NoDrafter(BaseDrafter):
    """Plain decoding: every step verifies nothing and emits one token."""


def propose_all(drafter: Drafter, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[Draft]:
    """The drafter's `propose_batch`, with its answer checked: one draft per request."""
    drafts = drafter.propose_batch(list(request_ids), list(max_tokens))
    if len(drafts) != len(request_ids):
        raise RuntimeError(
            f"{type(drafter).__name__}.propose_batch returned {len(drafts)} drafts for {len(request_ids)} requests"
        )
    return drafts


def bind_target(drafter: Drafter, folder: str | None) -> Drafter:
    """Hand the target's checkpoint folder to the drafter (a drafter built on the target's own weights needs it;
    BaseDrafter ignores it). Both engines call this, so a drafter sees the same target on either."""
    if folder is not None:
        drafter.bind_target(str(folder))
    return drafter


def wanted_top_logprobs(drafter: Drafter) -> int:
    """How many of the target's top logprobs per generated token the engine should record for this drafter."""
    k = drafter.top_logprobs
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"drafter {type(drafter).__name__}.top_logprobs must be an int >= 0, got {k!r}")
    return k


def known_drafters() -> list[str]:
    _load_builtin_drafters()
    return sorted(DRAFTERS)


def make_drafter(name: str, **options: Any) -> Drafter:
    """Build a drafter from a registered name or a dotted path ("package.module:Class" or "package.module.Class")."""
    _load_builtin_drafters()
    factory = DRAFTERS.get(name)
    if factory is None and ("." in name or ":" in name):
        module_name, _, attr = name.replace(":", ".").rpartition(".")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import drafter {name!r}: {exc}") from exc
    if factory is None:
        raise ValueError(f"unknown drafter {name!r}; known drafters: {', '.join(sorted(DRAFTERS))}, or a dotted path")
    drafter = factory(**options)
    if not isinstance(drafter, Drafter):
        missing = [m for m in _PROTOCOL_MEMBERS if not hasattr(drafter, m)]
        raise TypeError(
            f"drafter {name!r} lacks {', '.join(missing)} of the Drafter protocol; subclass drafters.base.BaseDrafter "
            "for defaults"
        )
    return drafter


_PROTOCOL_MEMBERS = (
    "top_logprobs",
    "begin",
    "observe",
    "observe_batch",
    "propose",
    "propose_batch",
    "end",
    "refresh",
    "bind_target",
)

BUILTIN_MODULES = (
    "drafters.ngram",
    "drafters.suffix",
    "drafters.suffix_reference",
    "drafters.arctic",
    "drafters.model",
    "drafters.composite",
)


def _load_builtin_drafters() -> None:
    # Importing the modules runs their @register_drafter decorators; their heavy imports stay lazy.
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
