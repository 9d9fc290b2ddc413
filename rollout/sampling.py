"""Sampling parameters and the processed distribution they define.

The processed distribution p is what a request samples from and what its returned logprobs are measured under:
logits / temperature, then top-k (keep the k largest, ties at the k-th value kept), then top-p (keep the smallest
set of most likely tokens whose mass reaches top_p), renormalised. Temperature 0 means greedy: the sample is the
argmax of the raw logits, and logprobs are reported under temperature 1 with the same top-k/top-p, since a point
mass would make every logprob 0 and tell a trainer nothing.

A request may also ask for the top_logprobs most likely tokens of p at each generated position: the same rows the
sampled token's logprob is read from, so the sampled token, when among them, carries the same logprob.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from rollout.verify import sample_inverse_cdf

# The most top logprobs per token a request may ask for: vLLM's default max_logprobs, which trainers are written for.
MAX_TOP_LOGPROBS = 20


def _check_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # when False, the model's EOS token(s) also stop the sequence
    seed: int | None = None
    # Stop tokens (EOS included) are masked out of the processed distribution at the first min_tokens output
    # positions, as vLLM does: the rollout samples, and its logprobs report, that masked distribution.
    min_tokens: int = 0
    # The N most likely tokens of the processed distribution at each generated position and their logprobs, returned
    # in RolloutResult.top_token_ids / top_logprobs (0: none, and nothing is computed for them).
    top_logprobs: int = 0

    def __post_init__(self):
        # Validate here so that a bad request fails when it is built, naming the field, before it reaches an engine.
        object.__setattr__(self, "temperature", _check_float("temperature", self.temperature))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        object.__setattr__(self, "top_k", _check_int("top_k", self.top_k, 0))
        top_p = _check_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "max_tokens", _check_int("max_tokens", self.max_tokens, 1))
        object.__setattr__(self, "min_tokens", _check_int("min_tokens", self.min_tokens, 0))
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not hasattr(stops, "__iter__"):
            raise ValueError(f"stop_token_ids must be a list of integers, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", tuple(_check_int("stop_token_ids", t, 0) for t in stops))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        top = _check_int("top_logprobs", self.top_logprobs, 0)
        if top > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {top}")
        object.__setattr__(self, "top_logprobs", top)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a seeded request with n > 1: distinct per sample, the same on every run."""
    return (seed * 1_000_003 + index) % 2**63


def process_logits(
    logits: torch.Tensor,  # [R, V] fp32
    temperature: torch.Tensor,  # [R]; 0 = greedy
    top_k: torch.Tensor,  # [R] int; 0 = off
    top_p: torch.Tensor,  # [R]; 1 = off
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (probs [R, V] to sample from, logprobs [R, V] to report).

    Greedy rows sample from a point mass on the argmax of the raw logits; all other rows sample from exp(logprobs).
    """
    temperature = temperature.to(logits.device)
    logprobs = processed_logprobs(logits, temperature, top_k, top_p)
    probs = logprobs.exp()
    greedy = temperature == 0
    if bool(greedy.any()):
        rows = greedy.nonzero().squeeze(1)
        point = torch.zeros_like(probs[rows])
        point.scatter_(-1, logits[rows].argmax(-1, keepdim=True), 1.0)
        probs[rows] = point
    return probs, logprobs


def draw_tokens(
    logits: torch.Tensor,  # [R, V] fp32
    temperature: torch.Tensor,  # [R]; 0 = greedy
    top_k: torch.Tensor,  # [R] int
    top_p: torch.Tensor,  # [R]
    u: torch.Tensor,  # [R] float64 uniforms
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [R] int64, logprobs [R, V]): what sample_inverse_cdf(process_logits(...)[0], u) draws, without
    building the probabilities nobody samples from. A greedy row's inverse CDF is a step at the argmax, so its
    token is the argmax whatever u is; the other rows are drawn from exp(logprobs), as process_logits gives them."""
    temperature = temperature.to(logits.device)
    logprobs = processed_logprobs(logits, temperature, top_k, top_p)
    greedy = temperature == 0
    if bool(greedy.all()):
        return logits.argmax(-1), logprobs
    tokens = sample_inverse_cdf(logprobs.exp(), u)
    if bool(greedy.any()):
        tokens = torch.where(greedy, logits.argmax(-1), tokens)
    return tokens, logprobs


def processed_logprobs(
    logits: torch.Tensor,  # [R, V] fp32
    temperature: torch.Tensor,  # [R]; 0 = greedy (reported under temperature 1)
    top_k: torch.Tensor,  # [R] int; 0 = off
    top_p: torch.Tensor,  # [R]; 1 = off
) -> torch.Tensor:
    """logprobs [R, V] of the processed distribution, the ones a request reports."""
    # Per-row parameters are often built on the host; the work happens where the logits are.
    temperature, top_k, top_p = (t.to(logits.device) for t in (temperature, top_k, top_p))
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    neg_inf = float("-inf")
    if bool((top_k > 0).any()):
        vocab = scaled.shape[-1]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        top = scaled.topk(int(k.max()), dim=-1).values  # [R, kmax], descending
        kth = top.gather(-1, (k - 1)[:, None])  # [R, 1]
        scaled = scaled.masked_fill(scaled < kth, neg_inf)
    if bool((top_p < 1).any()):
        rows = (top_p < 1).nonzero().squeeze(1)
        sub = scaled[rows]
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p[rows, None]
        drop_sorted[:, 0] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled[rows] = sub.masked_fill(drop, neg_inf)
    return scaled.log_softmax(-1)
