"""Snowflake ArcticInference's suffix decoding (the engine behind vLLM's `suffix` method), as a Drafter.

It is the peer our suffix drafter is measured against, driven as vLLM drives it (vllm/v1/spec_decode/
suffix_decoding.py): one global tree over cached responses, FIFO up to max_cached_requests, plus a per-request tree
over the prompt; the pattern is the last max_tree_depth tokens; chains, not trees. Defaults are vLLM's.
Needs `pip install arctic-inference` (its SuffixDecodingCache runs without vLLM, on CPU).
"""

from __future__ import annotations

from drafters.base import Draft, TrackingDrafter, register_drafter


@register_drafter("arctic_suffix")
class ArcticSuffixDrafter(TrackingDrafter):
    def __init__(
        self,
        max_tree_depth: int = 24,
        max_cached_requests: int = 10000,
        max_spec_factor: float = 1.0,
        min_token_prob: float = 0.1,
    ):
        try:
            from arctic_inference.suffix_decoding import SuffixDecodingCache
        except ImportError as exc:
            raise ModuleNotFoundError(
                "the arctic_suffix drafter needs ArcticInference: pip install arctic-inference"
            ) from exc
        super().__init__()
        self.cache = SuffixDecodingCache(max_tree_depth=max_tree_depth, max_cached_requests=max_cached_requests)
        self.max_tree_depth = max_tree_depth
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob

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
        return Draft(list(draft.token_ids), probs=list(draft.probs) or None, score=float(draft.score))

    def end(self, request_id):
        if request_id in self.cache.active_requests:
            self.cache.stop_request(request_id)
        super().end(request_id)
