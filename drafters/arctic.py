"""Snowflake ArcticInference's suffix decoding (the engine behind vLLM's `suffix` method), as a Drafter.

It is the peer our suffix drafter is measured against, driven as vLLM drives it (vllm/v1/spec_decode/
suffix_decoding.py): one global tree over cached responses, FIFO up to max_cached_requests, plus a per-request tree
over the prompt; the pattern is the last max_tree_depth tokens; chains, not trees. Defaults are vLLM's.
Needs `pip install arctic-inference` (its SuffixDecodingCache runs without vLLM, on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from drafters.base import Draft, TrackingDrafter, register_drafter
from drafters.options import DrafterOptions, build_options


@dataclass
class ArcticSuffixConfig(DrafterOptions):
    drafter: ClassVar[str] = "arctic_suffix"

    max_tree_depth: int = 24  # the pattern: this many last tokens
    max_cached_requests: int = 10000  # responses kept in the global tree, FIFO
    max_spec_factor: float = 1.0  # at most this many draft tokens per matched pattern token
    min_token_prob: float = 0.1  # a draft stops where a token's estimated probability falls below this


@register_drafter("arctic_suffix")
class ArcticSuffixDrafter(TrackingDrafter):
    def __init__(self, **options):
        self.config = c = build_options(ArcticSuffixConfig, options)
        try:
            from arctic_inference.suffix_decoding import SuffixDecodingCache
        except ImportError as exc:
            raise ModuleNotFoundError(
                "the arctic_suffix drafter needs ArcticInference: pip install arctic-inference"
            ) from exc
        super().__init__()
        self.cache = SuffixDecodingCache(max_tree_depth=c.max_tree_depth, max_cached_requests=c.max_cached_requests)
        self.max_tree_depth = c.max_tree_depth
        self.max_spec_factor = c.max_spec_factor
        self.min_token_prob = c.min_token_prob

    def begin(self, request_id, prompt_ids, group):
        if request_id in self.cache.cached_requests:
            self.cache.evict_cached_response(request_id)  # a reused id must not see its old response
        self.cache.start_request(request_id, list(prompt_ids))
        super().begin(request_id, prompt_ids, group)

    def observe(self, request_id, token_ids, logprobs=None):
        if token_ids:
            self.cache.add_active_response(request_id, list(token_ids))
            super().observe(request_id, token_ids)

    def propose(self, request_id, max_tokens):
        if max_tokens <= 0:
            return Draft([])
        pattern = self.tokens[request_id][-self.max_tree_depth :]
        draft = self.cache.speculate(
            request_id,
            pattern,
            max_spec_tokens=max_tokens,
            max_spec_factor=self.max_spec_factor,
            min_token_prob=self.min_token_prob,
        )
        return Draft(list(draft.token_ids), probs=list(draft.probs) or None)

    def end(self, request_id):
        if request_id in self.cache.active_requests:
            self.cache.stop_request(request_id)
        super().end(request_id)
