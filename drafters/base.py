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
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable


@dataclass
class Draft:
    """A tree of proposed tokens. Node i follows node parents[i] (-1 = the last emitted token).

    Nodes are listed parents first; children of one node in the order they should be tried (most likely first).
    parents=None means a chain. probs[i], when given, is the drafter's estimate that node i is accepted given that
    its parent was; the budget uses it to decide how much of the draft is worth verifying.
    """

    token_ids: list[int]
    parents: list[int] | None = None
    probs: list[float] | None = None
    score: float = 0.0

    def __post_init__(self):
        n = len(self.token_ids)
        if self.parents is not None and len(self.parents) != n:
            raise ValueError(f"draft has {n} tokens but {len(self.parents)} parents")
        if self.probs is not None and len(self.probs) != n:
            raise ValueError(f"draft has {n} tokens but {len(self.probs)} probs")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_chain(self) -> bool:
        return self.parents is None or all(p == i - 1 for i, p in enumerate(self.parents))

    def parent_list(self) -> list[int]:
        return list(range(-1, len(self.token_ids) - 1)) if self.parents is None else list(self.parents)

    def depths(self) -> list[int]:
        """Depth of each node, 1 for children of the root."""
        out: list[int] = []
        for i, p in enumerate(self.parent_list()):
            if not -1 <= p < i:
                raise ValueError(f"draft node {i} has parent {p}; parents must come before their children")
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def path_probs(self, default: float = 0.5) -> list[float]:
        """Estimated chance that each node is accepted (its conditional probs multiplied down the path)."""
        cond = self.probs if self.probs is not None else [default] * len(self.token_ids)
        out: list[float] = []
        for c, p in zip(cond, self.parent_list()):
            out.append(c * (out[p] if p >= 0 else 1.0))
        return out

    def truncated(self, max_nodes: int, max_depth: int) -> "Draft":
        """The first nodes (in order) that fit both limits; a node whose parent was cut is cut too."""
        if max_nodes <= 0 or max_depth <= 0 or not self.token_ids:
            return Draft([])
        if len(self.token_ids) <= min(max_nodes, max_depth):  # no node is deeper than the node count
            return self
        parents = self.parent_list()
        depths = self.depths()
        keep: list[int] = []
        new_index: dict[int, int] = {}
        for i, (p, d) in enumerate(zip(parents, depths)):
            if len(keep) == max_nodes:
                break
            if d > max_depth or (p >= 0 and p not in new_index):
                continue
            new_index[i] = len(keep)
            keep.append(i)
        if len(keep) == len(self.token_ids):
            return self
        return Draft(
            token_ids=[self.token_ids[i] for i in keep],
            parents=None if self.parents is None else [new_index.get(parents[i], -1) for i in keep],
            probs=None if self.probs is None else [self.probs[i] for i in keep],
            score=self.score,
        )


EMPTY_DRAFT = Draft([])


@runtime_checkable
class Drafter(Protocol):
    def begin(self, request_id: str, prompt_ids: Sequence[int], group: str | None) -> None: ...

    def observe(self, request_id: str, token_ids: Sequence[int], logprobs: Sequence[float] | None = None) -> None: ...

    def propose(self, request_id: str, max_tokens: int) -> Draft: ...

    def end(self, request_id: str) -> None: ...

    def refresh(self, history: Any, policy_version: int) -> None: ...


class BaseDrafter:
    """No-op lifecycle methods, so a drafter implements only what it uses."""

    def begin(self, request_id: str, prompt_ids: Sequence[int], group: str | None) -> None:
        pass

    def observe(self, request_id: str, token_ids: Sequence[int], logprobs: Sequence[float] | None = None) -> None:
        pass

    def propose(self, request_id: str, max_tokens: int) -> Draft:
        return EMPTY_DRAFT

    def end(self, request_id: str) -> None:
        pass

    def refresh(self, history: Any, policy_version: int) -> None:
        pass

    top_logprobs: int = 0  # the target's top-k per generated position this drafter learns from (0: none)


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
    """Drafts for many requests at once: one call to the drafter's `propose_batch` where it has one (a parametric
    drafter runs one batched forward per draft position; the compiled drafters draft the whole step in one call),
    else `propose` per request."""
    batch = getattr(drafter, "propose_batch", None)
    if batch is not None:
        drafts = batch(list(request_ids), list(max_tokens))
        if len(drafts) != len(request_ids):
            raise RuntimeError(
                f"{type(drafter).__name__}.propose_batch returned {len(drafts)} drafts for {len(request_ids)} requests"
            )
        return drafts
    return [drafter.propose(r, k) if k > 0 else EMPTY_DRAFT for r, k in zip(request_ids, max_tokens)]


def observe_all(
    drafter: Drafter,
    request_ids: Sequence[str],
    token_ids: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float] | None] | None = None,
) -> None:
    """Emitted tokens of many requests at once: one call to the drafter's `observe_batch` where it has one (the
    compiled drafters take a whole step in one call), else `observe` per request."""
    batch = getattr(drafter, "observe_batch", None)
    if batch is not None:
        batch(request_ids, token_ids, logprobs)
        return
    for i, (rid, toks) in enumerate(zip(request_ids, token_ids)):
        drafter.observe(rid, toks, None if logprobs is None else logprobs[i])


def bind_target(drafter: Drafter, folder: str | None) -> Drafter:
    """Hand the target's checkpoint folder to a drafter built on the target's own weights (drafters/model.py has
    `bind_target`); others ignore it. Both engines call this, so a drafter sees the same target on either."""
    bind = getattr(drafter, "bind_target", None)
    if bind is not None and folder is not None:
        bind(str(folder))
    return drafter


def wanted_top_logprobs(drafter: Drafter) -> int:
    """How many of the target's top logprobs per generated token the engine should record for this drafter."""
    k = getattr(drafter, "top_logprobs", 0)
    if not isinstance(k, int) or k < 0:
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
        raise TypeError(f"drafter {name!r} does not implement begin/observe/propose/end/refresh")
    return drafter


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
